"""Reading and writing Caffe files: ``.prototxt`` <-> :class:`~surgery.net.Net` <-> ``.caffemodel``.

The only module (with :mod:`surgery.upgrade`) that touches ``caffe_pb2``.

- Text definitions go through protobuf's own text format; a field that is not in our schema
  (BVLC plus the known forks) fails the load naming file, line and field -- never dropped.
- Legacy V0/V1 definitions, ``input:`` fields and old BatchNorm params are upgraded as Caffe
  does on every read (:mod:`surgery.upgrade`); each applied upgrade is recorded in
  ``Net.upgrades``.
- Weights are read by scanning the wire format (:mod:`surgery._wire`): blobs are zero-copy
  read-only views of a memory-mapped file, written back by streaming each blob's bytes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from . import _atomic, _unknown_fields, _wire
from ._inputs import read_regular
from ._proto import caffe_pb2
from .errors import NetError, ParseError, SurgeryError
from .layers import _is_repeated, param_field_for
from .net import Layer, Net, Param, Rule, Verbatim, freeze_array

__all__ = [
    "load",
    "save",
    "read_net_param",
    "net_from_proto",
    "net_to_proto",
    "layer_to_proto",
    "net_to_text",
    "attach_weights",
    "write_text_atomic",
    "write_bytes_atomic",
    "WeightReport",
    "read_blob_proto",
    "blob_proto_bytes",
    "parse_datum",
    "datum_bytes",
]

PathLike = str | os.PathLike[str]

# LayerParameter fields modelled by Layer itself; everything else goes to Layer.extra.
_LAYER_CORE = {"name", "type", "bottom", "top", "param", "blobs", "include", "exclude"}


# -- message <-> plain Python values ----------------------------------------------------------
def _value_to_py(fd: Any, value: Any) -> Any:
    if fd.message_type is not None:
        return msg_to_dict(value)
    if fd.enum_type is not None:
        ev = fd.enum_type.values_by_number.get(value)
        return ev.name if ev is not None else int(value)
    return value


def msg_to_dict(msg: Any) -> dict[str, Any]:
    """The fields ``msg`` has set, as plain Python values (enums as names), in field order."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        if _is_repeated(fd):
            out[fd.name] = [_value_to_py(fd, v) for v in value]
        else:
            out[fd.name] = _value_to_py(fd, value)
    return out


def _py_to_scalar(fd: Any, value: Any, where: str) -> Any:
    if fd.enum_type is not None and isinstance(value, str):
        ev = fd.enum_type.values_by_name.get(value)
        if ev is None:
            names = ", ".join(fd.enum_type.values_by_name)
            raise NetError(f"{where}: {fd.name} must be one of {names}, got {value!r}")
        return ev.number
    return value


def dict_to_msg(d: dict[str, Any], msg: Any, where: str = "") -> Any:
    """Set ``msg``'s fields from a dict made by :func:`msg_to_dict` (or by hand).

    Raises:
        NetError: a key is not a field of the message, or a value has the wrong type.
    """
    fields = msg.DESCRIPTOR.fields_by_name
    for key, value in d.items():
        fd = fields.get(key)
        if fd is None:
            raise NetError(
                f"{where or msg.DESCRIPTOR.name}: {msg.DESCRIPTOR.name} has no field {key!r}"
            )
        try:
            if fd.message_type is not None:
                if _is_repeated(fd):
                    target = getattr(msg, key)
                    for item in value:
                        dict_to_msg(item, target.add(), where)
                else:
                    sub = getattr(msg, key)
                    sub.SetInParent()
                    dict_to_msg(value, sub, where)
            elif _is_repeated(fd):
                getattr(msg, key).extend(_py_to_scalar(fd, v, where) for v in value)
            else:
                setattr(msg, key, _py_to_scalar(fd, value, where))
        except (TypeError, ValueError) as exc:
            raise NetError(f"{where}: bad value for {key}: {value!r} ({exc})") from None
    return msg


# -- LayerParameter <-> Layer -----------------------------------------------------------------
def _rule_from_proto(r: Any) -> Rule:
    return Rule(
        phase=caffe_pb2.Phase.Name(r.phase) if r.HasField("phase") else None,
        min_level=r.min_level if r.HasField("min_level") else None,
        max_level=r.max_level if r.HasField("max_level") else None,
        stage=list(r.stage),
        not_stage=list(r.not_stage),
    )


