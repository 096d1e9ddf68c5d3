"""Batch conversion of many Caffe nets to ONNX and PyTorch, each checked blob by blob.

The library side of ``surgery convert PATH... -o OUT`` (:func:`run_batch`; one net:
:func:`convert`). PATH: prototxt files or folders (searched recursively). A folder search keeps
the *deploy-like* nets (an ``Input`` layer or ``input:`` fields) and the train_val/test nets,
which are exported in TEST with their dataset layers as inputs (shapes from
:func:`surgery.shapes.guess_dataset_shapes`, ``--input-shape``, or -- for a data top nothing
describes, such as FCN's Python data layers -- ``1 x C x 224 x 224`` with C from the first
convolution reading it).

For each net:

1. Weights: a ``.caffemodel`` beside the definition whose layer names cover the learnable
   layers (the best match wins); else, and for layers it lacks, random values from Caffe's
   fillers (:mod:`surgery.fillers`, seeded) -- except that a weight or bias filler left at
   constant 0 becomes gaussian std 0.01 (all-zero weights compare nothing), and BatchNorm gets
   mean 0, variance 1, factor 1.
2. Input: seeded standard-normal values; the batch is cut to 2 (1 for nets of more than
   2 GMAC per image), spatial sizes are kept unless ``input_shapes`` says otherwise.
3. Export (``to``): ``OUT/NAME/model.onnx`` (:func:`surgery.export.onnx.save_onnx`),
   ``OUT/NAME/torch/`` (:func:`surgery.export.torch.save_torch`), and, when a reference runs,
   the files OpenCV and Caffe read: ``net.prototxt`` (a train_val net made deploy with
   :func:`surgery.ops.to_deploy`, Input shapes set to the fed ones) and ``weights.caffemodel``
   (in a temp folder; in ``OUT/NAME/`` with ``keep_references``).
4. Verify (``verify``): run onnxruntime and torch with every blob exposed and compare every
   common blob; run OpenCV 4.x (``cv2.dnn.readNetFromCaffe`` on the saved files, an
   implementation independent of ours) and compare every blob it gives per layer; with
   ``caffe=PYCAFFE``, run the real Caffe in a subprocess (the wrapper runs the system python;
   arrays go through ``.npz`` files) and compare every blob too. The generated
   ``torch/model.py`` is run once and must equal the in-memory module on the outputs.

The ``weights`` of a row says what the comparison ran on: the caffemodel's file name,
``FILE + N random`` when N learnable layers were not in it (a renamed head: they are listed under
the table, so an ``ok`` never hides a head compared on random values), ``random`` (no matching
caffemodel, or ``random_weights``), or ``none needed``.

Status per net: ``ok``; ``unsupported: <types>`` (our exporters' one error naming every layer
they cannot lower); ``mismatch: <backend> <blob> rel <err>`` (a blob above the tolerance);
``invalid: <why>`` (the definition's shapes do not work out); ``skip: <why>`` (no TEST net, an
input shape nothing tells); ``error: <message>`` (our code failed, or the net's worker process
crashed, ran out of memory or out of time). A reference that cannot read or run a net (OpenCV
has no Interp, ShuffleChannel...) is noted in the row, not counted against it.

Batches (:func:`run_batch`) run each net in a worker process (a crash, a hang past ``timeout``
or an out-of-memory kill is that net's row) and keep their state in ``OUT/convert.json``: a
rerun reuses the row of every net whose inputs (definition and caffemodel contents, options)
and outputs (sizes and content hashes) are unchanged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Result",
    "ConvertOptions",
    "Progress",
    "convert",
    "run_batch",
    "discover",
    "net_name",
    "table",
    "markdown_report",
    "counts",
    "parse_shape_rules",
    "STATE_FILE",
    "BACKENDS",
    "TARGETS",
]

DEFAULT_TOLERANCE = 1e-4
DEFAULT_SIZE = 64  # H = W of a data top nothing describes
FALLBACK_SIZES = (DEFAULT_SIZE, 28, 32, 224, 227, 299)  # MNIST, CIFAR, ImageNet
BIG_MACS = 2e9  # per image: above it, batch 1
BIG_PARAMS = 120e6  # random weights above it: a smaller input (shrink_for_random_weights)
STATE_FILE = "convert.json"  # in OUT: every row, with the hashes a rerun checks
TARGETS = ("onnx", "torch")
BACKENDS = ("onnxruntime", "torch", "opencv", "caffe")
#: Test hook: a net whose name matches this glob makes its worker write its pid to
#: ``$SURGERY_CONVERT_HANG_PIDFILE`` (if set) and sleep, as a hung worker would.
HANG_ENV = "SURGERY_CONVERT_HANG"
STARTUP_SECONDS = 300  # a worker's imports, not counted in a net's --timeout
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
    params: int | None = None  # learnable values in the exported net
    torch_vs_onnx: float | None = None  # worst relative error over common blobs
    vs_opencv: float | None = None  # worst of onnxruntime/torch vs OpenCV
    vs_caffe: float | None = None
    compared: dict[str, int] = field(default_factory=dict)  # backend pair -> blobs compared
    worst: dict[str, str] = field(default_factory=dict)  # backend pair -> worst blob
    export_seconds: dict[str, float] = field(default_factory=dict)  # target -> seconds to save
    sizes: dict[str, int] = field(default_factory=dict)  # target -> bytes written
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    key: str = ""  # hash of the inputs (definition, caffemodels, options)
    outputs: dict[str, list[Any]] = field(default_factory=dict)  # file under OUT -> [size, sha]
    reused: bool = False  # this run found the row up to date and did not convert again

    @property
    def failed(self) -> bool:
        """A mismatch or an error (the batch exits 1)."""
        return self.status.startswith(("mismatch", "error"))

    @property
    def kind(self) -> str:
        """The status word: ok, unsupported, mismatch, invalid, skip or error."""
        return self.status.split(":")[0]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        """A row from :func:`dataclasses.asdict` output (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
def _param_count(net: Any, flow: Any) -> int:
    seen: set[int] = set()
    total = 0
    for node in flow.nodes:
        for p in node.layer.params:
            if p.data is not None and id(p.data) not in seen:
                seen.add(id(p.data))
                total += int(p.data.size)
    return total


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def convert(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
            name: str | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
            seed: int = 0, tolerance: float = DEFAULT_TOLERANCE, opencv: bool = True,
            caffe: str | None = None, random_weights: bool = False,
            to: Sequence[str] = TARGETS, verify: Sequence[str] = ("onnxruntime", "torch"),
            keep_references: bool = False) -> Result:
    """Load, export, run and compare one net (see the module docstring).

    Args:
        path: the net definition.
        out_dir: exports go to ``out_dir/NAME/``; None: nothing is written (a temp folder for
            the references).
        name: the row name and sub-folder (default ``folder/stem``).
        input_shapes: input blob -> shape, over what the net tells.
        seed: for random weights and the input.
        tolerance: the largest relative error of a blob that still counts as equal.
        opencv: compare with OpenCV 4.x.
        caffe: compare with the real Caffe run through this python wrapper.
        random_weights: never use a caffemodel found beside the net.
        to: the exports written (``onnx``, ``torch``).
        verify: which of our backends run (``onnxruntime``, ``torch``); the references
            compare with each that ran.
        keep_references: keep the files the references read (``net.prototxt``,
            ``weights.caffemodel``) in ``out_dir/NAME/``; else they go to a temp folder,
            removed after.

    Returns:
        The row. Never raises for a problem of the net: the status says it.
    """
    import surgery
    from surgery.dataflow import resolve
    from surgery.errors import ShapeMismatchError, SurgeryError, UnsupportedLayerError
    from surgery.export.common import plan
    from surgery.export.onnx import supported_types as onnx_types
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
        res.params = _param_count(net, flow)
        feed = random_feed(shapes, seed)
        dest = Path(out_dir) / res.name if out_dir is not None else None
        if dest is not None and to:
            dest.mkdir(parents=True, exist_ok=True)
        if dest is not None and "onnx" in to:
            from surgery.export.onnx import save_onnx

            stage = "save onnx"
            t1 = time.perf_counter()
            save_onnx(net, dest / "model.onnx", input_shapes=shapes)
            res.export_seconds["onnx"] = time.perf_counter() - t1
            res.sizes["onnx"] = sum(_tree_size(f) for f in dest.glob("model.onnx*"))
        if dest is not None and "torch" in to:
            from surgery.export.torch import save_torch

            stage = "save torch"
            t1 = time.perf_counter()
            save_torch(net, dest / "torch", "test", shapes)
            res.export_seconds["torch"] = time.perf_counter() - t1
            res.sizes["torch"] = _tree_size(dest / "torch")
        ours: dict[str, dict[str, np.ndarray]] = {}
        if "onnxruntime" in verify:
            from surgery.export.onnx import run_onnx, to_onnx

            stage = "export onnx"
            model = to_onnx(net, input_shapes=shapes, expose_blobs=True)
            stage = "run onnxruntime"
            ours["onnxruntime"] = run_onnx(model, feed, device="cpu")
            del model
        if "torch" in verify:
            from surgery.export.torch import run_blobs, to_torch

            stage = "export torch"
            gm = to_torch(net, "test", shapes, keep_blobs=True)
            stage = "run torch"
            gm.eval()
            ours["torch"] = run_blobs(gm, feed)
            del gm
        fails: list[str] = []
        if len(ours) == 2:
            n, worst, where = compare_all(ours["torch"], ours["onnxruntime"], skip=list(feed))
            res.torch_vs_onnx, res.compared["torch/onnx"] = worst, n
            res.worst["torch/onnx"] = where
            if not worst <= tolerance:
                fails.append(f"torch vs onnxruntime {where} rel {worst:.2g}")
        if dest is not None and "torch" in to and "torch" in ours:
            stage = "run torch/model.py"
            saved = _run_saved_torch(dest / "torch", feed)
            _, w2, b2 = compare_all(saved, ours["torch"])
            if not w2 <= 1e-6:
                fails.append(f"torch/model.py vs the module {b2} rel {w2:.2g}")
        if (opencv or caffe) and not ours:
            res.notes.append("references not run: neither onnxruntime nor torch was verified")
        elif opencv or caffe:
            stage = "write reference files"
            keep = keep_references and dest is not None
            ref_dir = dest if keep else Path(tempfile.mkdtemp(prefix="convert-ref-"))
            assert ref_dir is not None
            ref_dir.mkdir(parents=True, exist_ok=True)
            try:
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
                    w, b, n_any = 0.0, "", 0
                    for ours_name, blobs in ours.items():
                        n_b, w_b, b_b = compare_all(blobs, got, skip=list(feed))
                        n_any = max(n_any, n_b)
                        if n_b and not w_b <= w:
                            w, b = w_b, f"{ours_name} {b_b}"
                    res.compared[f"ours/{backend}"] = n_any
                    res.worst[f"ours/{backend}"] = b
                    if backend == "opencv":
                        res.vs_opencv = w if n_any else None
                    else:
                        res.vs_caffe = w if n_any else None
                    if not n_any:
                        res.notes.append(f"{backend}: no blob in common")
                    elif not w <= tolerance:
                        fails.append(f"{b} vs {backend} rel {w:.2g}")
            finally:
                if not keep:
                    shutil.rmtree(ref_dir, ignore_errors=True)
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


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}MB" if n >= 2**20 else f"{n / 2**10:.0f}kB"


