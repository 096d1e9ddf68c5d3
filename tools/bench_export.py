"""Benchmark the exports on VGG16 (../shared/zoo/vgg16_ilsvrc_v1format), in one run.

1. Writes a VGG16 caffemodel with random weights (Caffe's fillers, seeded; there is no
   published VGG16 caffemodel in the zoo) and times reading it back (``surgery.load``).
2. Times the export to PyTorch (``to_torch``) and to ONNX (``to_onnx``, when importable).
3. Times forward+backward of the exported module against a plain ``nn.Sequential`` VGG16
   written the way torchvision writes it, at equal batch, interleaved, median of N;
   target ratio <= 1.05. ``--cuda [--amp]`` runs the same on the GPU (bf16/fp16 autocast).

Usage: ``python tools/bench_export.py [--batch 2] [--size 224] [--iters 3] [--cuda] [--amp]
[--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VGG = ROOT.parent / "shared" / "zoo" / "vgg16_ilsvrc_v1format" / "vgg16.prototxt"


def torchvision_vgg16() -> Any:
    """VGG16 as torchvision builds it (cfg "D"): features, avgpool, classifier."""
    from torch import nn

    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
           512, 512, 512, "M"]
    layers: list[nn.Module] = []
    c = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c = int(v)

    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 1000),
            )

        def forward(self, x: Any) -> Any:
            x = self.features(x)
            x = self.avgpool(x)
            x = x.flatten(1)
            return self.classifier(x)

    return VGG()


def make_weights(out: Path, seed: int) -> float:
    """Fill VGG16 from its fillers and write a caffemodel; returns the write time."""
    import surgery
    from surgery.dataflow import resolve
    from surgery.fillers import fill_layer
    from surgery.net import Param
    from surgery.shapes import infer

    net = surgery.load(VGG)
    info = infer(resolve(net), {"data": (1, 3, 224, 224)}, check_weights=False)
    rng = np.random.default_rng(seed)
    for node, shapes in info.node_params.items():
        if not shapes:
            continue
        blobs = fill_layer(node.layer, shapes, rng)
        if node.layer.type in ("Convolution", "InnerProduct"):  # fillers default to 0
            blobs = [rng.normal(0, np.sqrt(2.0 / np.prod(s[1:])), s).astype(np.float32)
                     if i == 0 else b for i, (b, s) in enumerate(zip(blobs, shapes, strict=True))]
        params = list(node.layer.params) + [Param() for _ in range(len(blobs)
                                                                  - len(node.layer.params))]
        for p, b in zip(params, blobs, strict=True):
            p.data = b
        node.layer.params = params
    t = time.perf_counter()
    surgery.save(net, weights=out)
    return time.perf_counter() - t


def _time(fn: Any, sync: Any) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import surgery
    from surgery.export.torch import to_torch

    res: dict[str, Any] = {"batch": args.batch, "size": args.size, "iters": args.iters,
                           "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vgg16.caffemodel"
        res["write_caffemodel_s"] = make_weights(weights, args.seed)
        res["caffemodel_mb"] = weights.stat().st_size / 2**20
        t = time.perf_counter()
        net = surgery.load(VGG, weights)
        res["read_caffemodel_s"] = time.perf_counter() - t
        shapes = {"data": (args.batch, 3, args.size, args.size)}
        t = time.perf_counter()
        gm = to_torch(net, input_shapes=shapes)
        res["export_torch_s"] = time.perf_counter() - t
        try:
            from surgery.export.onnx import to_onnx

            t = time.perf_counter()
            to_onnx(net, input_shapes=shapes)
            res["export_onnx_s"] = time.perf_counter() - t
        except ImportError as e:
            res["export_onnx_s"] = None
            res["onnx_note"] = str(e)
    devices = ["cpu"] + (["cuda"] if args.cuda and torch.cuda.is_available() else [])
    for dev in devices:
        torch.manual_seed(0)
        ref = torchvision_vgg16().to(dev).train()
        ours = gm.to(dev).train()
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        amp = args.amp and dev == "cuda"

        def step(model: Any, dev: str = dev, amp: bool = amp, x: Any = x) -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                y = model(x)
            y.float().sum().backward()

        for m in (ref, ours):  # warm-up
            step(m)
        t_ref, t_ours = [], []
        for i in range(args.iters):  # interleaved, alternating which goes first
            pair = [(t_ref, ref), (t_ours, ours)]
            for times, m in pair if i % 2 == 0 else pair[::-1]:
                times.append(_time(lambda m=m: step(m), sync))
        key = f"{dev}{'_amp' if amp else ''}"
        res[f"{key}_torchvision_style_s"] = statistics.median(t_ref)
        res[f"{key}_exported_s"] = statistics.median(t_ours)
        res[f"{key}_ratio"] = statistics.median(t_ours) / statistics.median(t_ref)
        gm.to("cpu")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda", action="store_true", help="also run on CUDA when available")
    ap.add_argument("--amp", action="store_true", help="autocast (bf16) on CUDA")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    res = bench(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"VGG16, batch {args.batch}, {args.size}x{args.size}, torch {res['torch']}, "
          f"{res['threads']} threads, median of {args.iters}")
    print(f"{'what':44s} {'seconds':>10s}")
    rows = [
        (f"write caffemodel ({res['caffemodel_mb']:.0f} MB)", res["write_caffemodel_s"]),
        ("read caffemodel (surgery.load)", res["read_caffemodel_s"]),
        ("export to torch (to_torch)", res["export_torch_s"]),
        ("export to ONNX (to_onnx)", res["export_onnx_s"]),
    ]
    for key in [k[: -len("_ratio")] for k in res if k.endswith("_ratio")]:
        rows += [
            (f"{key} fwd+bwd torchvision-style nn.Sequential", res[f"{key}_torchvision_style_s"]),
            (f"{key} fwd+bwd exported GraphModule", res[f"{key}_exported_s"]),
        ]
    for name, v in rows:
        print(f"{name:44s} {f'{v:.3f}' if v is not None else 'n/a':>10s}")
    for key in [k for k in res if k.endswith("_ratio")]:
        print(f"{key:44s} {res[key]:10.3f}  (target <= 1.05)")
    if res["export_onnx_s"] is not None:
        read = res["read_caffemodel_s"]
        print(f"{'export torch / read':44s} {res['export_torch_s'] / read:10.2f}")
        print(f"{'export onnx / read':44s} {res['export_onnx_s'] / read:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
