"""CLI verbs ``export onnx``, ``export torch`` and ``verify``.

Thin wrappers: load -> export (or run) -> write atomically -> print the report. onnx, torch and
cv2 are imported only inside the verbs that use them, never when this module is imported.
Exit codes: 0 done (verify: every blob within the tolerance), 1 verify found a larger error,
2 bad input (one line on stderr, no output file left behind).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import CliError, emit, ensure_output

__all__ = ["register", "parse_input_shapes", "cmd_export_onnx", "cmd_export_torch",
           "cmd_verify"]


def parse_input_shapes(values: list[str] | None) -> dict[str, list[int]] | None:
    """``["data=1,3,224,224", ...]`` -> ``{"data": [1, 3, 224, 224]}``.

    A value without ``name=`` is stored under ``""`` (the net's only input).

    Raises:
        CliError: a malformed value.
    """
    if not values:
        return None
    shapes: dict[str, list[int]] = {}
    for text in values:
        name, _, dims = text.rpartition("=")
        try:
            shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            shape = []
        if not shape or any(d <= 0 for d in shape):
            raise CliError(f"--input-shape must be NAME=N,C,H,W with positive sizes; "
                           f"got {text!r}")
        shapes[name.strip()] = shape
    return shapes


def _bind_shapes(net: Any, shapes: dict[str, list[int]] | None, phase: str
                 ) -> dict[str, list[int]] | None:
    """Give a bare ``N,C,H,W`` to the only input; refuse names that are not inputs."""
    if not shapes:
        return shapes
    from ..dataflow import resolve
    from ..layers import is_data
    from ..net import NetState

    flow = resolve(net, NetState(phase))
    inputs = [t for n in flow.nodes if n.layer.type == "Input" or is_data(n.layer)
              for t in n.layer.tops]
    if "" in shapes:
        if len(inputs) != 1:
            raise CliError(f"--input-shape without a name needs a net with one input; this "
                           f"one has {inputs}: write NAME=N,C,H,W")
        shapes = {**{k: v for k, v in shapes.items() if k}, inputs[0]: shapes[""]}
    unknown = [k for k in shapes if k not in inputs]
    if unknown:
        raise CliError(f"--input-shape names {unknown}, which are not inputs of the net "
                       f"(inputs: {inputs})")
    return shapes


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """``surgery export onnx``."""
    from ..caffe_io import load

    ensure_output([args.net, args.weights], args.output)
    net = load(args.net, args.weights)
    phase = args.phase.upper()
    shapes = _bind_shapes(net, parse_input_shapes(args.input_shape), phase)
    from ..export.onnx import save_onnx

    model = save_onnx(net, args.output, opset=args.opset, dynamic_batch=args.dynamic_batch,
                      fold_bn=args.fold_bn, input_shapes=shapes, phase=phase)
    graph = model.graph
    rep = {
        "output": args.output,
        "opset": args.opset,
        "ir_version": model.ir_version,
        "inputs": [i.name for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "nodes": len(graph.node),
        "initializers": len(graph.initializer),
        "notes": [n for n in model.doc_string.splitlines() if n],
    }
    lines = [f"note: {n}" for n in rep["notes"]]
    lines.append(f"wrote {args.output}: opset {args.opset}, IR {model.ir_version}, "
                 f"{rep['nodes']} nodes, inputs {', '.join(rep['inputs'])}, "
                 f"outputs {', '.join(rep['outputs'])}")
    emit(rep, "\n".join(lines), args.json)
    return 0


def cmd_export_torch(args: argparse.Namespace) -> int:
    """``surgery export torch``."""
    from ..caffe_io import load

    ensure_output([args.net, args.weights], args.output)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CliError(f"-o {args.output} exists and is not a folder")
    net = load(args.net, args.weights)
    from ..export.torch import save_torch

    save_torch(net, args.output, args.phase.upper(), detection_output=args.detection_output)
    files = sorted(p.name for p in out.iterdir())
    rep = {"output": args.output, "phase": args.phase.upper(), "files": files}
    emit(rep, f"wrote {args.output}/: {', '.join(files)}", args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``surgery verify``: 0 when every blob is within the tolerance, else 1."""
    from ..caffe_io import load
    from ..verify import BACKENDS, load_inputs, net_input_shapes, verify

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise CliError(f"--backends: unknown {unknown or args.backends!r}; choose from "
                       f"{','.join(BACKENDS)}")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise CliError(f"--tolerance must be >= 0; got {args.tolerance}")
    if args.golden is not None and not Path(args.golden).is_dir():
        raise CliError(f"--golden {args.golden}: no such folder")
    net = load(args.net, args.weights)
    inputs = None
    if args.input is not None:
        inputs = load_inputs(args.input, list(net_input_shapes(net, args.phase.upper())))
    report = verify(net, backends=backends, golden=args.golden, inputs=inputs,
                    tolerance=args.tolerance, seed=args.seed, phase=args.phase.upper(),
                    prototxt=args.net, weights=args.weights)
    emit(report.as_dict(), report.table(), args.json)
    return 0 if report.passed else 1


def _phase(p: argparse.ArgumentParser, default: str = "test") -> None:
    p.add_argument("--phase", default=default, type=str.lower, choices=["train", "test"],
                   help=f"the phase to export (default {default})")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def register(sub: Any) -> None:
    """Add ``export onnx``, ``export torch`` and ``verify`` to the ``surgery`` parser."""
    exp = sub.add_parser("export", help="export to ONNX or PyTorch (numerically equal to Caffe)")
    targets = exp.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True

    p = targets.add_parser("onnx", help="write an ONNX model (onnxruntime CPU/CUDA)")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--weights", help="W.caffemodel")
    p.add_argument("-o", "--output", required=True, help="model.onnx")
    _phase(p)
    p.add_argument("--opset", type=_integer, default=17, help="ONNX opset, 13..21 (default 17)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch axis (N)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm (+Scale) into the convolution before it")
    p.add_argument("--input-shape", action="append", metavar="NAME=N,C,H,W",
                   help="override an input's shape (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export_onnx)

    p = targets.add_parser("torch", help="write model.py, weights.safetensors, caffe_names.json")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--weights", help="W.caffemodel")
    p.add_argument("-o", "--output", required=True, help="output folder")
    _phase(p)
    p.add_argument(
        "--detection-output", action="store_true",
        help="SSD nets: include DetectionOutput (decode + NMS) instead of stopping before it",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export_torch)

    p = sub.add_parser("verify", help="run the net on several backends and compare every blob")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--weights", help="W.caffemodel")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--golden", metavar="DIR",
                     help="golden folder: input.npz, Caffe's outputs.npz/probes.json")
    src.add_argument("--input", metavar="X.npz", help="input arrays by input name")
    p.add_argument("--backends", default="onnxruntime,torch,opencv",
                   help="comma-separated: onnxruntime, torch, opencv (default all)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error per blob (default: the golden's, else 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    _phase(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