def _fmt_exports(r: Result) -> tuple[str, str]:
    secs = " ".join(f"{k} {v:.1f}s" for k, v in r.export_seconds.items()) or "-"
    sizes = " ".join(f"{k} {_fmt_size(v)}" for k, v in r.sizes.items()) or "-"
    return secs, sizes


HEAD = ["net", "layers", "params", "weights", "status", "torch/onnx", "vs opencv", "vs caffe",
        "export", "size", "time"]


def _rows(results: Sequence[Result], width: int | None) -> list[list[str]]:
    rows = []
    for r in results:
        secs, sizes = _fmt_exports(r)
        status = r.status if width is None else _cut(r.status, width)
        weights = r.weights or "-"
        rows.append([r.name, str(r.layers), _fmt_params(r.params),
                     weights if width is None else _cut(weights, 40), status,
                     _fmt_err(r.torch_vs_onnx), _fmt_err(r.vs_opencv), _fmt_err(r.vs_caffe),
                     secs, sizes, f"{r.seconds:.1f}s" + (" (reused)" if r.reused else "")])
    return rows


def counts(results: Sequence[Result]) -> dict[str, int]:
    """Rows per status word (ok, unsupported, mismatch, invalid, skip, error)."""
    order = ["ok", "unsupported", "mismatch", "invalid", "skip", "error"]
    out: dict[str, int] = {}
    for r in results:
        out[r.kind] = out.get(r.kind, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                    else len(order), kv[0])))


