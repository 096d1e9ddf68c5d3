"""Torch vs ONNX on a deep SE-ResNet-50 PSPNet: float32 rounding or a lowering difference?

    python tools/se_pspnet_precision.py [--size 473] [--seed 0] [--blocks all|N] [--json OUT]

Builds the net from ``../shared/zoo/pspnet50_ade20k`` (PSPNet's dilated ResNet-50, fork ``BN``,
pyramid pooling, ``Interp``) with a squeeze-excitation branch in every residual block, as
SENet's Caffe models write it (global AVE pooling -> 1x1 conv ``fc<s>_<b>/sqz`` (C/16) -> ReLU
-> 1x1 conv ``fc<s>_<b>/exc`` (C) -> Sigmoid, in place -> ``Axpy(exc, branch, shortcut)`` in place
of the block's Eltwise sum) and a ``Softmax`` ``prob`` at the end; random weights from the
fillers (seeded; BN mean 0, variance 1, as ``surgery convert`` gives them).

Then runs our two exports in float32 (PyTorch, onnxruntime CPU) and the numpy reference of
``surgery/export/reference.py`` in float64 from input to output (``surgery verify --backends
reference64``), and prints for each backend and blob:

* global error: ``max|backend - reference64| / max|reference64|``, what ``verify`` reports;
* local error: the same layer run by the float64 reference on *the backend's own inputs*,
  against the backend's output. A lowering that computes Caffe's function has a local error at
  float32 rounding (~1e-7 relative, more for long sums); a wrong lowering shows up at once in
  its own layer, whatever the depth.

Prints the worst local error per layer type, the global error at the first excitation, at each
stage's last block and at ``prob``, and the growth of the torch-vs-ONNX difference with depth.
Figures measured with it are in the README (``Export and verify``). Not run in the real Caffe:
the reference build has neither the fork's ``BN`` nor ``Axpy`` nor ``Interp``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
ZOO_NET = ROOT.parent / "shared" / "zoo" / "pspnet50_ade20k" / "pspnet50_ADE20K_473.prototxt"

_SE = """
layer {{ name: "fc{sb}/pool" type: "Pooling" bottom: "{branch}" top: "fc{sb}/pool"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc{sb}/sqz" type: "Convolution" bottom: "fc{sb}/pool" top: "fc{sb}/sqz"
  convolution_param {{ num_output: {squeeze} kernel_size: 1 weight_filler {{ type: "msra" }}
  bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "fc{sb}/sqz/relu" type: "ReLU" bottom: "fc{sb}/sqz" top: "fc{sb}/sqz" }}
layer {{ name: "fc{sb}/exc" type: "Convolution" bottom: "fc{sb}/sqz" top: "fc{sb}/exc"
  convolution_param {{ num_output: {channels} kernel_size: 1 weight_filler {{ type: "msra" }}
  bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "fc{sb}/exc/sigmoid" type: "Sigmoid" bottom: "fc{sb}/exc" top: "fc{sb}/exc" }}
layer {{ name: "{name}" type: "Axpy" bottom: "fc{sb}/exc" bottom: "{branch}" bottom: "{short}"
  top: "{top}" }}
"""


def build(size: int = 473, blocks: int | None = None) -> Any:
    """The SE-PSPNet (no weights): SE in the first ``blocks`` residual blocks (all if None)."""
    import surgery

    base = surgery.load(ZOO_NET)
    from surgery.dataflow import resolve
    from surgery.net import NetState
    from surgery.shapes import infer

    flow = resolve(base, NetState("TEST"))
    info = infer(flow, {"data": (1, 3, size, size)}, check_weights=False)
    channels = {v.name: info.shape(v)[1] for n in flow.nodes for v in n.outputs
                if info.shape(v) is not None and len(info.shape(v)) == 4}
    layers = []
    done = 0
    with tempfile.TemporaryDirectory() as tmp:
        for lay in base.layers:
            if (lay.type == "Eltwise" and len(lay.bottoms) == 2
                    and lay.bottoms[1].endswith("_1x1_increase")
                    and (blocks is None or done < blocks)):
                short, branch = lay.bottoms
                sb = lay.name.replace("conv", "", 1)
                c = channels[branch]
                text = _SE.format(sb=sb, branch=branch, short=short, name=lay.name,
                                  top=lay.tops[0], channels=c, squeeze=max(c // 16, 1))
                part = Path(tmp) / f"se{done}.prototxt"
                part.write_text(text)
                layers += surgery.load(part).layers
                done += 1
                continue
            layers.append(lay)
    net = base.copy()
    net.layers = layers
    last = layers[-1].tops[0]
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "prob.prototxt"
        part.write_text(f'layer {{ name: "prob" type: "Softmax" bottom: "{last}" '
                        'top: "prob" }\n')
        net.layers.append(surgery.load(part).layers[0])
    for lay in net.layers:
        if lay.type == "Input":
            lay.attrs = {**lay.attrs, "shape": [{"dim": [1, 3, size, size]}]}
    return net


def fill(net: Any, seed: int) -> None:
    """Random weights from the fillers, in place (BN mean 0, variance 1)."""
    from surgery.convert import fill_random
    from surgery.dataflow import resolve
    from surgery.net import NetState
    from surgery.shapes import infer

    flow = resolve(net, NetState("TEST"))
    fill_random(net, flow, infer(flow, check_weights=False), seed)


def _stream_reference(net: Any, feed: Mapping[str, np.ndarray], visit: Any) -> None:
    """:func:`surgery.export.reference.run_net`, one blob at a time: ``visit(key, float64
    array)`` for each top, each array dropped once its last reader ran (every float64 blob of
    this net at once is ~8 GB)."""
    from surgery.export.common import plan
    from surgery.export.reference import forward64, supported_types

    p = plan(net, "TEST", supported=supported_types(), infer_shapes=False)
    readers: dict[int, int] = {}
    for node in p.nodes:
        for v in node.inputs:
            readers[id(v)] = readers.get(id(v), 0) + 1
    env = {id(v): np.asarray(feed[v.name], np.float64) for v in p.inputs}
    for node in p.nodes:
        xs = [env[id(v)] for v in node.inputs]
        for v in node.inputs:
            readers[id(v)] -= 1
            if readers[id(v)] == 0:
                del env[id(v)]
        for v, t in zip(node.outputs, forward64(node.layer, xs), strict=True):
            visit(v.name if p.flow.latest(v.name) is v else f"{v.name}@{node.layer.name}", t)
            if readers.get(id(v), 0):
                env[id(v)] = t


def local_errors(net: Any, got: Mapping[str, np.ndarray], feed: Mapping[str, np.ndarray]
                 ) -> dict[str, tuple[str, float]]:
    """Per layer: (type, rel error of the backend's output against the float64 reference of
    that layer run on the backend's own inputs)."""
    from surgery.export.common import plan
    from surgery.export.reference import forward64, supported_types

    p = plan(net, "TEST", supported=supported_types(), infer_shapes=False)
    env: dict[int, np.ndarray] = {}
    for v in p.inputs:
        env[id(v)] = np.asarray(feed[v.name], np.float64)

    def key(v: Any, node: Any) -> str:
        return v.name if p.flow.latest(v.name) is v else f"{v.name}@{node.layer.name}"

    out: dict[str, tuple[str, float]] = {}
    for node in p.nodes:
        xs = [env[id(v)] for v in node.inputs]
        want = forward64(node.layer, xs)
        for v, w in zip(node.outputs, want, strict=True):
            mine = np.asarray(got[key(v, node)], np.float64).reshape(w.shape)
            env[id(v)] = mine
            scale = float(np.abs(w).max()) or 1.0
            out[key(v, node)] = (node.layer.type, float(np.abs(mine - w).max()) / scale)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).reshape(b.shape)
    return float(np.abs(a - b).max() / (np.abs(b).max() or 1.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=473, help="input H = W (>= 473: PSP pooling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=None, help="SE in the first N blocks only")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args(argv)

    from surgery.export.onnx import run_onnx, to_onnx
    from surgery.export.torch import run_blobs, to_torch

    t0 = time.time()
    net = build(args.size, args.blocks)
    fill(net, args.seed)
    x = np.random.default_rng(args.seed).standard_normal((1, 3, args.size, args.size))
    feed = {"data": x.astype(np.float32)}
    shapes = {"data": feed["data"].shape}
    print(f"net: {sum(1 for lay in net.layers if lay.type == 'Axpy')} SE blocks, "
          f"{len(net.layers)} layers, input 1x3x{args.size}x{args.size}", flush=True)
    results: dict[str, dict[str, np.ndarray]] = {}
    t = time.time()
    results["torch"] = run_blobs(to_torch(net, input_shapes=shapes, keep_blobs=True), feed)
    print(f"torch: {time.time() - t:.1f} s", flush=True)
    t = time.time()
    results["onnxruntime"] = run_onnx(to_onnx(net, input_shapes=shapes, expose_blobs=True), feed)
    print(f"onnxruntime: {time.time() - t:.1f} s", flush=True)
    t = time.time()
    rows: dict[str, dict[str, float]] = {}
    kept: dict[str, np.ndarray] = {}

    def visit(key: str, value: np.ndarray) -> None:  # compare as the reference goes
        rows[key] = {b: _rel(r[key], value) for b, r in results.items() if key in r}
        if key.split("@")[0].endswith("/exc") or key in ("conv6_interp", "prob") or (
                key.startswith(("conv2_", "conv3_", "conv4_", "conv5_")) and key.count("_") == 1):
            kept[key] = value

    _stream_reference(net, feed, visit)
    ref = kept
    print(f"reference64: {time.time() - t:.1f} s", flush=True)
    order = list(rows)
    first_exc = next(k for k in order if k.split("@")[0].endswith("/exc"))
    stage_ends = [k for k in order if k.startswith("conv") and k.count("_") == 1
                  and "@" not in k and k.split("_")[0] in ("conv2", "conv3", "conv4", "conv5")]
    picks = [first_exc] + [max((k for k in stage_ends if k.startswith(f"conv{s}_")),
                               key=lambda k: int(k.split("_")[1]), default=None)
                           for s in (2, 3, 4, 5)] + ["conv6_interp", "prob"]
    picks = [p for p in picks if p]
    figures: dict[str, Any] = {"size": args.size, "seed": args.seed, "blobs": {}}
    for k in order:
        row = rows[k]
        if "torch" in row and "onnxruntime" in row:
            row["torch_vs_onnx"] = _rel(results["torch"][k],
                                        np.asarray(results["onnxruntime"][k], np.float64))
        figures["blobs"][k] = row
    ref = {k: ref[k] for k in picks}  # every float64 blob is ~8 GB: keep the picked ones
    # The torch lowering in float64: the same graph with no float32 rounding anywhere (only
    # the picked blobs are kept: every blob of a 473x473 PSPNet in float64 is ~10 GB).
    import torch

    t = time.time()
    gm64 = to_torch(net, input_shapes=shapes, outputs=picks).double()
    with torch.no_grad():
        out64 = gm64(torch.from_numpy(x))
        # sensitivity: the input moved by float32 rounding (relative 2^-24, random signs)
        eps = np.random.default_rng(args.seed + 1).choice([-1.0, 1.0], x.shape) * 2.0**-24
        moved = gm64(torch.from_numpy(x * (1 + eps)))
    torch64 = {k: v.numpy() for k, v in out64.items()}
    moved64 = {k: v.numpy() for k, v in moved.items()}
    del gm64, out64, moved
    print(f"torch float64 (twice): {time.time() - t:.1f} s", flush=True)
    for k in picks:
        row = figures["blobs"][k]
        row["torch_float64"] = _rel(torch64[k], ref[k])
        row["input_moved_2^-24"] = _rel(moved64[k], torch64[k])
    local = {b: local_errors(net, r, feed) for b, r in results.items()}
    figures["local_worst_by_type"] = {}
    for b, errs in local.items():
        by_type: dict[str, tuple[float, str]] = {}
        for blob, (typ, e) in errs.items():
            if e > by_type.get(typ, (-1.0, ""))[0]:
                by_type[typ] = (e, blob)
        figures["local_worst_by_type"][b] = {t: {"rel": e, "blob": blob}
                                             for t, (e, blob) in sorted(by_type.items())}
    print("\nglobal error against reference64 (max|a-b| / max|ref|):")
    nan = float("nan")
    print(f"{'blob':24} {'torch':>10} {'onnxruntime':>12} {'torch vs onnx':>14} "
          f"{'torch float64':>14} {'input moved 2^-24':>18}")
    for k in picks:
        r = figures["blobs"][k]
        print(f"{k:24} {r['torch']:10.2e} {r['onnxruntime']:12.2e} {r['torch_vs_onnx']:14.2e} "
              f"{r.get('torch_float64', nan):14.2e} {r.get('input_moved_2^-24', nan):18.2e}")
    print("(torch float64: the torch lowering run in float64, against the numpy reference; "
          "input moved: float64 outputs for the input perturbed by float32 rounding)")
    print("\nworst local error per layer type (layer run on the backend's own inputs):")
    for b, by_type in figures["local_worst_by_type"].items():
        worst = sorted(by_type.items(), key=lambda kv: -kv[1]["rel"])
        print(f"  {b}: " + ", ".join(f"{t} {v['rel']:.1e}" for t, v in worst))
    figures["seconds"] = time.time() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
