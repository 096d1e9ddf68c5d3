"""CLI verbs ``export onnx``, ``export torch``, ``verify`` and ``extract``.

Thin wrappers: load -> export (or run) -> write atomically -> print the report. onnx, torch and
cv2 are imported only inside the verbs that use them, never when this module is imported.
Exit codes: 0 done (verify: every blob within the tolerance), 1 verify found a larger error,
2 bad input (one line on stderr, no output file left behind).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import CliError, add_input_shape_option, emit, ensure_output, input_shapes

__all__ = ["register", "cmd_export_onnx", "cmd_export_torch", "cmd_verify", "cmd_extract"]


def _fill_missing(args: argparse.Namespace, net: Any) -> tuple[Any, list[str]]:
    """``--fill-missing``: draw the layers without weights (:func:`surgery.ops.init_weights`,
    the same values every verb draws for one seed); notes for the report."""
    if not args.fill_missing:
        return net, []
    from ..ops.init import init_weights

    net, report = init_weights(net, seed=args.seed,
                               input_shapes=input_shapes(net, args.input_shape))
    filled = report.data["filled"]
    if not filled:
        return net, ["--fill-missing: every learnable layer has weights"]
    return net, [f"--fill-missing: {len(filled)} layer(s) drawn from their fillers (seed "
                 f"{report.seed}): {', '.join(filled[:8])}" + (" ..." if len(filled) > 8 else "")]


def _fill_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fill-missing", action="store_true",
                   help="draw the learnable layers without weights from their fillers (as "
                   "`surgery init`) instead of refusing them")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for --fill-missing (default: surgery.fillers.DEFAULT_SEED)")


def _preprocess_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "preprocessing", "the steps from RGB images to the net input; default: the TEST data "
        "layer's transform_param (train_val nets). Any of --mean-file/--mean-value/--scale/"
        "--crop-size replaces it (deploy nets)")
    g.add_argument("--mean-file", metavar="M.binaryproto",
                   help="mean image (compute_image_mean's .binaryproto, or .npy), cropped at the "
                   "image's crop offset as Caffe does")
    g.add_argument("--mean-value", metavar="B,G,R", type=_floats,
                   help="mean per channel in the net's order (e.g. 104,117,123), or one value")
    g.add_argument("--scale", type=float, help="factor after the mean (transform_param.scale)")
    g.add_argument("--crop-size", type=_integer, help="centre crop (transform_param.crop_size)")
    g.add_argument("--input-order", type=str.lower, choices=["bgr", "rgb"],
                   help="channel order the net reads (default bgr, Caffe's)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}"
                                         ) from None


def _explicit(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.mean_file, args.mean_value, args.scale,
                                       args.crop_size))


def _spec(args: argparse.Namespace, net: Any, phase: str,
          shapes: dict[str, tuple[int, ...]] | None) -> Any:
    from ..export.preprocess import preprocess_spec

    return preprocess_spec(net, phase, mean_file=args.mean_file, mean_values=args.mean_value,
                           scale=args.scale, crop_size=args.crop_size,
                           input_order=args.input_order, input_shapes=shapes)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """``surgery export onnx``."""
    from ..caffe_io import load

    ensure_output([args.net, args.weights], args.output)
    # the external data file (written beside big models) must not be an input either
    ensure_output([args.net, args.weights], args.output + ".data", what="-o (its .data file)")
    net, filled = _fill_missing(args, load(args.net, args.weights))
    phase = args.phase.upper()
    shapes = input_shapes(net, args.input_shape, phase)
    spec = None
    if args.preprocess:
        spec = _spec(args, net, phase, shapes)
        if spec is None:
            raise CliError("--preprocess: the net has no TEST data layer with a "
                           "transform_param; give the steps with --mean-value/--mean-file, "
                           "--scale, --crop-size, --input-order")
    elif any(v is not None for v in (args.mean_file, args.mean_value, args.scale,
                                      args.crop_size, args.input_order)):
        raise CliError("--mean-file/--mean-value/--scale/--crop-size/--input-order need "
                       "--preprocess rgb255|rgb01 for an ONNX export")
    from ..export.onnx import save_onnx

    model = save_onnx(net, args.output, opset=args.opset, dynamic_batch=args.dynamic_batch,
                      fold_bn=args.fold_bn, input_shapes=shapes, phase=phase,
                      preprocess=spec, pixels=args.preprocess or "rgb255")
    graph = model.graph
    rep = {
        "output": args.output,
        "opset": args.opset,
        "ir_version": model.ir_version,
        "inputs": [i.name for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "nodes": len(graph.node),
        "initializers": len(graph.initializer),
        "notes": filled + [n for n in model.doc_string.splitlines() if n],
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
    from ..errors import SurgeryError
    from ..export.torch import check_export_folder, save_torch

    inputs = [args.net, args.weights]
    try:  # before loading: -o ., a folder with other files or with an input are refused
        check_export_folder(args.output, inputs)
    except SurgeryError as exc:
        raise CliError(f"-o {exc}") from None
    out = Path(args.output)
    net, filled = _fill_missing(args, load(args.net, args.weights))
    phase = args.phase.upper()
    shapes = input_shapes(net, args.input_shape, phase)
    outputs = _blob_list(args.outputs, "--outputs") if args.outputs else None
    skipped = None
    try:
        spec = _spec(args, net, phase, shapes)
    except SurgeryError as exc:
        if _explicit(args):
            raise
        # the train_val's own transform (a mean file not here, a fork's augmentation) must
        # not stop the export: it goes without preprocess(), and says why
        spec, skipped = None, str(exc)
    if spec is not None and args.mean_file is not None:
        inputs.append(args.mean_file)
    save_torch(net, args.output, phase, shapes, detection_output=args.detection_output,
               outputs=outputs, inputs=inputs, preprocess=spec)
    files = sorted(p.name for p in out.iterdir())
    meta = json.loads((out / "caffe_names.json").read_text(encoding="utf-8"))
    pre = [f"preprocess(images) -> {spec.input!r} ({spec.origin}): {'; '.join(spec.steps())}"
           if spec is not None else f"no preprocessing carried ({skipped}); give --mean-file "
           "or --mean-value (and --scale, --crop-size, --input-order) to write preprocess()"
           if skipped else "no preprocessing carried (a deploy net: give "
           "--mean-value/--mean-file, --scale, --crop-size, --input-order to write preprocess())"]
    rep = {"output": args.output, "phase": phase, "files": files, "inputs": meta["inputs"],
           "outputs": meta["outputs"], "notes": filled + meta["notes"] + pre}
    lines = [f"note: {n}" for n in rep["notes"]]
    lines.append(f"wrote {args.output}/: {', '.join(files)}; inputs "
                 f"{', '.join(rep['inputs'])}, outputs {', '.join(rep['outputs'])}")
    emit(rep, "\n".join(lines), args.json)
    return 0


def cmd_import_torch(args: argparse.Namespace) -> int:
    """``surgery import-torch``: trained PyTorch weights back into a caffemodel."""
    from ..caffe_io import load
    from ..export.caffemodel import read_torch_dir, to_caffemodel

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CliError(f"{args.folder}: no such folder (give the folder `surgery export torch` "
                       "wrote)")
    sources = [args.state_dict, args.net, args.weights, folder / "weights.safetensors",
               folder / "net.prototxt", folder / "caffe_names.json"]
    for src in sources:  # this verb has no --in-place
        if src is not None and Path(src).resolve() == Path(args.output).resolve():
            raise CliError(f"-o {args.output} would overwrite the input {src}; choose another "
                           "path")
    ensure_output(sources, args.output)
    net, state, names = read_torch_dir(folder, args.state_dict, args.net)
    if args.weights is not None:  # the layers the export left out keep these weights
        net = load(args.net or folder / "net.prototxt", args.weights)
    if args.bn_factor is not None and not args.bn_factor > 0:
        raise CliError(f"--bn-factor must be positive; got {args.bn_factor}")
    report = to_caffemodel(state, net, args.output, caffe_names=names,
                           bn_factor=args.bn_factor)
    rep = {**report.as_dict(), "output": args.output}
    c = report.data["counts"]
    lines = [f"  left     {e['layer']}: {e['why']}" for e in report.left]
    lines += [f"  note     {n}" for n in report.notes]
    lines.append(f"wrote {args.output}: {c['written']} layer(s) from torch, {c['kept']} kept "
                 f"from the net's weights, {c['left_out']} left out (--json lists every blob)")
    emit(rep, "\n".join(lines), args.json)
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
    phase = args.phase.upper()
    shapes = input_shapes(net, args.input_shape, phase)
    inputs = None
    if args.input is not None:
        inputs = load_inputs(args.input, list(net_input_shapes(net, phase, shapes)))
    report = verify(net, backends=backends, golden=args.golden, inputs=inputs,
                    tolerance=args.tolerance, seed=args.seed, phase=phase,
                    prototxt=args.net, weights=args.weights, input_shapes=shapes)
    emit(report.as_dict(), report.table(), args.json)
    return 0 if report.passed else 1


def cmd_extract(args: argparse.Namespace) -> int:
    """``surgery extract``: blobs of every sample of an input, as one .npz."""
    import sys
    import time

    from ..caffe_io import load
    from ..extract import extract_features, load_inputs, save_features

    ensure_output([args.net, args.weights, args.input], args.output)
    if args.batch is not None and args.batch <= 0:
        raise CliError(f"--batch must be positive; got {args.batch}")
    blobs = _blob_list(args.blobs, "--blobs")
    net = load(args.net, args.weights)
    phase = args.phase.upper()
    shapes = input_shapes(net, args.input_shape, phase)
    inputs = load_inputs(args.input, net, phase, shapes)
    start = time.monotonic()
    last = [start]

    def progress(done: int, total: int) -> None:  # long runs only, at most once a second
        now = time.monotonic()
        if done < total and now - last[0] >= 1.0 or done == total and now - start >= 1.0:
            last[0] = now
            print(f"extract: {done}/{total} samples, {now - start:.1f} s", file=sys.stderr,
                  flush=True)

    feats = extract_features(net, blobs, inputs, batch=args.batch, phase=phase,
                             progress=progress, device=args.device)
    save_features(args.output, feats)
    samples = next(iter(feats.values())).shape[0]
    rep = {"output": args.output, "samples": samples,
           "blobs": {k: list(v.shape) for k, v in feats.items()}}
    text = "\n".join(f"{k}: {'x'.join(map(str, v.shape))}" for k, v in feats.items())
    emit(rep, f"{text}\nwrote {args.output} ({samples} samples)", args.json)
    return 0


def _blob_list(text: str, what: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    if not names:
        raise CliError(f"{what}: give one or more blob names, comma-separated")
    return names


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
    add_input_shape_option(p)
    p.add_argument("--preprocess", choices=["rgb255", "rgb01"],
                   help="put the preprocessing in front of the graph: a new NHWC input 'image' "
                   "of RGB uint8 0-255 (rgb255) or float 0-1 (rgb01) replaces the data input")
    _preprocess_options(p)
    _fill_option(p)
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
    p.add_argument(
        "--outputs", metavar="BLOB[,BLOB]",
        help="return these blobs (Caffe's values after the forward pass: fc7 after an in-place "
        "relu7) as a dict {name: tensor}, always a dict; only the layers they need are exported",
    )
    add_input_shape_option(p)
    _preprocess_options(p)
    _fill_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export_torch)

    p = sub.add_parser(
        "import-torch", help="trained PyTorch weights (an `export torch` folder) to a caffemodel")
    p.add_argument("folder", metavar="TORCH_DIR",
                   help="the folder `surgery export torch` wrote (caffe_names.json, net.prototxt)")
    p.add_argument("--state-dict", metavar="FILE",
                   help="the trained weights: .safetensors, or a torch file read with "
                   "torch.load(weights_only=True) (default TORCH_DIR/weights.safetensors)")
    p.add_argument("--net", metavar="NET.prototxt",
                   help="the definition exported (default TORCH_DIR/net.prototxt)")
    p.add_argument("--weights", metavar="W.caffemodel",
                   help="weights for the layers the torch model does not hold (kept as they "
                   "are), and BatchNorm's factors")
    p.add_argument("--bn-factor", type=float, default=None,
                   help="BatchNorm blob 2 to write (default: the net's factor, else 1)")
    p.add_argument("-o", "--output", required=True, help="W.caffemodel")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_import_torch)

    p = sub.add_parser(
        "extract", help="features: blobs of every sample of an input, to one .npz",
        description="Caffe's extract_features: run the net (its PyTorch export, only the "
        "layers the blobs need) over the samples on the input's first axis and write each "
        "blob's values, Caffe's after the forward pass (fc7 after an in-place relu7).",
    )
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--weights", help="W.caffemodel")
    p.add_argument("--blobs", required=True, metavar="BLOB[,BLOB]",
                   help="blob names (BLOB@LAYER: the version LAYER wrote, before in-place "
                   "layers)")
    p.add_argument("--input", required=True, metavar="X.npy|X.npz|DIR",
                   help="samples on the first axis: .npy (one-input net) or .npz (one array "
                   "per input name); a folder of images needs surgery.data")
    p.add_argument("--batch", type=_integer, default=None,
                   help="samples per forward pass (default: the net's batch size)")
    p.add_argument("-o", "--output", required=True, help="feats.npz (one array per blob)")
    _phase(p)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda; default cpu)")
    add_input_shape_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("verify", help="run the net on several backends and compare every blob")
    p.add_argument("net", help="NET.prototxt")
    p.add_argument("--weights", help="W.caffemodel")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--golden", metavar="DIR",
                     help="golden folder: input.npz, Caffe's outputs.npz/probes.json")
    src.add_argument("--input", metavar="X.npz", help="input arrays by input name")
    p.add_argument("--backends", default="onnxruntime,torch,opencv",
                   help="comma-separated: onnxruntime, torch, opencv, reference64 (the numpy "
                   "reference in float64: no rounding, slow); default onnxruntime,torch,opencv")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative error per blob (default: the golden's, else 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    add_input_shape_option(p)
    _phase(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