def _footer(results: Sequence[Result]) -> list[str]:
    lines = [", ".join(f"{v} {k}" for k, v in counts(results).items())]
    reused = sum(r.reused for r in results)
    if reused:
        lines.append(f"{reused} net(s) unchanged since the last run in this folder (reused)")
    partial = [r for r in results if r.random_layers and r.weights != "random"]
    if partial:
        lines.append(f"{len(partial)} net(s) compared with a caffemodel plus random layers "
                     "(their outputs are not the trained net's):")
        lines.extend(f"  {r.name}: {r.kind}, random {', '.join(r.random_layers)}"
                     for r in partial)
    return lines


def table(results: Sequence[Result]) -> str:
    """The batch's table: one row per net (status, weights source, worst error per backend,
    parameter count, export times and sizes), the counts, and every net compared with a
    caffemodel *and* random layers, naming those layers."""
    rows = _rows(results, 70)
    widths = [max(len(row[i]) for row in [HEAD, *rows]) for i in range(len(HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [HEAD, *rows]]
    return "\n".join([*lines, "", *_footer(results)])


def markdown_report(results: Sequence[Result], title: str = "surgery convert") -> str:
    """:func:`table` as Markdown (full statuses, ``|`` escaped), then the counts and notes."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", "| " + " | ".join(HEAD) + " |",
             "|" + "|".join("---" for _ in HEAD) + "|"]
    lines.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in _rows(results, None))
    lines += ["", *(f"- {ln.strip()}" for ln in _footer(results))]
    unsupported = [r for r in results if r.kind == "unsupported"]
    if unsupported:
        lines += ["", "## Unsupported", ""]
        lines.extend(f"- `{r.name}`: {r.status.split(':', 1)[1].strip()}" for r in unsupported)
    bad = [r for r in results if r.failed]
    if bad:
        lines += ["", "## Mismatches and errors", ""]
        lines.extend(f"- `{r.name}`: {cell(r.status)}" for r in bad)
    return "\n".join(lines) + "\n"


def parse_shape_rules(values: Sequence[str]) -> list[tuple[str, str, Shape]]:
    """``[NET_GLOB:]NAME=N,C,H,W`` options as ``(glob, blob, shape)``.

    Raises:
        ValueError: a malformed value (the message names it).
    """
    out = []
    for text in values:
        net_glob, _, rest = text.rpartition(":") if ":" in text else ("*", "", text)
        blob, _, dims = rest.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not blob or not shape or any(d <= 0 for d in shape):
            raise ValueError(f"--input-shape: expected [NET_GLOB:]NAME=N,C,H,W, got {text!r}")
        out.append((net_glob or "*", blob, shape))
    return out


# -- batches ------------------------------------------------------------------------------------
@dataclass
class ConvertOptions:
    """What every net of a batch is converted with (part of each net's input hash)."""

    to: tuple[str, ...] = TARGETS
    verify: tuple[str, ...] = ("onnxruntime", "torch", "opencv")
    caffe: str | None = None
    seed: int = 0
    tolerance: float = DEFAULT_TOLERANCE
    random_weights: bool = False
    shape_rules: list[tuple[str, str, Shape]] = field(default_factory=list)
    keep_references: bool = False

    def shapes_for(self, name: str) -> dict[str, Shape]:
        """The ``--input-shape`` values whose glob matches net ``name``."""
        return {blob: s for g, blob, s in self.shape_rules if fnmatch.fnmatch(name, g)}

    def convert_kwargs(self, name: str) -> dict[str, Any]:
        """Keyword arguments of :func:`convert` for net ``name``."""
        return {"input_shapes": self.shapes_for(name) or None, "seed": self.seed,
                "tolerance": self.tolerance, "opencv": "opencv" in self.verify,
                "caffe": self.caffe if "caffe" in self.verify else None,
                "random_weights": self.random_weights, "to": tuple(self.to),
                "keep_references": self.keep_references,
                "verify": tuple(b for b in self.verify if b in ("onnxruntime", "torch"))}


@dataclass
class Progress:
    """One event of a batch, for a progress display.

    ``event``: ``start`` (a worker took the net), ``done`` (converted or reused; ``result``
    set). ``done``/``total`` count nets; ``eta`` is the estimated seconds left (None until a
    net has been converted in this run).
    """

    event: str
    name: str
    done: int
    total: int
    running: list[str]
    elapsed: float
    eta: float | None
    result: Result | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Hashes:
    """Content hashes, recomputed only for files whose size or mtime changed."""

    def __init__(self, cache: Mapping[str, Any] | None = None) -> None:
        self.cache: dict[str, list[Any]] = dict(cache or {})

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.cache.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return str(hit[2])
        digest = _sha256(path)
        self.cache[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest


def _input_key(path: Path, name: str, opts: ConvertOptions, hashes: _Hashes) -> str:
    from surgery import __version__

    kw = opts.convert_kwargs(name)
    models = [] if opts.random_weights else sorted(path.parent.glob("*.caffemodel"))
    doc = {"definition": hashes(path), "caffemodels": {m.name: hashes(m) for m in models},
           "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()
                       if not (k == "keep_references" and not v)},  # older states: no key
           "surgery": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _record_outputs(out_dir: Path, name: str) -> dict[str, list[Any]]:
    folder = out_dir / name
    if not folder.is_dir():
        return {}
    return {str(f.relative_to(out_dir)): [f.stat().st_size, _sha256(f)]
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _outputs_intact(out_dir: Path, outputs: Mapping[str, Sequence[Any]], hashes: _Hashes,
                    ) -> bool:
    for rel, (size, digest) in outputs.items():
        f = out_dir / rel
        if not f.is_file() or f.stat().st_size != size or hashes(f) != digest:
            return False
    return True


def _is_worker_failure(r: Result) -> bool:
    return r.status.startswith(("error: worker", "error: timeout"))


def _load_state(out_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((out_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("format") == 1 else {}


def _save_state(out_dir: Path, rows: Mapping[str, Result], hashes: _Hashes) -> None:
    from surgery.caffe_io import write_text_atomic

    doc = {"format": 1, "nets": {k: asdict(r) for k, r in rows.items()},
           "hashes": hashes.cache}
    write_text_atomic(out_dir / STATE_FILE, json.dumps(doc, indent=1, default=str))


def _preload(kwargs: Mapping[str, Any]) -> None:
    """Import what :func:`convert` will need (a net's time limit is not for imports)."""
    import surgery.export.onnx  # noqa: F401 -- the supported types

    if "torch" in kwargs["to"] or "torch" in kwargs["verify"]:
        import surgery.export.torch  # noqa: F401
    if "onnxruntime" in kwargs["verify"]:
        import onnxruntime  # noqa: F401


def _worker_main(conn: Any, threads: int) -> None:
    """A worker process: converts the nets it is sent, one at a time, until sent None."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the manager's to handle
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        path, out_dir, name, kwargs = job
        _preload(kwargs)
        conn.send(("start", None))  # the timeout counts from here, not from the imports
        hang = os.environ.get(HANG_ENV)
        if hang and fnmatch.fnmatch(name, hang):
            pidfile = os.environ.get(HANG_ENV + "_PIDFILE")
            if pidfile:
                Path(pidfile).write_text(str(os.getpid()))
            time.sleep(3600)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        res = convert(path, out_dir, name=name, **kwargs)
        if out_dir is not None:
            res.outputs = _record_outputs(Path(out_dir), name)
        conn.send(("done", asdict(res)))


class _Worker:
    def __init__(self, ctx: Any, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, threads), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[Path, str, str] | None = None  # path, name, key
        self.started = 0.0  # when the job was sent, then when the worker began it
        self.acked = False  # the worker has its imports done and began the net
        self.tasks = 0

    def limit(self, timeout: float) -> float:
        """Seconds allowed since :attr:`started`: ``timeout`` for the net, plus
        :data:`STARTUP_SECONDS` for a worker still importing torch/onnx."""
        return timeout if self.acked else timeout + STARTUP_SECONDS

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.proc.kill()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _crash_status(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        why = " (out of memory, or killed)" if sig == "SIGKILL" else ""
        return f"error: worker killed by {sig}{why}"
    return f"error: worker exited with status {exitcode} without a result"


def run_batch(paths: Sequence[Path], out_dir: str | os.PathLike[str],
              options: ConvertOptions | None = None, *, names: Sequence[str] | None = None,
              jobs: int | None = None, timeout: float | None = None, resume: bool = True,
              progress: Callable[[Progress], None] | None = None,
              max_tasks_per_worker: int = 8) -> list[Result]:
    """Convert every net of ``paths`` in worker processes; rows in the order of ``paths``.

    Args:
        paths: net definitions (see :func:`discover`).
        out_dir: ``OUT``: ``OUT/NAME/`` per net and the state file ``OUT/convert.json``
            (rewritten after every net, so a stopped batch keeps what it finished).
        options: how each net is converted.
        names: the row names (default :func:`net_name` of each path); unique.
        jobs: worker processes (default: the CPU count).
        timeout: seconds one net may take before its worker is killed (None: no limit).
        resume: reuse the row of a net whose inputs and outputs are unchanged (see the module
            docstring); rows of nets whose worker crashed or timed out are always redone.
        progress: called with each :class:`Progress` event.
        max_tasks_per_worker: a worker is replaced after this many nets (memory back).

    Returns:
        One :class:`Result` per net. A net whose worker dies (a crash, SIGKILL, the kernel's
        out-of-memory killer) or passes ``timeout`` gets an ``error: worker ...`` /
        ``error: timeout ...`` row; the others go on.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    opts = options or ConvertOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [net_name(p) for p in paths]
    state = _load_state(out) if resume else {}
    hashes = _Hashes(state.get("hashes"))
    previous = {k: Result.from_dict(v) for k, v in state.get("nets", {}).items()}
    rows: dict[str, Result] = {k: v for k, v in previous.items() if k not in names}
    results: dict[str, Result] = {}
    reused: dict[str, Result] = {}
    todo: list[tuple[Path, str, str]] = []
    t0 = time.perf_counter()
    for p, name in zip(paths, names, strict=True):
        key = _input_key(p, name, opts, hashes) if p.is_file() else ""
        old = previous.get(name)
        if (resume and old is not None and key and old.key == key
                and not _is_worker_failure(old) and _outputs_intact(out, old.outputs, hashes)):
            old.reused = True
            reused[name] = rows[name] = old
        else:
            if old is not None:  # stale files of the previous conversion of this net
                for rel in old.outputs:
                    (out / rel).unlink(missing_ok=True)
            todo.append((p, name, key))
    total = len(paths)

    def report(event: str, name: str, running: list[str], r: Result | None = None) -> None:
        if progress is None:
            return
        fresh = [x for x in results.values() if not x.reused]
        elapsed = time.perf_counter() - t0
        left = total - len(results)
        eta = None
        if fresh:  # the conversions' pace so far (not the hashing of reused nets)
            eta = (time.perf_counter() - t_convert) / len(fresh) * left
        progress(Progress(event, name, len(results), total, running, elapsed, eta, r))

    for name, r in reused.items():
        results[name] = r
        report("done", name, [], r)
    if todo:
        _save_state(out, rows, hashes)
    t_convert = time.perf_counter()
    ctx = mp.get_context("spawn")
    n_workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    workers: list[_Worker] = []
    pending = list(reversed(todo))

    def finish(w: _Worker, res: Result) -> None:
        assert w.job is not None
        res.key = w.job[2]
        for rel, (size, digest) in res.outputs.items():  # known: no need to hash them again
            f = out / rel
            st = f.stat() if f.is_file() else None
            if st is not None and st.st_size == size:
                hashes.cache[str(f.resolve())] = [size, st.st_mtime_ns, digest]
        results[res.name] = rows[res.name] = res
        _save_state(out, rows, hashes)
        w.job = None
        report("done", res.name, [x.job[1] for x in workers if x.job], res)

    try:
        while pending or any(w.job for w in workers):
            for w in [w for w in workers if w.job is None and
                      (w.tasks >= max_tasks_per_worker or not pending)]:
                w.stop()
                workers.remove(w)
            while pending and len([w for w in workers if w.job]) < n_workers:
                w = next((w for w in workers if w.job is None), None)
                if w is None:
                    w = _Worker(ctx, threads)
                    workers.append(w)
                p, name, key = pending.pop()
                w.job, w.started, w.acked = (p, name, key), time.perf_counter(), False
                w.tasks += 1
                w.conn.send((str(p), str(out), name, opts.convert_kwargs(name)))
                report("start", name, [x.job[1] for x in workers if x.job])
            busy = [w for w in workers if w.job]
            waits = [w.limit(timeout) - (time.perf_counter() - w.started) for w in busy
                     if timeout]
            wait([x for w in busy for x in (w.conn, w.proc.sentinel)],
                 timeout=max(0.05, min([1.0, *waits])))
            for w in busy:
                assert w.job is not None
                p, name, _ = w.job
                res = None
                while res is None and w.conn.poll():
                    try:
                        kind, payload = w.conn.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "start":
                        w.started, w.acked = time.perf_counter(), True
                    else:
                        res = Result.from_dict(payload)
                if res is not None:
                    finish(w, res)
                    continue
                if not w.proc.is_alive():
                    w.proc.join(1)
                    crash = Result(name, str(p), status=_crash_status(w.proc.exitcode))
                    crash.seconds = time.perf_counter() - w.started
                    finish(w, crash)
                    workers.remove(w)
                    w.conn.close()
                elif timeout and time.perf_counter() - w.started > w.limit(timeout):
                    w.stop(kill=True)
                    workers.remove(w)
                    crash = Result(name, str(p), status=f"error: timeout after {timeout:g}s "
                                   "(worker killed)")
                    crash.seconds = time.perf_counter() - w.started
                    finish(w, crash)
    finally:
        for w in workers:
            w.stop(kill=w.job is not None)
    return [results[n] for n in names]
