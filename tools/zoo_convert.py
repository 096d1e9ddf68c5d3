"""Batch conversion of many Caffe nets to ONNX and PyTorch, each checked blob by blob.

    python tools/zoo_convert.py [PATH ...] [-o OUT] [--only GLOB] [--input-shape [NET:]NAME=N,C,H,W]
        [--json OUT.json] [--caffe /tmp/refcaffe/pycaffe] [--tolerance 1e-4] [--seed 0]

PATH: prototxt files or folders (searched recursively); default: every net definition under
``../shared/zoo``. A folder search keeps the *deploy-like* nets (an ``Input`` layer or ``input:``
fields) and the train_val/test nets, which are exported in TEST with their dataset layers as
inputs (shapes from :func:`surgery.shapes.guess_dataset_shapes`, ``--input-shape``, or -- for a
data top nothing describes, such as FCN's Python data layers -- ``1 x C x 224 x 224`` with C
from the first convolution reading it).

For each net:

1. Weights: a ``.caffemodel`` beside the definition whose layer names cover the learnable
   layers (the best match wins); else, and for layers it lacks, random values from Caffe's
   fillers (:mod:`surgery.fillers`, seeded) -- except that a weight or bias filler left at
   constant 0 becomes gaussian std 0.01 (all-zero weights compare nothing), and BatchNorm gets
   mean 0, variance 1, factor 1.
2. Input: seeded standard-normal values; the batch is cut to 2 (1 for nets of more than
   2 GMAC per image), spatial sizes are kept unless ``--input-shape`` says otherwise.
3. Export: ``OUT/NAME/model.onnx`` (:func:`surgery.export.onnx.save_onnx`), ``OUT/NAME/torch/``
   (:func:`surgery.export.torch.save_torch`), and the files OpenCV and Caffe read:
   ``OUT/NAME/net.prototxt`` (a train_val net made deploy with :func:`surgery.ops.to_deploy`,
   Input shapes set to the fed ones) and ``OUT/NAME/weights.caffemodel``.
4. Run onnxruntime and torch with every blob exposed and compare every common blob; run
   OpenCV 4.x (``cv2.dnn.readNetFromCaffe`` on the saved files, an implementation independent of
   ours) and compare every blob it gives per layer; with ``--caffe PYCAFFE``, run the real Caffe
   in a subprocess (the wrapper runs the system python; arrays go through ``.npz`` files) and
   compare every blob too. The generated ``torch/model.py`` is run once and must equal the
   in-memory module on the outputs.

The table's ``weights`` column says what the comparison ran on: the caffemodel's file name,
``FILE + N random`` when N learnable layers were not in it (a renamed head: they are listed under
the table, so an ``ok`` never hides a head compared on random values), ``random`` (no matching
caffemodel, or ``--random-weights``), or ``none needed``.

Status per net: ``ok``; ``unsupported: <types>`` (our exporters' one error naming every layer
they cannot lower); ``mismatch: <backend> <blob> rel <err>`` (a blob above the tolerance);
``error: <message>`` (our code failed). A reference that cannot read or run a net (OpenCV has
no Interp, ShuffleChannel...) is noted in the row, not counted against it. Exit status 1 when
any net mismatches or errors.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ZOO = (ROOT.parent / "shared" / "zoo").resolve()
DEFAULT_TOLERANCE = 1e-4
DEFAULT_SIZE = 64  # H = W of a data top nothing describes
FALLBACK_SIZES = (DEFAULT_SIZE, 28, 32, 224, 227, 299)  # MNIST, CIFAR, ImageNet
BIG_MACS = 2e9  # per image: above it, batch 1
BIG_PARAMS = 120e6  # random weights above it: a smaller input (shrink_for_random_weights)
Shape = tuple[int, ...]


# -- results ------------------------------------------------------------------------------------
@dataclass
class Result:
    """One net's row of the table."""

    name: str
    path: str
    layers: int = 0
    status: str = "error"
    weights: str = ""  # the caffemodel used, or "random"
    random_layers: list[str] = field(default_factory=list)  # learnable layers given random blobs
    inputs: dict[str, list[int]] = field(default_factory=dict)
    torch_vs_onnx: float | None = None  # worst relative error over common blobs
    vs_opencv: float | None = None  # worst of onnxruntime/torch vs OpenCV
    vs_caffe: float | None = None
    compared: dict[str, int] = field(default_factory=dict)  # backend pair -> blobs compared
    worst: dict[str, str] = field(default_factory=dict)  # backend pair -> worst blob
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status.startswith(("mismatch", "error"))


