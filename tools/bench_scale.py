"""Scale benchmark: a chain of N layers through info, freeze, transplant, rename-heads and
export onnx, to show every verb grows linearly with the number of layers.

The net is ``Input (1, 4) -> N x [InnerProduct(4) -> ReLU in place] -> InnerProduct(3) ->
Softmax`` (2N + 3 layers, N + 1 learnable), written with a caffemodel of small random weights.
Each verb runs in-process through ``surgery.cli.main`` (stdout discarded) and is timed on its
own; a verb whose time per layer grows by more than ``--max-ratio`` between the smallest and the
largest size is reported as not linear (exit 1).

Usage::

    python tools/bench_scale.py                  # 1k, 10k, 100k layers
    python tools/bench_scale.py --sizes 1000,20000 --verbs transplant

Prints one row per (verb, size): seconds and microseconds per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from surgery import caffe_io  # noqa: E402
from surgery.cli import main  # noqa: E402

VERBS = {
    "info": ["info", "{net}", "--weights", "{w}"],
    "freeze": ["freeze", "{net}", "--until", "fc{half}", "-o", "{d}/frozen.prototxt"],
    "transplant": ["transplant", "{net}", "--from", "{w}", "-o", "{d}/t.caffemodel"],
    "rename-heads": ["rename-heads", "{net}", "--num-output", "5", "--weights", "{w}",
                     "--out-weights", "{d}/h.caffemodel", "-o", "{d}/h.prototxt"],
    "export onnx": ["export", "onnx", "{net}", "--weights", "{w}", "-o", "{d}/m.onnx"],
}


def chain(n: int) -> str:
    """The prototxt of the benchmark chain with ``n`` hidden InnerProduct layers."""
    parts = ['name: "chain"\nlayer { name: "data" type: "Input" top: "data" '
             "input_param { shape { dim: 1 dim: 4 } } }\n"]
    bottom = "data"
    for i in range(n):
        parts.append(
            f'layer {{ name: "fc{i}" type: "InnerProduct" bottom: "{bottom}" top: "fc{i}" '
            "inner_product_param { num_output: 4 weight_filler { type: \"xavier\" } } }\n"
            f'layer {{ name: "relu{i}" type: "ReLU" bottom: "fc{i}" top: "fc{i}" }}\n')
        bottom = f"fc{i}"
    parts.append(f'layer {{ name: "cls" type: "InnerProduct" bottom: "{bottom}" top: "cls" '
                 "inner_product_param { num_output: 3 } }\n"
                 'layer { name: "prob" type: "Softmax" bottom: "cls" top: "prob" }\n')
    return "".join(parts)


def build(folder: Path, n: int) -> tuple[Path, Path]:
    net_path = folder / f"chain{n}.prototxt"
    net_path.write_text(chain(n))
    net = caffe_io.load(net_path)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        if layer.type == "InnerProduct":
            k = 4
            m = int(layer.attrs["num_output"])
            from surgery.net import Param

            layer.params = [Param(rng.standard_normal((m, k)).astype(np.float32) * 0.5),
                            Param(np.zeros(m, np.float32))]
    w = folder / f"chain{n}.caffemodel"
    caffe_io.save(net, None, w)
    return net_path, w


def run(verb: str, net: Path, w: Path, d: Path, n: int) -> float:
    argv = [a.format(net=net, w=w, d=d, half=n // 2) for a in VERBS[verb]]
    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        rc = main(argv)
    dt = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{verb} on {n} failed with exit {rc}")
    return dt


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="hidden layers per chain (comma-separated)")
    ap.add_argument("--verbs", default=",".join(VERBS), help="verbs to time")
    ap.add_argument("--max-ratio", type=float, default=3.0,
                    help="largest allowed growth of the time per layer")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    verbs = [v.strip() for v in args.verbs.split(",")]
    per_layer: dict[str, list[float]] = {v: [] for v in verbs}
    print(f"{'verb':<13} {'layers':>8} {'seconds':>9} {'us/layer':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for n in sizes:
            net, w = build(d, n)
            layers = 2 * n + 3
            for verb in verbs:
                dt = run(verb, net, w, d, n)
                per_layer[verb].append(dt / layers)
                print(f"{verb:<13} {layers:>8} {dt:>9.2f} {1e6 * dt / layers:>9.1f}",
                      flush=True)
    bad = [v for v, xs in per_layer.items() if len(xs) > 1 and xs[-1] > args.max_ratio * xs[0]]
    if bad:
        print(f"not linear (time per layer grew more than {args.max_ratio}x): {bad}")
        return 1
    print("all linear")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