def _rule_to_proto(rule: Rule, r: Any) -> None:
    if rule.phase is not None:
        r.phase = caffe_pb2.Phase.Value(rule.phase)
    if rule.min_level is not None:
        r.min_level = rule.min_level
    if rule.max_level is not None:
        r.max_level = rule.max_level
    r.stage.extend(rule.stage)
    r.not_stage.extend(rule.not_stage)


def _blob_from_proto(b: Any) -> np.ndarray:
    if b.HasField("shape"):
        shape = tuple(b.shape.dim)
    elif any(b.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (b.num, b.channels, b.height, b.width)
    else:
        shape = (len(b.data) or len(b.double_data),)
    n = len(b.double_data) or len(b.data)
    if any(d < 0 for d in shape) or math.prod(shape) != n:
        raise ParseError(f"a blob holds {n} values but its shape {shape} needs "
                         f"{math.prod(shape) if all(d >= 0 for d in shape) else 'a size >= 0'}")
    data = (
        np.asarray(b.double_data, np.float64)
        if len(b.double_data)
        else np.asarray(b.data, np.float32)
    )
    return freeze_array(data.reshape(shape))


def layer_from_proto(lp: Any) -> Layer:
    """Build a :class:`Layer` from a (V2) ``LayerParameter``."""
    pfield = param_field_for(lp.type)
    attrs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for fd, value in lp.ListFields():
        if fd.name in _LAYER_CORE:
            continue
        py = [_value_to_py(fd, v) for v in value] if _is_repeated(fd) else _value_to_py(fd, value)
        if fd.name == pfield and py:
            attrs = py  # an empty `foo_param {}` stays in extra so it round-trips
        else:
            extra[fd.name] = py
    params: list[Param] = []
    for spec in lp.param:
        params.append(
            Param(
                lr_mult=spec.lr_mult if spec.HasField("lr_mult") else None,
                decay_mult=spec.decay_mult if spec.HasField("decay_mult") else None,
                name=spec.name if spec.HasField("name") else None,
                share_mode=(
                    caffe_pb2.ParamSpec.DimCheckMode.Name(spec.share_mode)
                    if spec.HasField("share_mode")
                    else None
                ),
                declared=True,
            )
        )
    for i, b in enumerate(lp.blobs):  # weights embedded in a definition (rare)
        while len(params) <= i:
            params.append(Param())
        params[i].data = _blob_from_proto(b)
    return Layer(
        name=lp.name,
        type=lp.type,
        bottoms=list(lp.bottom),
        tops=list(lp.top),
        params=params,
        attrs=attrs,
        param_field=pfield,
        include=[_rule_from_proto(r) for r in lp.include],
        exclude=[_rule_from_proto(r) for r in lp.exclude],
        extra=extra,
    )


def layer_to_proto(layer: Layer, *, with_blobs: bool = False) -> Any:
    """The ``LayerParameter`` for ``layer`` (blobs only when ``with_blobs``).

    Raises:
        NetError: an attribute is not a field of the layer's parameter message.
    """
    lp = caffe_pb2.LayerParameter()
    where = f"layer {layer.name!r} ({layer.type})"
    if layer.name:  # an unnamed layer (legal in Caffe) stays unnamed
        lp.name = layer.name
    if layer.type:
        lp.type = layer.type
    lp.bottom.extend(layer.bottoms)
    lp.top.extend(layer.tops)
    last_spec = max((i for i, p in enumerate(layer.params) if p.has_spec), default=-1)
    for p in layer.params[: last_spec + 1]:
        spec = lp.param.add()
        if p.name is not None:
            spec.name = p.name
        if p.share_mode is not None:
            spec.share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(p.share_mode)
        if p.lr_mult is not None:
            spec.lr_mult = p.lr_mult
        if p.decay_mult is not None:
            spec.decay_mult = p.decay_mult
    for rule in layer.include:
        _rule_to_proto(rule, lp.include.add())
    for rule in layer.exclude:
        _rule_to_proto(rule, lp.exclude.add())
    pfield = layer.param_field or param_field_for(layer.type)
    if layer.attrs:
        if pfield is None:
            raise NetError(
                f"{where}: has parameters {sorted(layer.attrs)} but type {layer.type!r} has no "
                "*_param message in the schema"
            )
        dict_to_msg({pfield: layer.attrs}, lp, where)
    dict_to_msg(layer.extra, lp, where)
    if with_blobs:
        for p in layer.params:
            if p.data is None:
                continue
            b = lp.blobs.add()
            b.shape.dim.extend(int(d) for d in p.data.shape)
            b.data.extend(np.asarray(p.data, np.float32).ravel().tolist())
    return lp


# -- NetParameter <-> Net ---------------------------------------------------------------------
def _line_of(text: str, offset_line: int) -> str:
    lines = text.splitlines()
    return lines[offset_line - 1].strip() if 0 < offset_line <= len(lines) else ""


def read_net_param(path: PathLike) -> Any:
    """Parse a text ``.prototxt`` into a ``NetParameter`` (no upgrade).

    Raises:
        ParseError: unreadable file, binary input, or a text-format error (with file:line).
    """
    return _parse_text_file(path, caffe_pb2.NetParameter())


#: protobuf's own limit on nested messages (``TextFormat::Parser``'s recursion limit):
#: Caffe stops at the same depth.
MAX_NESTING = 100


def _check_nesting(p: Path, raw: bytes) -> None:
    """Refuse text nested deeper than :data:`MAX_NESTING` braces before parsing it.

    One numpy pass over the brace positions (braces inside strings and comments are counted
    too; a real net nests 3-4 deep, so that only matters for hostile files).
    """
    arr = np.frombuffer(raw, np.uint8)
    idx = np.flatnonzero((arr == 0x7B) | (arr == 0x7D))  # { }
    if idx.size <= MAX_NESTING:
        return
    depth = np.cumsum(np.where(arr[idx] == 0x7B, 1, -1).astype(np.int32))
    deep = np.flatnonzero(depth > MAX_NESTING)
    if deep.size:
        at = int(idx[deep[0]])
        line = raw.count(b"\n", 0, at) + 1
        raise ParseError(f"{p}:{line}: messages nested deeper than {MAX_NESTING} levels "
                         "(protobuf's and Caffe's limit); is this a network definition?")


#: Caffe's ``kMaxBlobAxes``: a shape with more dims is refused (blob.hpp).
_MAX_AXES = 32
_TOO_MANY_DIMS = re.compile(rb"(?:\bdim\s*:\s*-?\d+\s*){%d}" % (_MAX_AXES + 1))
# Legacy input_dim: 4 per input; 4096 in a row would be over 1,000 inputs.
_TOO_MANY_INPUT_DIMS = re.compile(rb"(?:\binput_dim\s*:\s*-?\d+\s*){4097}")


def _check_dims(p: Path, raw: bytes) -> None:
    """Refuse a shape with more dims than Caffe allows before the (slow) text parser sees
    it: a 50 MB file of ``dim: 1`` would otherwise take minutes to parse, only to be refused."""
    for pattern, what in ((_TOO_MANY_DIMS, f"more than {_MAX_AXES} dims in one shape "
                           "(Caffe's limit, kMaxBlobAxes)"),
                          (_TOO_MANY_INPUT_DIMS, "more than 4096 input_dim values in a row")):
        m = pattern.search(raw)
        if m:
            line = raw.count(b"\n", 0, m.start()) + 1
            raise ParseError(f"{p}:{line}: {what}; is this the right file?")


def _parse_text_file(
    path: PathLike,
    msg: Any,
    allow_unknown_field: bool = False,
    verbatim: list[_unknown_fields.Unknown] | None = None,
) -> Any:
    """Parse a text proto file into ``msg``.

    With ``verbatim`` (a list), a definition that sets fields our schema does not know is
    parsed without them, and each is appended to ``verbatim`` as written (see
    :mod:`surgery._unknown_fields`); otherwise such a field is a :class:`ParseError`.
    """
    p = Path(path)
    raw = read_regular(p, "definition")
    if b"\x00" in raw[:4096]:
        raise ParseError(
            f"{p}: this looks like a binary file (a .caffemodel?), not a text .prototxt; "
            "pass weights with --weights"
        )
    _check_nesting(p, raw)
    _check_dims(p, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(f"{p}: not UTF-8 text at byte {exc.start}; is this a .prototxt?") from None
    try:
        try:
            text_format.Parse(text, msg, allow_unknown_extension=False,
                              allow_unknown_field=allow_unknown_field)
        except text_format.ParseError as exc:
            if verbatim is None or "has no field named" not in str(exc):
                raise
            clean, found = _unknown_fields.split_unknown(text, msg.DESCRIPTOR)
            if not found:
                raise
            msg.Clear()
            text_format.Parse(clean, msg, allow_unknown_extension=False)
            verbatim.extend(found)
    except text_format.ParseError as exc:
        line = getattr(exc, "GetLine", lambda: None)()
        col = getattr(exc, "GetColumn", lambda: None)()
        detail = str(exc)
        # protobuf prefixes "line:col : "; keep only the message part
        if line is not None and detail.startswith(f"{line}:"):
            detail = detail.split(" : ", 1)[-1]
        hint = _parse_hint(detail, text)
        loc = f"{p}:{line}:{col}" if line is not None else str(p)
        src = _line_of(text, line) if line else ""
        raise ParseError(
            f"{loc}: {detail}" + (f" (in: {src!r})" if src else "") + (f". {hint}" if hint else "")
        ) from None
    return msg


def _parse_hint(detail: str, text: str) -> str:
    if "has no field named" in detail:
        solver_words = ("base_lr", "lr_policy", "max_iter", "snapshot_prefix")
        if any(w in text for w in solver_words) and "layer" not in text:
            return "This looks like a solver file; give the net definition it names instead"
        if "item" in detail and "LabelMap" not in detail and "label" in text:
            return "This looks like an SSD labelmap, not a network definition"
        return (
            "The field is not in Caffe's schema nor in the forks we know; check its spelling, "
            "or remove it if your Caffe fork added it"
        )
    return ""


# -- solver files and solver states ----------------------------------------------------------
_TOKEN = re.compile(
    r"""\s+|#[^\n]*|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'"""
    r"""|[{}<>\[\]:;,]|[^\s{}<>\[\]:;,"'#]+"""
)


def _top_level_names(text: str) -> list[str]:
    """Field names written at the top level of a text proto, in order (comments, strings and
    nested messages skipped)."""
    toks = [t for t in _TOKEN.findall(text) if t.strip() and not t.startswith("#")]
    names: list[str] = []
    i, n = 0, len(toks)
    while i < n:
        names.append(toks[i])
        i += 1
        if i < n and toks[i] == ":":
            i += 1
        if i < n and toks[i] in "{<[":
            depth = 0
            while i < n:
                depth += toks[i] in ("{", "<", "[")
                depth -= toks[i] in ("}", ">", "]")
                i += 1
                if depth == 0:
                    break
        else:
            i += 1  # the scalar value
        while i < n and toks[i] in (";", ","):
            i += 1
    return names


def read_solver(path: PathLike) -> tuple[dict[str, Any], list[str]]:
    """Parse a ``solver.prototxt``: the fields it sets (as :func:`msg_to_dict` gives them) and
    the top-level field names our ``SolverParameter`` does not know (all of them, in order).

    Raises:
        ParseError: unreadable file or a text-format error in a known field (with file:line).
    """
    msg = _parse_text_file(path, caffe_pb2.SolverParameter(), allow_unknown_field=True)
    known = caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name
    text = Path(path).read_text(encoding="utf-8")
    unknown = list(dict.fromkeys(w for w in _top_level_names(text) if w not in known))
    return msg_to_dict(msg), unknown


def solver_defaults() -> dict[str, Any]:
    """The default of every scalar ``SolverParameter`` field that declares one (enums by name),
    from the schema."""
    out: dict[str, Any] = {}
    for fd in caffe_pb2.SolverParameter.DESCRIPTOR.fields:
        if not _is_repeated(fd) and fd.message_type is None and fd.has_default_value:
            out[fd.name] = _value_to_py(fd, fd.default_value)
    return out


def net_from_dict(d: dict[str, Any], source: str) -> Net:
    """A net given inline as a dict (a solver's ``net_param``), upgraded as Caffe does.

    Raises:
        ParseError: the legacy upgrade fails.
        NetError: a field is not in the schema.
    """
    from .upgrade import upgrade_net

    msg = dict_to_msg(d, caffe_pb2.NetParameter(), source)
    try:
        notes = upgrade_net(msg, source)
    except ValueError as exc:
        raise ParseError(f"{source}: {exc}") from None
    return net_from_proto(msg, source, notes)


def read_solver_state(path: PathLike) -> dict[str, Any]:
    """Read a Caffe ``.solverstate`` (binary ``SolverState``).

    Returns:
        ``{"iter", "learned_net", "current_step", "history"}``; ``history`` is a list of
        float32 arrays with the blobs' shapes (legacy 4-D num/channels/height/width kept).

    Raises:
        ParseError: unreadable, HDF5, or not a SolverState.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ParseError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if raw[:8] == b"\x89HDF\r\n\x1a\n":
        raise ParseError(f"{p}: an HDF5 solverstate; only Caffe's BINARYPROTO format is read "
                         "(snapshot_format: BINARYPROTO, Caffe's default)")
    msg = caffe_pb2.SolverState()
    try:
        msg.ParseFromString(raw)
    except Exception:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise ParseError(f"{p}: not a Caffe SolverState (binary .solverstate)") from None
    return {"iter": int(msg.iter), "learned_net": msg.learned_net,
            "current_step": int(msg.current_step),
            "history": [_blob_from_proto(b) for b in msg.history]}


def write_solver_state(path: PathLike, *, iter: int, learned_net: str,
                       history: list[np.ndarray], current_step: int = 0) -> None:
    """Write a Caffe ``.solverstate`` atomically (``SolverState``: iter, learned_net, one
    ``BlobProto`` per history blob with its shape and float data, current_step).

    Raises:
        SurgeryError: the file cannot be written.
    """
    msg = caffe_pb2.SolverState()
    msg.iter = int(iter)
    msg.learned_net = str(learned_net)
    msg.current_step = int(current_step)
    for h in history:
        b = msg.history.add()
        b.shape.dim.extend(int(d) for d in h.shape)
        b.data.extend(np.asarray(h, dtype=np.float32).ravel().tolist())
    write_bytes_atomic(path, msg.SerializeToString())


def net_from_proto(msg: Any, source: str | None = None, upgrades: list[str] | None = None) -> Net:
    """Build a :class:`Net` from an already-upgraded (V2) ``NetParameter``."""
    extra: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        if fd.name in ("name", "layer"):
            continue
        extra[fd.name] = (
            [_value_to_py(fd, v) for v in value] if _is_repeated(fd) else _value_to_py(fd, value)
        )
    layers = [layer_from_proto(lp) for lp in msg.layer]
    return Net(msg.name, layers, extra, source, upgrades)


def net_to_proto(net: Net, *, with_blobs: bool = False) -> Any:
    """The ``NetParameter`` for ``net``."""
    msg = caffe_pb2.NetParameter()
    if net.name:
        msg.name = net.name
    dict_to_msg(net.extra, msg, f"net {net.name!r}")
    for layer in net.layers:
        msg.layer.append(layer_to_proto(layer, with_blobs=with_blobs))
    return msg


def net_to_text(net: Net) -> str:
    """The ``.prototxt`` text for ``net`` (protobuf's own text format, as Caffe reads it).

    Fields our schema does not know (:attr:`Layer.verbatim`, :attr:`Net.verbatim`) are
    written back as they were read, at the end of the block that held them.
    """
    msg = net_to_proto(net)
    if not net.verbatim and not any(lay.verbatim for lay in net.layers):
        return text_format.MessageToString(msg)
    layers = list(msg.layer)
    msg.ClearField("layer")
    head = text_format.MessageToString(msg)
    if net.verbatim:
        head = _unknown_fields.insert_unknown(head, [(v.path, v.text) for v in net.verbatim], 0)
    parts = [head]
    for layer, lp in zip(net.layers, layers, strict=True):
        body = text_format.MessageToString(lp, indent=2)
        if layer.verbatim:
            body = _unknown_fields.insert_unknown(
                body, [(v.path, v.text) for v in layer.verbatim], 2)
        parts.append("layer {\n" + body + "}\n")
    return "".join(parts)


# -- weights ----------------------------------------------------------------------------------
class WeightReport:
    """What :func:`attach_weights` did: layers given weights, and weight-file layers unused."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.unused: list[str] = []
        self.splits_ignored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "loaded": list(self.loaded),
            "unused": list(self.unused),
            "splits_ignored": self.splits_ignored,
        }


def attach_weights(net: Net, wf: _wire.WeightFile) -> WeightReport:
    """Give each layer of ``net`` the blobs of the same-named layer in ``wf`` (all phases).

    Blobs are kept as read-only (memory-mapped) arrays. Legacy 4-D blob shapes are reshaped to
    what the definition implies when shape inference can tell (Caffe compares trailing axes).
    """
    report = WeightReport()
    records: dict[str, _wire.LayerRecord] = {}
    for rec in wf.layers:
        if rec.is_split:
            report.splits_ignored += 1
            continue
        if rec.blobs or rec.name not in records:
            records[rec.name] = rec  # Caffe's CopyTrainedLayersFrom: a later namesake overwrites
    used: set[str] = set()
    loaded: set[str] = set()
    for layer in net.layers:
        rec = records.get(layer.name)
        if rec is None or not rec.blobs:
            continue
        used.add(layer.name)
        for i, blob in enumerate(rec.blobs):
            while len(layer.params) <= i:
                layer.params.append(Param())
            layer.params[i].data = (
                _squeeze_legacy(layer.type, i, blob.data) if blob.legacy_4d else blob.data
            )
        if layer.name not in loaded:  # a set: a list lookup here was quadratic
            loaded.add(layer.name)
            report.loaded.append(layer.name)
    report.unused = [r.name for r in wf.layers if not r.is_split and r.name not in used and r.blobs]
    _fix_legacy_shapes(net)
    return report


# The rank of each learnable blob Caffe creates, for the layer types whose blobs legacy V0/V1
# caffemodels store as num/channels/height/width (a bias as 1x1x1xN, an InnerProduct weight as
# 1x1xNxK). Known without shape inference, so it holds when the definition's data layers hide the
# input shape; Caffe refuses a written `shape { dim: 1 dim: 1 dim: 1 dim: N }` for a bias.
_V2_BLOB_RANKS = {
    "Convolution": (4, 1),
    "Deconvolution": (4, 1),
    "ConvolutionDepthwise": (4, 1),
    "DepthwiseConvolution": (4, 1),
    "InnerProduct": (2, 1),
}


def _squeeze_legacy(layer_type: str, index: int, data: np.ndarray) -> np.ndarray:
    """A legacy 4-D blob with its leading 1s dropped down to the rank Caffe creates."""
    ranks = _V2_BLOB_RANKS.get(layer_type)
    if ranks is None or index >= len(ranks) or data.ndim <= ranks[index]:
        return data
    cut = data.ndim - ranks[index]
    if any(d != 1 for d in data.shape[:cut]):
        return data
    return freeze_array(data.reshape(data.shape[cut:]))


def _fix_legacy_shapes(net: Net) -> None:
    """Reshape legacy (num, channels, height, width) blobs to the shapes Caffe would create
    (Scale, BatchNorm, PReLU...: the shapes shape inference gives; trailing axes must agree)."""
    suspects = {
        id(lay)
        for lay in net.layers
        if any(p.data is not None and p.data.ndim == 4 for p in lay.params)
        and lay.type not in _V2_BLOB_RANKS
    }
    if not suspects:
        return
    from .dataflow import resolve
    from .net import NetState
    from .shapes import guess_dataset_shapes, infer

    for phase in ("TEST", "TRAIN"):
        try:
            flow = resolve(net, NetState(phase))
            info = infer(flow, guess_dataset_shapes(flow)[0], check_weights=False)
        except SurgeryError:
            continue
        for node in flow.nodes:
            if id(node.layer) not in suspects:
                continue
            for p, shape in zip(node.layer.params, info.params(node) or [], strict=False):
                if (
                    p.data is not None
                    and shape is not None
                    and p.data.shape != tuple(shape)
                    and _trailing_equal(p.data.shape, tuple(shape))
                ):
                    p.data = freeze_array(p.data.reshape(shape))


def _trailing_equal(legacy: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Caffe's Blob::ShapeEquals for legacy 4-D blobs: leading 1s, then the same dims."""
    if len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + shape
    return tuple(legacy) == padded


# -- public entry points ----------------------------------------------------------------------
def load(
    prototxt: PathLike,
    weights: PathLike | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Net:
    """Read a network definition (any Caffe format) and optionally its weights.

    Args:
        prototxt: a text ``.prototxt`` (V0, V1 or V2; upgraded as Caffe does).
        weights: a binary ``.caffemodel`` (V0, V1 or V2), matched to layers by name.
        progress: called with (bytes done, bytes total) while scanning weights.

    Returns:
        The net; ``net.upgrades`` lists the upgrades applied; with weights,
        ``net.weight_report`` says which layers got weights and which were unused.

    Raises:
        ParseError: the file cannot be read or parsed (message names file and line).
        NetError: the definition is inconsistent in a way the upgrade cannot fix.
    """
    from .upgrade import upgrade_net

    unknown: list[_unknown_fields.Unknown] = []
    msg = _parse_text_file(prototxt, caffe_pb2.NetParameter(), verbatim=unknown)
    names = [lp.name for lp in msg.layer]
    try:
        notes = upgrade_net(msg, str(prototxt))
    except ValueError as exc:
        raise ParseError(f"{prototxt}: {exc}") from None
    net = net_from_proto(msg, str(prototxt), notes)
    if not net.layers:
        raise ParseError(f"{prototxt}: defines no layers; is this the network definition?")
    if unknown:
        _attach_verbatim(net, names, unknown, str(prototxt))
    if weights is not None:
        wf = read_weights(weights, progress=progress)
        report = attach_weights(net, wf)
        if not report.loaded and any(r.blobs for r in wf.layers):
            names = sorted({r.name for r in wf.layers if r.blobs})
            raise ParseError(
                f"{weights}: none of its {len(names)} layer(s) with weights "
                f"({', '.join(repr(n) for n in names[:3])}{', ...' if len(names) > 3 else ''}) "
                f"is named like a layer of {prototxt}; is this the caffemodel for that net?"
            )
        net.weight_report = report  # type: ignore[attr-defined]
        net.weights_source = str(weights)
    return net


def _attach_verbatim(net: Net, names: list[str], unknown: list[_unknown_fields.Unknown],
                     source: str) -> None:
    """Give each layer (matched by name and occurrence, which upgrades keep) the fields our
    schema does not know, as written."""
    by_key: dict[tuple[str, int], Layer] = {}
    count: dict[str, int] = {}
    for layer in net.layers:
        n = count.get(layer.name, 0)
        count[layer.name] = n + 1
        by_key[(layer.name, n)] = layer
    for u in unknown:
        v = Verbatim(u.path, u.name, u.text, f"{source}:{u.line}")
        if u.layer is None:
            net.verbatim.append(v)
            continue
        name = names[u.layer]
        layer = by_key.get((name, names[: u.layer].count(name)))
        if layer is None:  # pragma: no cover - upgrades keep V2 layers and their names
            raise ParseError(f"{v.where}: field {u.name!r} is not in the schema (layer "
                             f"{name!r} could not be matched after the upgrade)")
        layer.verbatim.append(v)


def read_weights(
    path: PathLike, *, progress: Callable[[int, int], None] | None = None
) -> _wire.WeightFile:
    """Scan a ``.caffemodel`` (zero-copy, memory-mapped).

    Raises:
        ParseError: unreadable, truncated or not a caffemodel.
    """
    try:
        wf = _wire.read_caffemodel(path, progress=progress)
    except OSError as exc:
        raise ParseError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ParseError(str(exc)) from None
    if not wf.layers:
        raise ParseError(f"{path}: holds no layers ({os.path.getsize(path):,} bytes); "
                         "not a caffemodel, or an empty one")
    return wf


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder + rename.

    Joins the set of outputs open in this thread (:func:`surgery._atomic.outputs`), if any.

    Raises:
        SurgeryError: the file cannot be written (``path`` is left untouched).
    """
    _atomic.write_text(path, text)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder + rename.

    Joins the set of outputs open in this thread (:func:`surgery._atomic.outputs`), if any.

    Raises:
        SurgeryError: the file cannot be written (``path`` is left untouched).
    """
    _atomic.write_bytes(path, data)


def save(
    net: Net,
    prototxt: PathLike | None = None,
    weights: PathLike | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the definition and/or the weights atomically, as a set (both or neither).

    The caffemodel is V2 (``layer``, field 100): one record per layer name that has weights,
    with the full layer definition, as Caffe's ``Net::ToProto`` writes it.

    Everything is built and validated before the first file is written, so a net that cannot
    be saved leaves neither file behind.

    Raises:
        NetError: the net cannot be expressed in Caffe's schema, or a layer has weights for
            only some of its blobs.
        SurgeryError: a weights file is requested but the net has no weights, or a file
            cannot be written.
    """
    text = net_to_text(net) if prototxt is not None else None
    records: list[tuple[bytes, list[np.ndarray]]] = []
    if weights is not None:
        seen: set[str] = set()
        for layer in net.layers:
            if layer.name in seen or not layer.has_weights:
                continue
            seen.add(layer.name)
            missing = [i for i, p in enumerate(layer.params) if p.data is None]
            if missing:
                raise NetError(
                    f"layer {layer.name!r} has weights for some blobs but not blob(s) {missing}; "
                    "fill them (e.g. with surgery transplant) before saving a caffemodel"
                )
            header = layer_to_proto(layer).SerializeToString()
            records.append((header, [p.data for p in layer.params]))
        if not records:
            what = net.source or "the net"
            raise SurgeryError(f"{weights}: nothing to write: {what} has no layer with "
                               "learnable blobs (weights)")
    with _atomic.outputs() as out:  # both files or neither
        if text is not None:
            out.write_text(prototxt, text)  # type: ignore[arg-type]
        if weights is not None:
            head = caffe_pb2.NetParameter()
            if net.name:
                head.name = net.name
            try:
                _wire.write_caffemodel(weights, head.SerializeToString(), records,
                                       progress=progress)
            except OSError as exc:
                raise SurgeryError(f"{weights}: cannot write: {exc.strerror or exc}") from None


# -- data files: BlobProto (mean.binaryproto) and Datum (LMDB/LevelDB values) ----------------
def read_blob_proto(path: PathLike) -> np.ndarray:
    """Read a binary ``BlobProto`` file (``compute_image_mean``'s ``mean.binaryproto``).

    Returns:
        The blob as a float32 array in its own shape: ``(num, channels, height, width)`` for
        legacy blobs (as ``compute_image_mean`` writes them), else ``shape.dim``.

    Raises:
        ParseError: the file cannot be read or is not a BlobProto.
    """
    raw = read_regular(path, "mean file")
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(raw)
    except Exception:  # protobuf's DecodeError
        raise ParseError(f"{path}: not a binary BlobProto (a mean.binaryproto file)") from None
    n = len(blob.data) or len(blob.double_data)
    if not n:
        raise ParseError(f"{path}: the BlobProto holds no data (is this a mean file?)")
    try:
        array = np.array(_blob_from_proto(blob), np.float32)
    except ParseError as exc:
        raise ParseError(f"{path}: {exc}") from None
    return array


def blob_proto_bytes(array: np.ndarray) -> bytes:
    """Serialize ``array`` as a ``BlobProto`` with Caffe's legacy 4-D fields, as
    ``compute_image_mean`` writes a mean: ``(C, H, W)`` -> num 1, channels C, height H, width W.

    Raises:
        SurgeryError: the array has more than 4 axes.
    """
    a = np.asarray(array, np.float32)
    if a.ndim > 4:
        raise SurgeryError(f"a BlobProto mean has at most 4 axes; got shape {a.shape}")
    dims = (1,) * (4 - a.ndim) + a.shape
    blob = caffe_pb2.BlobProto(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
    blob.data.extend(a.ravel().tolist())
    return blob.SerializeToString()


def parse_datum(raw: bytes) -> Any:
    """Parse one LMDB/LevelDB value as a ``caffe_pb2.Datum``.

    Raises:
        ValueError: the bytes are not a Datum.
    """
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(raw)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"not a Datum ({exc})") from None
    return datum


def datum_bytes(
    data: bytes | np.ndarray | None = None,
    *,
    label: int = 0,
    shape: tuple[int, int, int] | None = None,
    float_data: np.ndarray | None = None,
    encoded: bool = False,
) -> bytes:
    """Serialize a ``Datum`` as ``convert_imageset`` writes it.

    Args:
        data: uint8 pixels (C, H, W), or the bytes of an encoded image.
        label: the label.
        shape: (C, H, W) when ``data`` is bytes or ``float_data`` is given flat.
        float_data: float pixels instead of ``data``.
        encoded: ``data`` is an encoded image (JPEG/PNG bytes).
    """
    datum = caffe_pb2.Datum(label=int(label), encoded=bool(encoded))
    if isinstance(data, np.ndarray):
        shape = shape or tuple(data.shape)  # type: ignore[assignment]
        data = np.ascontiguousarray(data, np.uint8).tobytes()
    if float_data is not None:
        shape = shape or tuple(np.shape(float_data))  # type: ignore[assignment]
        datum.float_data.extend(np.asarray(float_data, np.float32).ravel().tolist())
    if data is not None:
        datum.data = bytes(data)
    if shape is not None:
        datum.channels, datum.height, datum.width = (int(d) for d in shape)
    return datum.SerializeToString()