# -- discovery ----------------------------------------------------------------------------------
def _is_net_text(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return ("layer {" in text or "layers {" in text or "layer{" in text
            or "layers{" in text) and "base_lr" not in text


def discover(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Net definitions under ``paths`` (files kept as given; folders searched, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*.prototxt")) if _is_net_text(f))
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def net_name(path: Path, base: Path | None = None) -> str:
    """``folder/stem``: the row name and the output sub-folder."""
    path = path.resolve()
    if base is not None:
        try:
            return str(path.relative_to(base.resolve()).with_suffix(""))
        except ValueError:
            pass
    return f"{path.parent.name}/{path.stem}"


# -- weights ------------------------------------------------------------------------------------
def _learnable_names(net: Any) -> set[str]:
    from surgery.ops._common import learnable_count

    return {lay.name for lay in net.layers if learnable_count(lay) > 0}


def matching_caffemodel(net: Any, folder: Path) -> tuple[Path | None, str]:
    """The caffemodel in ``folder`` covering the most learnable layers of ``net`` by name
    (at least half of them), and a note on the others."""
    from surgery.caffe_io import read_weights
    from surgery.errors import SurgeryError

    want = _learnable_names(net)
    best: tuple[int, Path | None] = (0, None)
    notes = []
    for f in sorted(folder.glob("*.caffemodel")):
        try:
            wf = read_weights(f)
        except SurgeryError as exc:
            notes.append(f"{f.name} unreadable: {exc}")
            continue
        names = {r.name for r in wf.layers if r.blobs and not r.is_split}
        hit = len(want & names)
        if hit > best[0]:
            best = (hit, f)
    if best[1] is not None and best[0] * 2 >= max(len(want), 1):
        return best[1], "; ".join(notes)
    return None, "; ".join(notes)


def sweep_fillers(layer: Any) -> list[dict[str, Any]]:
    """Caffe's fillers for ``layer`` with all-zero weight/bias fillers made gaussian 0.01."""
    from surgery.fillers import layer_fillers

    out = []
    for f in layer_fillers(layer):
        f = dict(f)
        if f.get("type", "constant") == "constant" and float(f.get("value", 0.0)) == 0.0:
            f = {"type": "gaussian", "std": 0.01}
        out.append(f)
    return out


def fill_random(net: Any, flow: Any, info: Any, seed: int) -> list[str]:
    """Random blobs for every learnable layer of ``flow`` without weights (in place on
    ``net``); TRAIN/TEST twins share them. Returns the names filled."""
    from surgery.fillers import fill
    from surgery.net import Param
    from surgery.ops._common import learnable_count

    rng = np.random.default_rng(seed)
    filled = []
    shared: dict[str, np.ndarray] = {}
    for node in flow.nodes:
        lay = node.layer
        n = learnable_count(lay)
        if n == 0 or any(t.has_weights for t in net.layers_named(lay.name)):
            continue
        try:
            known = info.params(node)
        except KeyError:
            known = None
        if not known or len(known) < n or any(s is None for s in known[:n]):
            continue  # downstream of an unknown shape: not exported anyway
        shapes = [tuple(int(d) for d in s) for s in known][:n]
        if lay.type == "BatchNorm":  # mean 0, variance 1, factor 1
            blobs = [np.zeros(shapes[0], np.float32), np.ones(shapes[1], np.float32),
                     np.ones(shapes[2], np.float32)]
        else:
            fillers = sweep_fillers(lay)
            blobs = [fill(fillers[i] if i < len(fillers) else {"type": "gaussian", "std": 0.01},
                          s, rng) for i, s in enumerate(shapes)]
            if lay.type == "BN" and len(blobs) == 4:  # PSPNet's stored variance: 1
                blobs[3] = np.ones(shapes[3], np.float32)
        for i, b in enumerate(blobs):  # blobs shared by param name are one blob in Caffe
            key = lay.params[i].name if i < len(lay.params) else None
            if key and key in shared and shared[key].shape == b.shape:
                blobs[i] = shared[key]
            elif key:
                shared[key] = b
            b.setflags(write=False)
        for twin in net.layers_named(lay.name):
            twin.params = list(twin.params[:len(blobs)])
            while len(twin.params) < len(blobs):
                twin.params.append(Param())
            for p, b in zip(twin.params, blobs, strict=True):
                p.data = b
        filled.append(lay.name)
    return filled


# Input shapes the zoo's definitions cannot tell (HDF5/Python data layers), by net-name glob.
ZOO_SHAPES: dict[str, dict[str, Shape]] = {
    "*hdf5_classification/*": {"data": (2, 4)},  # the 4-feature sklearn toy set
    "*siamese/mnist_siamese_train_test": {"pair_data": (2, 2, 28, 28)},
    "*/mnist_autoencoder": {"data": (2, 1, 28, 28)},
}
# Stages tried, in order, when the plain TEST net does not resolve (DIGITS: train/val/deploy).
STAGES = ("deploy", "val", "test", "test-on-test")


def known_shapes(name: str) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for glob, shapes in ZOO_SHAPES.items():
        if fnmatch.fnmatch(name, glob):
            out.update(shapes)
    return out


def test_net(net: Any) -> tuple[Any, str]:
    """``net`` when its TEST net resolves; else the TEST net of the first stage in
    :data:`STAGES` (then any stage the rules name) that resolves, with its layers' rules
    removed (a plain net); and the stage used ('' for none).

    Raises:
        SurgeryError: no state resolves (the TEST error).
    """
    from surgery.dataflow import resolve
    from surgery.errors import SurgeryError
    from surgery.net import Net, NetState

    try:
        resolve(net, NetState("TEST"))
        return net, ""
    except SurgeryError as exc:
        first = exc
    named = [s for lay in net.layers for r in (*lay.include, *lay.exclude)
             for s in (*r.stage, *r.not_stage)]
    for stage in dict.fromkeys([*STAGES, *named]):
        state = NetState("TEST", stages=(stage,))
        try:
            layers = [lay.copy() for lay in net.layers if lay.is_included(state)]
        except SurgeryError:
            continue
        for lay in layers:
            lay.include, lay.exclude = [], []
        flat = Net(net.name, layers, dict(net.extra), net.source, list(net.upgrades),
                   net.weights_source)
        flat.extra.pop("state", None)
        try:
            resolve(flat, NetState("TEST"))
        except SurgeryError:
            continue
        return flat, stage
    raise first


# -- inputs -------------------------------------------------------------------------------------
def _data_sources(flow: Any) -> list[Any]:
    from surgery.layers import is_data

    return [n for n in flow.nodes
            if n.layer.type == "Input" or is_data(n.layer)
            or (n.layer.type in ("DummyData", "MemoryData") and not n.layer.bottoms)]


def choose_input_shapes(net: Any, given: Mapping[str, Sequence[int]] | None = None,
                        ) -> tuple[dict[str, Shape], list[str]]:
    """The shapes fed to the net's inputs, and notes on how they were chosen.

    ``given`` wins; then the Input layers' shapes; then dataset layers' parameters
    (:func:`surgery.shapes.guess_dataset_shapes`); then ``1 x C x 224 x 224`` for a data top
    read by a convolution (C from its weights, else 3). Batches are cut (module docstring).
    """
    from surgery.dataflow import resolve
    from surgery.net import NetState
    from surgery.shapes import guess_dataset_shapes, infer

    flow = resolve(net, NetState("TEST"))
    given = {k: tuple(int(d) for d in v) for k, v in (given or {}).items()}
    notes: list[str] = []
    guessed, why = guess_dataset_shapes(flow, given)
    shapes: dict[str, Shape] = {}
    info0 = infer(flow, {**guessed, **given}, check_weights=False)
    from surgery.export.common import plan
    from surgery.verify import _ALL_TYPES

    fed = {v.name for v in plan(net, "TEST", supported=_ALL_TYPES, infer_shapes=False,
                               lower_losses=False).inputs}
    for src in _data_sources(flow):
        for v in src.outputs:
            if v.name in given:
                shapes[v.name] = given[v.name]
                continue
            if v.name not in fed:
                continue
            shape = info0.shape(v)
            if shape is None:
                shape = _fallback_shape(flow, v, {**guessed, **given})
                if shape is None:
                    raise _UnknownInput(f"the shape of input {v.name!r} is unknown; give "
                                        f"--input-shape {v.name}=N,C,H,W")
                notes.append(f"{v.name}: assumed {'x'.join(map(str, shape))}")
            elif v.name in why:
                notes.append(why[v.name].split(";")[0])
            shapes[v.name] = tuple(int(d) for d in shape)
    # batch: 2 (1 for big nets), unless given
    free = [k for k in shapes if k not in given and len(shapes[k]) > 1 and shapes[k][0] > 1]
    if free:
        per_image = {k: (1, *shapes[k][1:]) for k in free}
        trial = {**shapes, **per_image}
        try:
            macs = infer(flow, trial, check_weights=False).total_macs
        except Exception:  # noqa: BLE001 -- a net whose batch cannot change keeps it
            return shapes, notes
        batch = 1 if macs > BIG_MACS else 2
        cut = {k: (min(batch, shapes[k][0]), *shapes[k][1:]) for k in free}
        try:
            infer(flow, {**shapes, **cut}, check_weights=False)
        except Exception:  # noqa: BLE001
            notes.append("batch kept: the net does not infer with a smaller one")
            return shapes, notes
        shapes.update(cut)
    return shapes, notes


class _UnknownInput(Exception):
    """An input shape nothing tells (the net is skipped, asking for --input-shape)."""


def shrink_for_random_weights(net: Any, shapes: dict[str, Shape], given: Mapping[str, Any]
                              ) -> tuple[dict[str, Shape], str]:
    """Smaller H, W (steps of 3/4, while the net stays valid) for a net whose random weights
    would exceed :data:`BIG_PARAMS` because an InnerProduct reads a large plane (the V0
    upgrade tests' 290M-weight ip layer). Shapes in ``given`` are kept."""
    from surgery.dataflow import resolve
    from surgery.net import NetState
    from surgery.shapes import infer

    flow = resolve(net, NetState("TEST"))

    def params(s: Mapping[str, Shape]) -> int:
        info = infer(flow, s, check_weights=False)
        return sum(math.prod(p) for n in flow.nodes for p in info.params(n) if p is not None)

    start = params(shapes)
    current = dict(shapes)
    while params(current) > BIG_PARAMS:
        trial = {k: (*v[:2], max(1, v[2] * 3 // 4), max(1, v[3] * 3 // 4))
                 if len(v) == 4 and k not in given else v for k, v in current.items()}
        if trial == current:
            break
        try:
            params(trial)
        except Exception:  # noqa: BLE001 -- the smaller input is not valid: stop there
            break
        current = trial
    if current == shapes:
        return shapes, ""
    return current, (f"input cut to {', '.join('x'.join(map(str, v)) for v in current.values())}"
                     f" for random weights ({start / 1e6:.0f}M -> "
                     f"{params(current) / 1e6:.0f}M parameters)")


def _fallback_shape(flow: Any, value: Any, known: Mapping[str, Shape]) -> Shape | None:
    """``1 x C x S x S`` for a data top read by a convolution: C from its weights (else 3);
    S the first of :data:`FALLBACK_SIZES` the loaded weights accept (an InnerProduct's
    input size fixes it), else :data:`DEFAULT_SIZE`."""
    from surgery.shapes import infer

    for consumer, _ in flow.consumers(value):
        lay = consumer.layer
        if lay.type in ("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution"):
            channels = 3
            if lay.params and lay.params[0].data is not None and lay.params[0].data.ndim == 4:
                channels = int(lay.params[0].data.shape[1]) * int(lay.attrs.get("group", 1))
            for size in FALLBACK_SIZES:
                shape = (1, channels, size, size)
                try:
                    infer(flow, {**known, value.name: shape}, check_weights=True)
                except Exception:  # noqa: BLE001 -- not this size
                    continue
                return shape
            return (1, channels, DEFAULT_SIZE, DEFAULT_SIZE)
    return None


def random_feed(shapes: Mapping[str, Shape], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


# -- the definition the references read -----------------------------------------------------------
def reference_net(net: Any, shapes: Mapping[str, Shape]) -> Any:
    """``net`` as a deploy net whose Input layers have ``shapes`` (what OpenCV/Caffe read)."""
    from surgery.dataflow import resolve
    from surgery.net import NetState
    from surgery.ops import to_deploy

    flow = resolve(net, NetState("TEST"))
    if any(n.layer.type != "Input" for n in _data_sources(flow)):
        net = to_deploy(net, {k: list(v) for k, v in shapes.items()})[0]
    out = net.copy()
    for lay in out.layers:
        if lay.type == "Input":
            old = list(lay.attrs.get("shape", []))
            dims = []
            for i, top in enumerate(lay.tops):
                if top in shapes:
                    dims.append({"dim": [int(d) for d in shapes[top]]})
                else:
                    dims.append(old[min(i, len(old) - 1)] if old else {"dim": []})
            lay.attrs = {**lay.attrs, "shape": dims}
    return out


# -- comparison ---------------------------------------------------------------------------------
def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max|got - want| / max|want|`` (inf for a size mismatch or a new non-finite value)."""
    from surgery.verify import compare

    return compare(got, want)[1]


def compare_all(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                skip: Sequence[str] = ()) -> tuple[int, float, str]:
    """Blobs compared, the worst relative error and its blob, over the common names."""
    worst, where, n = 0.0, "", 0
    for name in want:
        if name in skip or name not in got:
            continue
        err = rel_error(got[name], want[name])
        n += 1
        if not err <= worst:
            worst, where = err, name
    return n, worst, where


# -- backends -----------------------------------------------------------------------------------
def run_opencv(prototxt: Path, weights: Path, flow: Any, feed: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
    """Every blob OpenCV computes, under our names (``blob`` for the last version of a name,
    ``blob@layer`` for an earlier in-place one)."""
    import cv2

    cvnet = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    if hasattr(cvnet, "enableWinograd"):
        cvnet.enableWinograd(False)
    cvnet.enableFusion(False)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    known = set(cvnet.getLayerNames())
    seen: dict[str, int] = {}
    for node in flow.nodes:
        seen[node.layer.name] = seen.get(node.layer.name, 0) + 1
    wanted: dict[str, str] = {}
    for node in flow.nodes:
        lay = node.layer
        if lay.type == "Input" or lay.name not in known or not node.outputs:
            continue
        if seen[lay.name] > 1:  # HED's five layers called 'crop': OpenCV's name is ambiguous
            continue
        v = node.outputs[0]
        latest = flow.latest(v.name) is v
        wanted[lay.name] = v.name if latest else f"{v.name}@{lay.name}"
    for name, x in feed.items():
        cvnet.setInput(np.ascontiguousarray(x), name)
    names = list(wanted)
    outs = cvnet.forward(names)
    return {wanted[n]: np.asarray(o) for n, o in zip(names, outs, strict=True)}


CAFFE_SCRIPT = r"""
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
proto, weights, inp, out = sys.argv[1:5]
net = caffe.Net(proto, caffe.TEST, weights=weights)
with np.load(inp) as z:
    names = json.loads(str(z["__names__"]))
    feed = {name: z["a%d" % i] for i, name in enumerate(names)}
for name, x in feed.items():
    net.blobs[name].reshape(*x.shape)
net.reshape()
for name, x in feed.items():
    net.blobs[name].data[...] = x
net.forward()
blobs = [(k, b.data.copy()) for k, b in net.blobs.items() if "_split_" not in k]
np.savez(out, __names__=json.dumps([k for k, _ in blobs]),
         **{"a%d" % i: a for i, (_, a) in enumerate(blobs)})
"""


def run_caffe(pycaffe: str, prototxt: Path, weights: Path, feed: Mapping[str, np.ndarray],
              timeout: float = 600) -> dict[str, np.ndarray]:
    """Every blob of the real Caffe's forward pass (its last version of each name)."""
    with tempfile.TemporaryDirectory(prefix="zoo-caffe-") as tmp:
        inp, out, script = Path(tmp, "in.npz"), Path(tmp, "out.npz"), Path(tmp, "run.py")
        text = prototxt.read_text()
        if "round_mode" in text:  # the reference build's field 13 is the forks' bool ceil_mode
            text = text.replace("round_mode: FLOOR", "ceil_mode: false")
            text = text.replace("round_mode: CEIL", "ceil_mode: true")
            prototxt = Path(tmp, "net.prototxt")
            prototxt.write_text(text)
        names = list(feed)
        np.savez(inp, __names__=json.dumps(names),
                 **{f"a{i}": feed[n] for i, n in enumerate(names)})
        script.write_text(CAFFE_SCRIPT)
        proc = subprocess.run([pycaffe, str(script), str(prototxt), str(weights), str(inp),
                               str(out)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            why = next((ln for ln in reversed(tail) if "Check failed" in ln or "Error" in ln),
                       tail[-1] if tail else f"exit {proc.returncode}")
            raise _RefError(f"caffe cannot run it: {why.strip()[:200]}")
        with np.load(out) as z:
            got = json.loads(str(z["__names__"]))
            return {n: np.asarray(z[f"a{i}"]) for i, n in enumerate(got)}


class _RefError(Exception):
    """A reference implementation cannot read or run the net (noted, not a failure)."""


def _first_line(exc: BaseException) -> str:
    text = [t for t in str(exc).strip().splitlines() if t.strip()]
    line = next((t for t in text if "error" in t.lower()), text[0] if text else type(exc).__name__)
    return line.strip()[:200]


def _run_saved_torch(folder: Path, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    spec = importlib.util.spec_from_file_location(f"zoo_model_{abs(hash(folder))}",
                                                  folder / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.CaffeNet()
    model.load_weights(str(folder / "weights.safetensors"))
    model.eval()
    meta = json.loads((folder / "caffe_names.json").read_text())
    with torch.no_grad():
        out = model(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in meta["inputs"]])
    if isinstance(out, torch.Tensor):
        out = {meta["outputs"][0]: out}
    return {k: v.numpy() for k, v in out.items()}


# -- one net ------------------------------------------------------------------------------------
def convert(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
            name: str | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
            seed: int = 0, tolerance: float = DEFAULT_TOLERANCE, opencv: bool = True,
            caffe: str | None = None, random_weights: bool = False) -> Result:
    """Load, export, run and compare one net (see the module docstring). Never raises for
    a problem of the net: the result's status says it."""
    import surgery
    from surgery.dataflow import resolve
    from surgery.errors import ShapeMismatchError, SurgeryError, UnsupportedLayerError
    from surgery.export.common import plan
    from surgery.export.onnx import run_onnx, save_onnx, to_onnx
    from surgery.export.onnx import supported_types as onnx_types
    from surgery.export.torch import run_blobs, save_torch, to_torch
    from surgery.net import NetState
    from surgery.shapes import infer

    path = Path(path)
    res = Result(name or net_name(path), str(path))
    t0 = time.perf_counter()
    stage = "load"
    try:
        net = surgery.load(path)
        weights = None if random_weights else matching_caffemodel(net, path.parent)[0]
        if weights is not None:
            stage = "load weights"
            net = surgery.load(path, weights)
            res.weights = weights.name
        stage = "resolve"
        try:
            net, used_stage = test_net(net)
        except SurgeryError as exc:
            res.status = f"skip: the TEST net does not resolve ({_first_line(exc)})"
            return res
        if used_stage:
            res.notes.append(f"TEST net of stage {used_stage!r}")
        flow = resolve(net, NetState("TEST"))
        res.layers = len(flow.nodes)
        stage = "plan"
        try:
            plan(net, "TEST", supported=onnx_types(), infer_shapes=False)
        except UnsupportedLayerError as exc:
            res.status = "unsupported: " + ", ".join(sorted(set(_types_in(str(exc)))))
            res.notes.append(str(exc))
            return res
        stage = "input shapes"
        try:
            shapes, notes = choose_input_shapes(
                net, {**known_shapes(res.name), **dict(input_shapes or {})})
            if not res.weights:
                shapes, why = shrink_for_random_weights(net, shapes, dict(input_shapes or {}))
                if why:
                    notes.append(why)
        except _UnknownInput as exc:
            res.status = f"skip: {exc}"
            return res
        except ShapeMismatchError as exc:
            res.status = f"invalid: {_first_line(exc)}"
            return res
        res.inputs = {k: list(v) for k, v in shapes.items()}
        res.notes.extend(notes)
        stage = "shapes"
        try:
            info = infer(flow, shapes, check_weights=False)
        except ShapeMismatchError as exc:
            res.status = f"invalid: {_first_line(exc)}"
            return res
        filled = fill_random(net, flow, info, seed)
        res.random_layers = list(filled)
        if filled and res.weights:
            res.weights = f"{res.weights} + {len(filled)} random"
            res.notes.append(f"random weights (not in {weights.name}): " + ", ".join(filled))
        elif filled:
            res.weights = "random"
        elif not res.weights:
            res.weights = "none needed"
        feed = random_feed(shapes, seed)
        stage = "export onnx"
        model = to_onnx(net, input_shapes=shapes, expose_blobs=True)
        stage = "export torch"
        gm = to_torch(net, "test", shapes, keep_blobs=True)
        if out_dir is not None:
            dest = Path(out_dir) / res.name
            dest.mkdir(parents=True, exist_ok=True)
            stage = "save onnx"
            save_onnx(net, dest / "model.onnx", input_shapes=shapes)
            stage = "save torch"
            save_torch(net, dest / "torch", "test", shapes)
        stage = "run onnxruntime"
        ort = run_onnx(model, feed, device="cpu")
        stage = "run torch"
        gm.eval()
        pt = run_blobs(gm, feed)
        n, worst, where = compare_all(pt, ort, skip=list(feed))
        res.torch_vs_onnx, res.compared["torch/onnx"] = worst, n
        res.worst["torch/onnx"] = where
        fails: list[str] = []
        if not worst <= tolerance:
            fails.append(f"torch vs onnxruntime {where} rel {worst:.2g}")
        if out_dir is not None:
            stage = "run torch/model.py"
            saved = _run_saved_torch(Path(out_dir) / res.name / "torch", feed)
            _, w2, b2 = compare_all(saved, pt)
            if not w2 <= 1e-6:
                fails.append(f"torch/model.py vs the module {b2} rel {w2:.2g}")
        if opencv or caffe:
            stage = "write reference files"
            ref_dir = Path(out_dir) / res.name if out_dir is not None else Path(
                tempfile.mkdtemp(prefix="zoo-ref-"))
            ref_dir.mkdir(parents=True, exist_ok=True)
            ref = reference_net(net, shapes)
            proto, wfile = ref_dir / "net.prototxt", ref_dir / "weights.caffemodel"
            has_weights = any(lay.has_weights for lay in ref.layers)
            surgery.save(ref, proto, wfile if has_weights else None)
            if not has_weights:
                wfile.write_bytes(b"")
            ref_flow = resolve(ref, NetState("TEST"))
            for backend in (["opencv"] if opencv else []) + (["caffe"] if caffe else []):
                stage = f"run {backend}"
                try:
                    if backend == "opencv":
                        got = _opencv_or_note(proto, wfile, ref_flow, feed)
                    else:
                        got = run_caffe(str(caffe), proto, wfile, feed)
                except _RefError as exc:
                    res.notes.append(f"{backend}: {exc}")
                    continue
                n_o, w_o, b_o = compare_all(ort, got, skip=list(feed))
                n_t, w_t, b_t = compare_all(pt, got, skip=list(feed))
                w, b = (w_o, f"onnxruntime {b_o}") if not w_o <= w_t else (w_t, f"torch {b_t}")
                res.compared[f"ours/{backend}"] = max(n_o, n_t)
                res.worst[f"ours/{backend}"] = b
                if backend == "opencv":
                    res.vs_opencv = w if n_o or n_t else None
                else:
                    res.vs_caffe = w if n_o or n_t else None
                if not (n_o or n_t):
                    res.notes.append(f"{backend}: no blob in common")
                elif not w <= tolerance:
                    fails.append(f"{b} vs {backend} rel {w:.2g}")
        res.status = "mismatch: " + "; ".join(fails) if fails else "ok"
    except Exception as exc:  # noqa: BLE001 -- a row, not a crash of the sweep
        res.status = f"error: {stage}: {type(exc).__name__}: {_first_line(exc)}"
        res.notes.append(traceback.format_exc(limit=-3))
    finally:
        res.seconds = time.perf_counter() - t0
    return res


# Layer types OpenCV 4.x imports with another meaning than the fork that defines them: a net
# holding one is not compared with OpenCV (noted).
OPENCV_DIFFERS = {
    "Axpy": "OpenCV imports Axpy as a * bottom[2] + bottom[1]; SENet's fork computes "
            "a * bottom[1] + bottom[2]",
}


def _opencv_or_note(proto: Path, wfile: Path, flow: Any, feed: Mapping[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    differs = sorted({n.layer.type for n in flow.nodes if n.layer.type in OPENCV_DIFFERS})
    if differs:
        raise _RefError("not compared: " + "; ".join(OPENCV_DIFFERS[t] for t in differs))
    try:
        import cv2
    except ImportError:
        raise _RefError("OpenCV is not installed") from None
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise _RefError("this OpenCV has no readNetFromCaffe (OpenCV 5 removed it)")
    try:
        return run_opencv(proto, wfile, flow, feed)
    except cv2.error as exc:
        raise _RefError(f"OpenCV cannot run it: {_first_line(exc)}") from None


def _types_in(message: str) -> list[str]:
    marker = "Unsupported type(s): "
    if marker not in message:
        return [message[:80]]
    return [t.strip() for t in message.split(marker, 1)[1].split(".")[0].split(",")]


# -- the table ----------------------------------------------------------------------------------
def _fmt_err(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1e}"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def table(results: Sequence[Result]) -> str:
    """The sweep's table: one row per net, the weights each comparison ran on, the counts,
    and every net compared with a caffemodel *and* random layers, naming those layers."""
    head = ["net", "layers", "weights", "status", "torch/onnx", "vs opencv", "vs caffe", "time"]
    rows = [[r.name, str(r.layers), _cut(r.weights or "-", 40), _cut(r.status, 70),
             _fmt_err(r.torch_vs_onnx), _fmt_err(r.vs_opencv), _fmt_err(r.vs_caffe),
             f"{r.seconds:.1f}s"] for r in results]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [head, *rows]]
    counts: dict[str, int] = {}
    for r in results:
        key = r.status.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    partial = [r for r in results if r.random_layers and r.weights != "random"]
    if partial:
        lines.append(f"{len(partial)} net(s) compared with a caffemodel plus random layers "
                     "(their outputs are not the trained net's):")
        lines.extend(f"  {r.name}: {r.status.split(':')[0]}, random {', '.join(r.random_layers)}"
                     for r in partial)
    return "\n".join(lines)


def _parse_shapes(values: Sequence[str]) -> list[tuple[str, str, Shape]]:
    out = []
    for text in values:
        net_glob, _, rest = text.rpartition(":") if ":" in text else ("*", "", text)
        blob, _, dims = rest.rpartition("=")
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        if not blob or not shape or any(d <= 0 for d in shape):
            raise SystemExit(f"--input-shape: expected [NET_GLOB:]NAME=N,C,H,W, got {text!r}")
        out.append((net_glob or "*", blob, shape))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help=f"prototxt files or folders (default: {ZOO})")
    ap.add_argument("-o", "--output", default=None,
                    help="output folder (NAME/model.onnx, NAME/torch/); default: a temp folder")
    ap.add_argument("--only", action="append", default=[],
                    help="glob on the net name (folder/stem); repeatable")
    ap.add_argument("--skip", action="append", default=[], help="glob of nets to leave out")
    ap.add_argument("--input-shape", action="append", default=[],
                    help="[NET_GLOB:]NAME=N,C,H,W (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    ap.add_argument("--no-opencv", action="store_true", help="do not compare with OpenCV")
    ap.add_argument("--caffe", metavar="PYCAFFE", default=None,
                    help="also compare with the real Caffe run through this python wrapper "
                         "(e.g. /tmp/refcaffe/pycaffe)")
    ap.add_argument("--random-weights", action="store_true",
                    help="never use a caffemodel found beside a net")
    ap.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)

    if args.caffe and not os.access(args.caffe, os.X_OK):
        ap.error(f"--caffe {args.caffe}: not an executable wrapper")
    base = ZOO if not args.paths else None
    paths = discover(args.paths or [ZOO])
    if base is None and len(args.paths) == 1 and Path(args.paths[0]).is_dir():
        base = Path(args.paths[0])
    shape_rules = _parse_shapes(args.input_shape)
    out_dir = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="zoo-convert-"))
    results: list[Result] = []
    jobs = [(p, net_name(p, base)) for p in paths]
    jobs = [(p, n) for p, n in jobs
            if (not args.only or any(fnmatch.fnmatch(n, g) for g in args.only))
            and not any(fnmatch.fnmatch(n, g) for g in args.skip)]
    print(f"{len(jobs)} net(s); output in {out_dir}", flush=True)
    for i, (p, name) in enumerate(jobs, 1):
        shapes = {blob: s for g, blob, s in shape_rules if fnmatch.fnmatch(name, g)}
        print(f"[{i}/{len(jobs)}] {name} ...", end=" ", flush=True)
        r = convert(p, out_dir, name=name, input_shapes=shapes or None, seed=args.seed,
                    tolerance=args.tolerance, opencv=not args.no_opencv, caffe=args.caffe,
                    random_weights=args.random_weights)
        results.append(r)
        extra = [n for n in r.notes if n.startswith(("opencv:", "caffe:"))]
        print(f"{r.status}, weights {r.weights or '-'} ({r.seconds:.1f}s)"
              + (f" [{'; '.join(extra)}]" if extra else ""), flush=True)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([{**asdict(r), "failed": r.failed}
                                               for r in results], indent=1))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
