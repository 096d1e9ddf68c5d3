"""CLI verbs that change the graph or move weights: insert-eltwise, insert-gate, transplant.

Each is a thin wrapper: load -> op (which checks) -> save atomically -> print the report. Only
light modules are imported here (no torch, no onnx).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import did_you_mean
from . import (
    CliError,
    add_fill_missing,
    add_input_shape_option,
    emit,
    ensure_distinct,
    ensure_output,
    input_shapes,
    load_for_edit,
    refuse_new_problems,
    weights_coverage,
)

__all__ = ["register"]


def _save(args: argparse.Namespace, net: Any, report: Any) -> int:
    from ..caffe_io import save

    out_weights = getattr(args, "out_weights", None)
    net = weights_coverage(args, net, report)
    refuse_new_problems(args, net)
    save(net, args.output, out_weights)
    data = report.as_dict()
    data.update(output=args.output, out_weights=out_weights)
    text = report.text() + f"\nwrote {args.output}" + (f" and {out_weights}" if out_weights
                                                       else "")
    emit(data, text, args.json)
    return 0


def cmd_insert_eltwise(args: argparse.Namespace) -> int:
    from ..ops.insert import insert_eltwise

    coeff = None
    if args.coeff is not None:
        try:
            coeff = [float(c) for c in args.coeff.split(",") if c.strip()]
        except ValueError:
            raise CliError(f"--coeff must be C1,C2 (numbers); got {args.coeff!r}") from None
    net = load_for_edit(args, weights_need_output=True)
    new, report = insert_eltwise(net, args.bottoms, args.operation, coeff, args.name,
                                 feed=args.feed, rewire=not args.no_rewire,
                                 input_shapes=input_shapes(net, args.input_shape))
    return _save(args, new, report)


def cmd_insert_gate(args: argparse.Namespace) -> int:
    from ..ops.insert import insert_gate

    net = load_for_edit(args, weights_need_output=True)
    channels: int | str = 1 if args.channels == "1" else "same"
    new, report = insert_gate(net, args.at, channels, args.activation, args.init,
                              name=args.name, seed=args.seed, feed=args.feed,
                              rewire=not args.no_rewire,
                              input_shapes=input_shapes(net, args.input_shape))
    return _save(args, new, report)


def cmd_cut(args: argparse.Namespace) -> int:
    from ..ops.cut import cut

    net = load_for_edit(args, weights_need_output=True)
    new, report = cut(net, args.at)
    return _save(args, new, report)


def _mapping(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            src, sep, dst = part.partition("=")
            if not sep or not src or not dst:
                raise CliError(f"--map takes SRC_LAYER=DST_LAYER; got {part!r}")
            if src in out and out[src] != dst:
                raise CliError(f"--map names {src!r} twice ({out[src]!r} and {dst!r})")
            out[src] = dst
    return out


def cmd_transplant(args: argparse.Namespace) -> int:
    from .. import _atomic
    from ..caffe_io import load, read_weights, save, write_text_atomic
    from ..ops.transplant import transplant

    mapping = _mapping(args.map)
    # `--from a,b` (or --from a --from b) is `caffe train -weights a,b`: later files override.
    sources = [s for item in args.source for s in item.split(",") if s]
    inputs = [args.net, args.weights, *sources]
    ensure_output(inputs, args.output, args.in_place)
    if args.report is not None:
        ensure_output(inputs, args.report, args.in_place, "--report")
        ensure_distinct(args.output, args.report, "-o and --report")
    net = load(args.net, args.weights)
    shapes = input_shapes(net, args.input_shape)
    scanned = [read_weights(src) for src in sources]
    if len(scanned) > 1:  # a --map key must name a layer of at least one source
        names = {r.name for wf in scanned for r in wf.layers}
        for key in mapping:
            if key not in names:
                raise CliError(f"--map {key}={mapping[key]}: no source caffemodel has a layer "
                               f"{key!r}" + did_you_mean(key, names))
    new, reports = net, []
    for wf in scanned:
        layer_names = {r.name for r in wf.layers}
        own = mapping if len(scanned) == 1 else {
            k: v for k, v in mapping.items() if k in layer_names
        }
        new, report = transplant(new, wf, own, args.on_mismatch, seed=args.seed,
                                 input_shapes=shapes)
        reports.append(report)
    data = reports[-1].as_dict() if len(reports) == 1 else {
        "op": "transplant", "sources": [r.as_dict() for r in reports]}
    data.update(output=args.output)
    with _atomic.outputs():  # the caffemodel and the report, both or neither
        save(new, weights=args.output)
        if args.report is not None:
            write_text_atomic(args.report, json.dumps(data, indent=1, default=str) + "\n")
    lines = []
    for src, report in zip(sources, reports, strict=True):
        c = report.data["counts"]
        head = f"from {src}:\n" if len(sources) > 1 else ""
        lines.append(
            head + report.text()
            + f"\n{c['copied']} copied, {c['reinitialised']} re-initialised, "
            f"{c['skipped']} skipped, {c['filled']} filled from fillers, {c['unused']} unused "
            f"source layer(s); {report.data['bytes']['copied']:,} bytes copied"
        )
    summary = f"\nwrote {args.output}" + (f" and {args.report}" if args.report else "")
    emit(data, "\n".join(lines) + summary, args.json)
    return 0


def _rewire_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--feed", action="append", metavar="LAYER[,LAYER]",
                   help="the consumers that read the product (default: every reader of the "
                   "bottom whose shape the product has)")
    g.add_argument("--no-rewire", action="store_true",
                   help="rewire no consumer: the product is a new net output")


def register(sub: Any) -> None:
    """Add the verbs to the ``surgery`` argument parser's subparsers."""
    p = sub.add_parser(
        "insert-eltwise",
        help="add an Eltwise (prod/sum/max) on two values; it feeds their consumers",
        description="Add an Eltwise layer on A and B right after both are produced and make "
        "the consumers of the bottom whose shape the product has (A when equal) read it; "
        "--feed names them, --no-rewire keeps them. A name is a LAYER (its own output, before "
        "any in-place layer), LAYER:i (top i), or a blob (its last version). 1 channel against "
        "C channels gets a Tile.",
    )
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("-o", "--output", required=True, help="OUT.prototxt")
    p.add_argument("--bottoms", nargs=2, required=True, metavar=("A", "B"))
    p.add_argument("--operation", default="prod", choices=["prod", "sum", "max"])
    p.add_argument("--coeff", help="C1,C2 (sum only)")
    p.add_argument("--name", help="name of the new layer and its top")
    _rewire_options(p)
    add_input_shape_option(p)
    p.add_argument("--weights", help="IN.caffemodel (carried over; the new layers have none)")
    p.add_argument("--out-weights", help="OUT.caffemodel (needs --weights)")
    add_fill_missing(p, seed=True)
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_insert_eltwise)

    p = sub.add_parser(
        "insert-gate",
        help="add a learned multiplicative gate after a layer's own output",
        description="1x1 Convolution -> Sigmoid -> (Tile) -> Eltwise PROD with LAYER's own "
        "output (before any in-place layer; name the in-place layer to gate after it), and "
        "rewire LAYER's later readers. --init identity leaves the outputs unchanged.",
    )
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("-o", "--output", required=True, help="OUT.prototxt")
    p.add_argument("--at", required=True, metavar="LAYER", help="LAYER or LAYER:i")
    p.add_argument("--channels", default="1", choices=["1", "same"])
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "none"])
    p.add_argument("--init", default="random", choices=["random", "identity"])
    p.add_argument("--name", help="prefix of the new layers (default: LAYER)")
    _rewire_options(p)
    add_input_shape_option(p)
    p.add_argument("--weights", help="IN.caffemodel")
    p.add_argument("--out-weights", help="OUT.caffemodel (needs --weights)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for the random gate weights and --fill-missing (default: "
                   "surgery.fillers.DEFAULT_SEED)")
    add_fill_missing(p, seed=False)
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_insert_gate)

    p = sub.add_parser(
        "cut",
        help="truncate a net after a value: keep only the layers it depends on",
        description="Keep the layers BLOB depends on and drop the rest (later layers, side "
        "branches, losses): a feature extractor ending at pool5. BLOB is named as for "
        "insert-eltwise: LAYER (its own output, before an in-place layer), LAYER:i, or a blob.",
    )
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--at", required=True, metavar="BLOB", help="LAYER, LAYER:i or a blob name")
    p.add_argument("-o", "--output", required=True, help="OUT.prototxt")
    p.add_argument("--weights", help="IN.caffemodel")
    p.add_argument("--out-weights", help="OUT.caffemodel (needs --weights): the kept layers' blobs")
    add_fill_missing(p, seed=True)
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_cut)

    p = sub.add_parser(
        "transplant",
        help="copy weights by layer name from a caffemodel (Caffe's CopyTrainedLayersFrom)",
        description="Copy every source layer's blobs into the layer of the same name in NET "
        "(after --map), as caffe train -weights does; write a caffemodel for NET. Layers "
        "without a source get values from their fillers.",
    )
    p.add_argument("net", help="NET.prototxt (the target definition)")
    p.add_argument(
        "--from", dest="source", required=True, action="append", metavar="SRC.caffemodel",
        help="source weights; several (a,b or repeated) are applied in order, later ones "
        "overriding, as `caffe train -weights a,b`",
    )
    p.add_argument("-o", "--output", required=True, help="OUT.caffemodel")
    p.add_argument("--weights", help="start from these weights for NET (later ones override)")
    p.add_argument("--map", action="append", metavar="SRC=DST",
                   help="copy source layer SRC into target layer DST (repeatable)")
    p.add_argument("--on-mismatch", default="error", choices=["error", "reinit", "skip"])
    p.add_argument("--report", metavar="R.json", help="also write the report as JSON")
    add_input_shape_option(p)
    p.add_argument("--seed", type=int, default=None,
                   help="seed for fresh values (default: surgery.fillers.DEFAULT_SEED)")
    p.add_argument("--in-place", action="store_true", help="allow overwriting an input")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_transplant)
