"""CLI verbs ``mean`` and ``data``: Caffe's data side.

``surgery mean`` converts a mean between ``.binaryproto`` and ``.npy`` (numpy only);
``surgery data`` reads through a data layer (torch, OpenCV, lmdb/h5py imported only here, when
the verb runs) and reports what the net will see.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import CliError, emit, ensure_output

__all__ = ["register", "cmd_mean", "cmd_data"]


def cmd_mean(args: argparse.Namespace) -> int:
    """``surgery mean``: show a mean file, or convert it with ``-o``."""
    from ..data.mean import read_mean, write_mean

    if args.output is not None:
        ensure_output([args.mean], args.output)
    mean = read_mean(args.mean)
    if args.output is not None:
        write_mean(args.output, mean)
    rep = {
        "input": args.mean,
        "output": args.output,
        "shape": list(mean.shape),
        "channel_means": [float(m) for m in mean.reshape(mean.shape[0], -1).mean(axis=1)],
        "min": float(mean.min()),
        "max": float(mean.max()),
    }
    c, h, w = mean.shape
    chans = ", ".join(f"{m:.3f}" for m in rep["channel_means"])
    text = f"{args.mean}: mean of {c}x{h}x{w} (C x H x W), per-channel averages (BGR) {chans}"
    if args.output is not None:
        text += f"\nwrote {args.output}"
    emit(rep, text, args.json)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``surgery data``: read samples through a data layer and report them."""
    from ..caffe_io import load

    net = load(args.net)
    try:
        from ..data import dataset
        from ..data.summary import dump, summarize
    except ImportError as exc:
        raise CliError(f"surgery data needs the train extra (pip install "
                       f"'caffe-surgery[train]'): {exc}") from None
    ds = dataset(net, args.layer, args.phase, seed=args.seed)
    rep, tops = summarize(ds, args.count, workers=args.workers, seed=args.seed,
                          batch_size=args.batch_size)
    if args.dump:
        rep["dumped"] = dump(ds, tops, args.dump)
        rep["dump"] = args.dump
    emit(rep, _text(rep), args.json)
    return 0


def _text(rep: dict[str, Any]) -> str:
    lines = [f"layer {rep['layer']!r} ({rep['type']}, {rep['phase']}): {rep['source_size']} "
             f"samples in {rep['source']}"]
    for f in rep["files"]:
        if f["written"] != f["used"]:
            lines.append(f"  {f['field']} {f['written']!r} -> {f['used']}")
    lines += [f"  note: {n}" for n in rep["notes"]]
    for t in rep["tops"]:
        shape = "x".join(str(d) for d in t["shape"]) or "scalar"
        lines.append(f"  top {t['name']}: {shape} {t['dtype']}, min {t['min']:.6g} max "
                     f"{t['max']:.6g} mean {t['mean']:.6g}")
        if "histogram" in t:
            hist = ", ".join(f"{k}: {v}" for k, v in list(t["histogram"].items())[:20])
            more = len(t["histogram"]) - 20
            lines.append(f"    histogram {{{hist}{f', ... {more} more' if more > 0 else ''}}}")
    rate = rep["samples_per_s"]
    lines.append(f"  read {rep['samples']} samples in {rep['seconds']:.3f} s"
                 + (f" ({rate:.0f} samples/s, {rep['workers']} workers"
                    + (", their start-up included)" if rep["workers"] else ")") if rate else ""))
    if "dump" in rep:
        lines.append(f"  wrote {len(rep['dumped'])} files to {rep['dump']}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add the verbs to the ``surgery`` argument parser's subparsers."""
    p = sub.add_parser(
        "mean",
        help="show a mean file, or convert it between .binaryproto and .npy",
        description="Read MEAN (.binaryproto from compute_image_mean, or .npy) and print its "
        "shape and per-channel averages; with -o write it as .npy (C x H x W float32) or "
        ".binaryproto (1 x C x H x W BlobProto), chosen by the suffix.",
    )
    p.add_argument("mean", help="MEAN.binaryproto or MEAN.npy")
    p.add_argument("-o", "--output", help="OUT.npy or OUT.binaryproto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_mean)

    p = sub.add_parser(
        "data",
        help="read through a data layer: shapes, ranges, labels, samples/s, dumps",
        description="Build the layer's dataset as Caffe would (LMDB/LevelDB, ImageData, "
        "HDF5Data; transform_param applied), read --count samples in Caffe's order and print "
        "each top's shape, dtype, value range, a label histogram and the read rate. --dump "
        "writes every sample as .npy and image tops as PNG (scale and mean undone).",
    )
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--layer", required=True, help="the data layer's name")
    p.add_argument("--phase", default="train", type=str.lower, choices=["train", "test"])
    p.add_argument("--count", type=int, help="samples to read (default: one batch)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the layer's)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of random crop/mirror/shuffle")
    p.add_argument("--dump", metavar="DIR", help="write the samples as .npy and PNG to DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data)
