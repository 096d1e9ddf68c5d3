"""Run a net on several backends and compare every blob they share.

Backends (each optional, imported only when used):

* ``onnxruntime`` -- the net exported by :func:`surgery.export.onnx.to_onnx` with every blob
  exposed;
* ``torch`` -- :func:`surgery.export.to_torch`;
* ``opencv`` -- OpenCV 4.x ``cv2.dnn.readNetFromCaffe``, an implementation independent of ours;
* ``reference64`` -- the numpy reference of :mod:`surgery.export.reference` (written from
  Caffe's loops, not from the exporters' lowerings) run in float64 from input to output: no
  float32 rounding anywhere, so it tells rounding amplified by depth from a lowering that
  computes something else. Not in the default list (slow: numpy convolutions).

The reference, in order of preference: a golden folder's ``outputs.npz`` (and ``probes.json``
for the blobs too big to store) written by Caffe itself, else ``reference64`` when it ran,
else OpenCV, else the first backend.

Comparison rules:

1. A blob is compared under its Caffe name, after the last layer that wrote it (what Caffe's
   blob holds after a forward pass).
2. Error per blob and backend: ``max|a - b|`` and ``max|a - b| / max|b|`` (``b`` the
   reference). A shape mismatch (the element count differs) or a non-finite value fails.
3. ``DetectionOutput`` rows are compared as a set: both sides sorted by row.
4. The run fails when any relative error exceeds the tolerance.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dataflow import Dataflow, resolve
from .errors import SurgeryError, printable
from .net import Net, NetState

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "BlobError",
    "VerifyReport",
    "verify",
    "load_inputs",
    "net_input_shapes",
    "random_inputs",
    "compare",
]

BACKENDS = ("onnxruntime", "torch", "opencv", "reference64")
DEFAULT_BACKENDS = ("onnxruntime", "torch", "opencv")
GOLDEN = "golden"


@dataclass
class BlobError:
    """The error of one blob on one backend against the reference.

    Attributes:
        blob: the Caffe blob name.
        backend: the backend compared.
        shape: the reference shape.
        max_abs: ``max|a - b|`` (inf on a shape mismatch or a non-finite value).
        max_rel: ``max_abs / max|b|``.
        note: why the comparison failed outright, or ''.
    """

    blob: str
    backend: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    note: str = ""

    def ok(self, tolerance: float) -> bool:
        return self.max_rel <= tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            "blob": self.blob,
            "backend": self.backend,
            "shape": list(self.shape),
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "note": self.note,
        }


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        reference: the name of the reference (``golden``, ``opencv``, or a backend).
        tolerance: the largest relative error accepted.
        backends: the backends that ran.
        skipped: backend -> why it did not run.
        rows: one :class:`BlobError` per compared blob and backend, in net order.
        inputs: input name -> shape.
        uncompared: backend -> number of reference blobs it did not produce.
    """

    reference: str
    tolerance: float
    backends: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    rows: list[BlobError] = field(default_factory=list)
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    uncompared: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> list[BlobError]:
        return [r for r in self.rows if not r.ok(self.tolerance)]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failures

    def worst(self, backend: str) -> BlobError | None:
        rows = [r for r in self.rows if r.backend == backend]
        return max(rows, key=lambda r: r.max_rel) if rows else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "tolerance": self.tolerance,
            "backends": self.backends,
            "skipped": self.skipped,
            "inputs": {k: list(v) for k, v in self.inputs.items()},
            "rows": [r.as_dict() for r in self.rows],
            "uncompared": self.uncompared,
            "passed": self.passed,
        }

    def table(self) -> str:
        """One row per blob, max abs / max rel per backend; then a summary per backend."""
        cells: dict[str, dict[str, BlobError]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for r in self.rows:
            cells.setdefault(r.blob, {})[r.backend] = r
            shapes.setdefault(r.blob, r.shape)
        head = ["blob", "shape"] + [f"{b} abs / rel" for b in self.backends]
        body = []
        for blob, per in cells.items():
            row = [printable(blob), "x".join(map(str, shapes[blob])) or "scalar"]
            for b in self.backends:
                r = per.get(b)
                if r is None:
                    row.append("-")
                    continue
                mark = "" if r.ok(self.tolerance) else " FAIL"
                note = f" ({r.note})" if r.note and r.note != "probed" else ""
                row.append(f"{r.max_abs:.2e} / {r.max_rel:.2e}{mark}{note}")
            body.append(row)
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in [head, *body]]
        lines.append("")
        shapes_in = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in self.inputs.items())
        lines.append(f"reference: {self.reference}; inputs: {shapes_in}; "
                     f"tolerance (max rel): {self.tolerance:g}")
        probed = sorted({r.blob for r in self.rows if r.note == "probed"})
        if probed:
            lines.append(f"{len(probed)} blob(s) too large for outputs.npz compared at the "
                         "64 positions of probes.json")
        for b in self.backends:
            worst = self.worst(b)
            n = sum(1 for r in self.rows if r.backend == b)
            bad = sum(1 for r in self.failures if r.backend == b)
            if worst is None:
                lines.append(f"{b}: no blob in common with the reference")
                continue
            lines.append(
                f"{b}: {n} blobs, worst {worst.max_rel:.3g} ({worst.blob}), "
                + (f"{bad} above tolerance" if bad else "all within tolerance")
                + (f"; {self.uncompared[b]} reference blob(s) it does not produce"
                   if self.uncompared.get(b) else "")
            )
        for b, why in self.skipped.items():
            lines.append(f"{b}: skipped: {why}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(printable(line) for line in lines)


# -- inputs -----------------------------------------------------------------------------------
def net_input_shapes(
    net: Net, phase: str = "TEST", input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...] | None]:
    """The net's inputs (Input tops, consumed data tops) and their shapes: ``input_shapes``,
    else what ``surgery info`` infers (:func:`surgery.shapes.starting_shapes`)."""
    from .export.common import plan
    from .shapes import infer

    p = plan(net, phase, supported=_ALL_TYPES, infer_shapes=False, lower_losses=False,
             input_shapes=input_shapes)
    info = infer(p.flow, p.start_shapes, check_weights=False)
    return {v.name: info.shape(v) for v in p.inputs}


