"""Benchmark ``surgery transplant`` against copying a file of the same size.

One run writes a VGG16-sized caffemodel (``../shared/zoo/vgg16_ilsvrc_v1format/vgg16.prototxt``
with seeded random float32 weights, about 553 MB) with our writer, then times, ``--repeat``
times each (median reported):

- ``copy (kernel)``   ``shutil.copyfile``: the kernel's own copy (copy_file_range/sendfile);
- ``copy (read+write)`` read the file in 16 MiB chunks and write them: the floor for a program
  that must see the bytes;
- ``transplant``      :func:`surgery.ops.transplant_file`: scan the source (memory-mapped),
  match 16 layers by name and check their shapes, stream the blobs to a new caffemodel
  (atomic rename), i.e. what ``surgery transplant NET --from SRC -o OUT`` does after parsing
  its arguments; its phases (scan, match, write) are reported too.

The page cache is warm for every contender (the source was just written). ``--cold`` asks the
kernel to drop caches before each timed run (root only; it slows every process on the machine).

Usage::

    python tools/bench_transplant.py [--dir DIR] [--repeat N] [--cold] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery import caffe_io  # noqa: E402
from surgery.ops import transplant  # noqa: E402
from surgery.ops._common import param_shapes  # noqa: E402

VGG16 = ROOT.parent / "shared" / "zoo" / "vgg16_ilsvrc_v1format" / "vgg16.prototxt"


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_source(path: Path, seed: int = 0) -> tuple[object, int]:
    """Write a VGG16 caffemodel with random weights; returns (net definition, bytes)."""
    net = caffe_io.load(VGG16)
    rng = np.random.default_rng(seed)
    filled = net.copy()
    for lay in filled.layers:
        if lay.type not in ("Convolution", "InnerProduct"):
            continue
        shapes = param_shapes(filled, lay)
        from surgery.net import Param

        lay.params = [Param(data=rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    caffe_io.save(filled, weights=path)
    return net, path.stat().st_size


def copy_chunks(src: Path, dst: Path, chunk: int = 16 << 20) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        while True:
            b = f.read(chunk)
            if not b:
                break
            g.write(b)


def _time(fn, repeat: int, cold: bool) -> list[float]:
    out = []
    for _ in range(repeat):
        if cold:
            _drop_caches()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="folder for the temporary files (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.cold and not _drop_caches():
        print("--cold: cannot drop caches (not root?); timing on a warm cache", file=sys.stderr)
        args.cold = False
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        src, dst, out = d / "vgg16.caffemodel", d / "copy.caffemodel", d / "out.caffemodel"
        t = time.perf_counter()
        net, size = make_source(src)
        print(f"source: {size / 1e6:.1f} MB VGG16 caffemodel written in "
              f"{time.perf_counter() - t:.2f} s")

        phases: dict[str, list[float]] = {"scan": [], "match": [], "write": []}

        def run_transplant() -> None:
            t0 = time.perf_counter()
            wf = caffe_io.read_weights(src)
            t1 = time.perf_counter()
            new, rep = transplant(net, wf)
            t2 = time.perf_counter()
            caffe_io.save(new, weights=out)
            t3 = time.perf_counter()
            phases["scan"].append(t1 - t0)
            phases["match"].append(t2 - t1)
            phases["write"].append(t3 - t2)
            assert rep.data["counts"]["copied"] == 16, rep.data["counts"]

        results = {
            "copy (kernel)": _time(lambda: shutil.copyfile(src, dst), args.repeat, args.cold),
            "copy (read+write)": _time(lambda: copy_chunks(src, dst), args.repeat, args.cold),
            "transplant": _time(run_transplant, args.repeat, args.cold),
        }
        assert out.stat().st_size == size  # same layers, same bytes
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"{'':20} {'median s':>9} {'MB/s':>8} {'x read+write':>13}")
        for k, v in med.items():
            print(f"{k:20} {v:9.3f} {size / 1e6 / v:8.0f} {v / med['copy (read+write)']:13.2f}")
        print("transplant phases (median s): " + ", ".join(
            f"{k} {statistics.median(v):.3f}" for k, v in phases.items()))
        print(f"page cache: {'dropped before each run' if args.cold else 'warm'}; "
              f"repeat {args.repeat}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "bytes": size, "cold": args.cold, "repeat": args.repeat,
                "median_s": med, "runs_s": results,
                "phases_median_s": {k: statistics.median(v) for k, v in phases.items()},
            }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