class _Everything(frozenset):  # a plan that only needs the inputs accepts every type
    def __contains__(self, item: object) -> bool:
        return True


_ALL_TYPES = _Everything()


def load_inputs(path: str | os.PathLike[str], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` for the net's inputs ``names``.

    One array and one input match whatever the array is called.

    Raises:
        SurgeryError: the file cannot be read, or an input is missing.
    """
    arrays = _read_npz(path, "input arrays", np.float32)
    if len(arrays) == 1 and len(names) == 1 and names[0] not in arrays:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SurgeryError(f"{path}: no array for input(s) {missing}; it holds "
                           f"{sorted(arrays)}. Save one array per net input, by name.")
    return {n: arrays[n] for n in names}


def random_inputs(shapes: Mapping[str, Sequence[int] | None], seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs of the given shapes.

    Raises:
        SurgeryError: a shape is unknown.
    """
    from ._inputs import check_alloc

    if not 0 <= seed < 2**64:
        raise SurgeryError(f"seed must be an integer in [0, 2^64); got {seed}")
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if shape is None:
            raise SurgeryError(f"the shape of input {name!r} is unknown; pass --input X.npz")
        check_alloc(12 * math.prod(shape), f"the random input {name!r} of shape {tuple(shape)}")
        out[name] = rng.standard_normal(tuple(shape)).astype(np.float32)
    return out


# -- comparison -------------------------------------------------------------------------------
def compare(got: np.ndarray, want: np.ndarray, *, as_set: bool = False
            ) -> tuple[float, float, str]:
    """``(max_abs, max_rel, note)`` of ``got`` against the reference ``want`` (rule 2, 3)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.size != want.size:
        return math.inf, math.inf, f"shape {'x'.join(map(str, got.shape))}"
    got = got.reshape(want.shape)
    if as_set and want.ndim >= 2:
        got, want = _sorted_rows(got), _sorted_rows(want)
    if not np.all(np.isfinite(got)) and not np.array_equal(got, want, equal_nan=True):
        return math.inf, math.inf, "non-finite values"
    if got.size == 0:
        return 0.0, 0.0, ""
    diff = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return diff, rel, ""


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    rows = a.reshape(-1, a.shape[-1])
    order = np.lexsort(np.round(rows, 4).T[::-1])
    return rows[order]


# -- backends ---------------------------------------------------------------------------------
Runner = Callable[[Net, dict[str, np.ndarray], str, "_Files"], dict[str, np.ndarray]]


@dataclass
class _Files:
    """The definition and weights on disk (OpenCV reads files)."""

    prototxt: str | None
    weights: str | None


def _run_onnxruntime(net: Net, inputs: dict[str, np.ndarray], phase: str, files: _Files
                     ) -> dict[str, np.ndarray]:
    from .export.onnx import run_onnx, to_onnx

    shapes = {k: v.shape for k, v in inputs.items()}
    model = to_onnx(net, input_shapes=shapes, phase=phase, expose_blobs=True)
    return run_onnx(model, inputs)  # earlier in-place versions as <blob>@<layer>


def _run_torch(net: Net, inputs: dict[str, np.ndarray], phase: str, files: _Files
               ) -> dict[str, np.ndarray]:
    from torch import nn

    from .export.torch import run_blobs, to_torch

    shapes = {k: v.shape for k, v in inputs.items()}
    module = to_torch(net, phase, shapes, keep_blobs=True)
    # The phase's BatchNorm statistics (global in TEST, the batch's in TRAIN, unless the layer
    # pins use_global_stats), as the ONNX export; Dropout off, the one random layer.
    module.train(phase == "TRAIN")
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.eval()
    return run_blobs(module, inputs)


def _run_opencv(net: Net, inputs: dict[str, np.ndarray], phase: str, files: _Files
                ) -> dict[str, np.ndarray]:
    import cv2

    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise _Skip("this OpenCV has no cv2.dnn.readNetFromCaffe (OpenCV 5 removed it)")
    axpy = next((lay.name for lay in net.layers if lay.type == "Axpy"), None)
    if axpy is not None:
        # OpenCV's importer lowers Axpy to Scale(bottom 2, bottom 0) + bottom 1, i.e.
        # a * y + x; SENet's AxpyLayer computes a * x + y (measured on SE-ResNet-50).
        raise _Skip(f"OpenCV computes Axpy ({axpy!r}) as a*y + x, SENet's layer is a*x + y: "
                    "not a reference for this net")
    with tempfile.TemporaryDirectory(prefix="surgery-verify-") as tmp:
        proto, weights = files.prototxt, files.weights
        if not net.has_weights:  # a net without learnable layers (ReLUs, pooling...)
            weights = None
        if proto is None or (weights is None and net.has_weights):
            from . import _atomic
            from .caffe_io import save

            proto = str(Path(tmp) / "net.prototxt")
            weights = str(Path(tmp) / "w.caffemodel") if net.has_weights else None
            with _atomic.standalone():  # scratch files read back at once, not outputs
                save(net, proto, weights)
        try:
            cvnet = (cv2.dnn.readNetFromCaffe(proto, weights) if weights is not None
                     else cv2.dnn.readNetFromCaffe(proto))
        except cv2.error as exc:
            raise _Skip(f"OpenCV cannot read the net: {_first_line(exc)}") from None
    if hasattr(cvnet, "enableWinograd"):  # Caffe has no Winograd: keep its rounding close
        cvnet.enableWinograd(False)
    cvnet.enableFusion(False)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    flow = resolve(net, NetState(phase))
    known = set(cvnet.getLayerNames())
    wanted: dict[str, str] = {}  # OpenCV layer -> blob (the layer that wrote it last)
    for blob in flow.blob_names():
        value = flow.latest(blob)
        layer = value.producer.layer
        if value.top_index == 0 and layer.name in known and layer.type != "Input":
            wanted.setdefault(layer.name, blob)
    for name, x in inputs.items():
        cvnet.setInput(np.ascontiguousarray(x), name)
    names = list(wanted)
    try:
        outs = cvnet.forward(names)
    except cv2.error as exc:
        raise _Skip(f"OpenCV cannot run the net: {_first_line(exc)}") from None
    return {wanted[n]: np.asarray(o) for n, o in zip(names, outs, strict=True)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return next((t for t in text if "error" in t.lower()), text[0] if text else type(exc).__name__)


class _Skip(Exception):
    """A backend that cannot run this net here (not installed, unreadable by it)."""


def _run_reference64(net: Net, inputs: dict[str, np.ndarray], phase: str, files: _Files
                     ) -> dict[str, np.ndarray]:
    from .errors import UnsupportedLayerError
    from .export.reference import run_net

    if phase != "TEST":
        raise _Skip("the float64 reference runs TEST forward passes only")
    try:
        return run_net(net, inputs, phase)
    except UnsupportedLayerError as exc:
        raise _Skip(f"no float64 reference for some layers: {_first_line(exc)}") from None


_RUNNERS: dict[str, Runner] = {
    "onnxruntime": _run_onnxruntime,
    "torch": _run_torch,
    "opencv": _run_opencv,
    "reference64": _run_reference64,
}
_MODULES = {"onnxruntime": ("onnx", "onnxruntime"), "torch": ("torch",), "opencv": ("cv2",),
            "reference64": ()}
#: The extra of caffe-surgery that installs each module a backend needs.
_EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "torch": "torch", "cv2": "all"}


def _available(backend: str) -> str | None:
    import importlib.util

    for mod in _MODULES[backend]:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'caffe-surgery[{_EXTRAS[mod]}]')"
    return None


# -- golden -----------------------------------------------------------------------------------
def _read_npz(path: str | os.PathLike[str], what: str, dtype: Any = None
              ) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (numbers only, never pickles), as ``dtype`` when given.

    Raises:
        SurgeryError: not a regular file, not an .npz, truncated, or non-numeric arrays.
    """
    import zipfile

    from ._inputs import open_regular

    with open_regular(path, what) as f:
        try:
            with np.load(f, allow_pickle=False) as z:
                if not hasattr(z, "files"):
                    raise ValueError("a single .npy array, not an .npz archive")
                arrays = {}
                for k in z.files:
                    a = z[k]
                    if a.dtype.kind not in "biuf":
                        raise ValueError(f"array {k!r} holds {a.dtype} values, not numbers")
                    arrays[k] = np.asarray(a, dtype=dtype) if dtype is not None else a
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile,
                NotImplementedError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SurgeryError(f"{path}: cannot read the {what} as .npz: {msg}") from None
    return arrays


def _read_json(path: Path, what: str) -> dict[str, Any]:
    from ._inputs import read_regular

    raw = read_regular(path, what, max_bytes=256 << 20)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise SurgeryError(f"{path}: not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _check_probes(path: Path, probes: dict[str, Any]) -> None:
    for name, probe in probes.items():
        try:
            ok = (isinstance(probe, dict)
                  and all(isinstance(d, int) and d >= 0 for d in probe["shape"])
                  and len(probe["index"]) == len(probe["value"])
                  and all(isinstance(i, int) and 0 <= i < math.prod(probe["shape"])
                          for i in probe["index"])
                  and all(isinstance(v, (int, float)) for v in probe["value"]))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise SurgeryError(f"{path}: blob {name!r}: a probe needs 'shape' (sizes), and "
                               "'index' (flat positions inside it) and 'value' (numbers) of "
                               "the same length")


def _golden(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                   dict[str, Any], dict[str, Any]]:
    inputs = _read_npz(folder / "input.npz", "golden inputs", np.float32)
    outputs = _read_npz(folder / "outputs.npz", "golden outputs")
    meta = _read_json(folder / "meta.json", "golden meta") if (
        folder / "meta.json").exists() else {}
    probes = _read_json(folder / "probes.json", "golden probes") if (
        folder / "probes.json").exists() else {}
    tol = meta.get("tolerance", 1e-4)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise SurgeryError(f"{folder / 'meta.json'}: 'tolerance' must be a number >= 0; "
                           f"found {tol!r}")
    _check_probes(folder / "probes.json", probes)
    return inputs, outputs, meta, probes


def _compare_probes(got: np.ndarray, probe: Mapping[str, Any]) -> tuple[float, float, str]:
    shape = tuple(probe["shape"])
    if got.size != math.prod(shape):
        return math.inf, math.inf, f"shape {'x'.join(map(str, got.shape))}"
    idx = np.asarray(probe["index"], dtype=np.int64)
    want = np.asarray(probe["value"], dtype=np.float64)
    diff, rel, note = compare(got.reshape(-1)[idx], want)
    return diff, rel, note or "probed"


# -- the entry point --------------------------------------------------------------------------
def verify(
    net: Net,
    *,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    golden: str | os.PathLike[str] | None = None,
    inputs: Mapping[str, np.ndarray] | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    phase: str = "TEST",
    prototxt: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> VerifyReport:
    """Run ``net`` on ``backends`` with one input and compare every common blob.

    Args:
        net: the net with its weights.
        backends: any of ``onnxruntime``, ``torch``, ``opencv``. One that is not installed,
            or (OpenCV only) cannot read the net, is skipped with the reason.
        golden: a golden folder: its ``input.npz`` is the input and Caffe's ``outputs.npz``
            (plus ``probes.json``) the reference.
        inputs: the input arrays by name (else golden, else seeded random of the inferred
            input shapes).
        tolerance: the largest relative error accepted (default: the golden's ``tolerance``,
            else 1e-4).
        seed: the seed of the random input.
        phase: the phase to run.
        prototxt: the definition file (OpenCV reads files; written to a temp folder if None).
        weights: the caffemodel file.
        input_shapes: shapes of the random input by name (default: what ``surgery info``
            infers: the Input layers', the data layers' batch_size/crop_size...).

    Returns:
        The report; ``report.passed`` says whether every blob is within the tolerance.

    Raises:
        SurgeryError: unknown backends, unreadable inputs, unknown input shapes, no backend
            able to run, or an export error of our own backends (unsupported layers...).
    """
    unknown = [b for b in backends if b not in _RUNNERS]
    if unknown or not backends:
        raise SurgeryError(f"unknown backend(s) {unknown or list(backends)}; choose from "
                           f"{', '.join(BACKENDS)}")
    phase = phase.upper()
    ref_blobs: dict[str, np.ndarray] = {}
    probes: dict[str, Any] = {}
    reference = ""
    if golden is not None:
        g_in, ref_blobs, meta, probes = _golden(Path(golden))
        reference = f"golden ({Path(golden).name}, Caffe)"
        if tolerance is None:
            tolerance = float(meta.get("tolerance", 1e-4))
        if inputs is None:
            inputs = g_in
    tolerance = 1e-4 if tolerance is None else float(tolerance)
    if tolerance < 0 or math.isnan(tolerance):
        raise SurgeryError(f"tolerance must be >= 0, got {tolerance}")
    shapes = net_input_shapes(net, phase, input_shapes)
    flow = resolve(net, NetState(phase))
    # The weights against the definition's shapes, before any input is drawn (a huge or
    # mismatched shape fails here, naming the layer, not in an allocation).
    from .shapes import infer

    infer(flow, {k: v for k, v in shapes.items() if v is not None})
    if inputs is None:
        feed = random_inputs(shapes, seed)
    else:
        missing = [n for n in shapes if n not in inputs]
        if missing:
            raise SurgeryError(f"no input array for {missing}; the net's inputs are "
                               f"{sorted(shapes)}")
        feed = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in shapes}
    for name, arr in feed.items():
        want = shapes.get(name)
        if want is not None and len(want) != arr.ndim:
            raise SurgeryError(f"input {name!r} has shape {arr.shape}; the net expects "
                               f"{len(want)} axes like {tuple(want)}")
    given = {n: tuple(a.shape) for n, a in feed.items()}
    try:
        blob_shapes = infer(flow, given).blob_shapes()
    except SurgeryError as exc:
        raise SurgeryError(f"with the input shapes {given}: {exc}") from None
    for name, want in ref_blobs.items():
        have = blob_shapes.get(name)
        if have is not None and name not in feed and np.asarray(want).size != math.prod(have):
            raise SurgeryError(
                f"{Path(golden or '') / 'outputs.npz'}: blob {name!r} has shape "
                f"{tuple(np.asarray(want).shape)}, the net gives {have}; is this the golden "
                "folder of this net?")
    files = _Files(str(prototxt) if prototxt else net.source,
                   str(weights) if weights else net.weights_source)
    report = VerifyReport(reference, tolerance, inputs={k: v.shape for k, v in feed.items()})
    results: dict[str, dict[str, np.ndarray]] = {}
    for b in backends:
        why = _available(b)
        if why is not None:
            report.skipped[b] = why
            continue
        try:
            results[b] = _RUNNERS[b](net, dict(feed), phase, files)
        except _Skip as exc:
            report.skipped[b] = str(exc)
    if not results:
        raise SurgeryError("no backend could run the net: " + "; ".join(
            f"{b}: {w}" for b, w in report.skipped.items()))
    if not ref_blobs and not probes:
        ref_name = next((b for b in ("reference64", "opencv") if b in results),
                        next(iter(results)))
        ref_blobs = results.pop(ref_name)
        report.reference = {"opencv": "opencv (independent)",
                            "reference64": "reference64 (numpy, float64)"}.get(ref_name, ref_name)
    report.backends = list(results)
    order = flow.blob_names()
    det = _detection_blobs(flow)
    splits = _split_names(flow)
    ref_names = [n for n in order if n in ref_blobs or n in probes]
    ref_names += sorted((set(ref_blobs) | set(probes)) - set(ref_names) - set(feed))
    for b, got in results.items():
        report.uncompared[b] = 0
        for name in ref_names:
            if name in feed and not _rewritten(flow, name):
                continue  # the input as given; an input rewritten in place is compared
            key = splits.get(name, name)
            if key not in got and key.split("@")[0] in got and _is_latest(flow, key):
                key = key.split("@")[0]
            if key not in got and _rewritten(flow, name):
                # ONNX keeps the input's name for the graph input: the rewritten last
                # version of an in-place-modified input is exposed as <blob>@<layer>
                key = f"{name}@{flow.latest(name).producer.layer.name}"
            if key not in got:
                report.uncompared[b] += 1
                continue
            if name in ref_blobs:
                want = ref_blobs[name]
                diff, rel, note = compare(got[key], want, as_set=name in det)
                shape = tuple(want.shape)
            else:
                diff, rel, note = _compare_probes(got[key], probes[name])
                shape = tuple(probes[name]["shape"])
            report.rows.append(BlobError(name, b, shape, diff, rel, note))
    return report


def _rewritten(flow: Dataflow, blob: str) -> bool:
    """True when a layer writes ``blob`` in place after it was fed (Caffe exposes that)."""
    try:
        return bool(flow.latest(blob).producer.inputs)
    except SurgeryError:
        return False


def _detection_blobs(flow: Dataflow) -> set[str]:
    return {v.name for n in flow.nodes if n.layer.type == "DetectionOutput" for v in n.outputs}


def _split_names(flow: Dataflow) -> dict[str, str]:
    """Caffe's inserted split blobs (``<blob>_<layer>_<top>_split_<i>``) -> ``<blob>@<layer>``.

    A split copies the version of ``<blob>`` that ``<layer>`` wrote, one copy per reader (a
    loss top counts one more); it is looked up under the plain blob name when that version is
    the last one.
    """
    out: dict[str, str] = {}
    for node in flow.nodes:
        for v in node.outputs:
            for i in range(len(flow.consumers(v)) + 1):
                out[f"{v.name}_{node.layer.name}_{v.top_index}_split_{i}"] = (
                    f"{v.name}@{node.layer.name}")
    return out


def _is_latest(flow: Dataflow, key: str) -> bool:
    blob, _, layer = key.partition("@")
    try:
        return flow.latest(blob).producer.layer.name == layer
    except SurgeryError:
        return False
