"""Fast caffemodel I/O on the protobuf wire format, without protobuf.

A caffemodel is one serialized ``NetParameter``. Almost all of its bytes are packed float arrays
inside ``BlobProto.data``; everything else (names, layer parameters) is a few kilobytes. Parsing it
with protobuf copies every float into a Python-side repeated field (and refuses files over 2 GiB),
so instead this module walks the wire format by hand: it reads the tags and length prefixes of the
few messages that lead to a blob, jumps over the packed data with its length prefix, and hands the
data back as a read-only numpy view of a memory-mapped file. Scanning costs O(number of fields),
not O(bytes), and no tensor byte is copied: it stays in the page cache until something touches it.

Everything that is not a blob is kept as raw bytes (``LayerRecord.header``,
``WeightFile.net_header``) so ``caffe_io`` can parse it with the real ``caffe_pb2`` messages; this
module imports no protobuf.

Field numbers (BVLC ``caffe.proto``)::

    NetParameter       name=1  layers=2 (V1LayerParameter)  layer=100 (LayerParameter)
    LayerParameter     name=1  type=2 (string)  blobs=7
    V1LayerParameter   layer=1 (V0LayerParameter)  name=4  type=5 (enum)  blobs=6
    V0LayerParameter   name=1  type=2 (string)  blobs=50
    BlobProto          num=1 channels=2 height=3 width=4  data=5  diff=6  shape=7
                       double_data=8  double_diff=9
    BlobShape          dim=1 (repeated int64, packed)
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from math import prod

import numpy as np

from . import _atomic

__all__ = [
    "BlobRecord",
    "LayerRecord",
    "WeightFile",
    "read_caffemodel",
    "write_caffemodel",
    "V1_LAYER_TYPES",
]

Progress = Callable[[int, int], None]

# Wire types.
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

# NetParameter
_NET_LAYER = 100
_NET_LAYERS = 2
# LayerParameter
_L2_NAME, _L2_TYPE, _L2_BLOBS = 1, 2, 7
# V1LayerParameter
_L1_V0, _L1_NAME, _L1_TYPE, _L1_BLOBS = 1, 4, 5, 6
# V0LayerParameter
_L0_NAME, _L0_TYPE, _L0_BLOBS = 1, 2, 50
# BlobProto
_B_NUM, _B_CHANNELS, _B_HEIGHT, _B_WIDTH = 1, 2, 3, 4
_B_DATA, _B_DIFF, _B_SHAPE, _B_DOUBLE, _B_DOUBLE_DIFF = 5, 6, 7, 8, 9
# BlobShape
_S_DIM = 1

_HINT = "file truncated or not a caffemodel"

#: V1LayerParameter.LayerType value -> V2 type string, as Caffe's ``UpgradeV1LayerType``.
V1_LAYER_TYPES: dict[int, str] = {
    0: "",  # NONE
    35: "AbsVal",
    1: "Accuracy",
    30: "ArgMax",
    2: "BNLL",
    3: "Concat",
    37: "ContrastiveLoss",
    4: "Convolution",
    39: "Deconvolution",
    5: "Data",
    6: "Dropout",
    32: "DummyData",
    7: "EuclideanLoss",
    25: "Eltwise",
    38: "Exp",
    8: "Flatten",
    9: "HDF5Data",
    10: "HDF5Output",
    28: "HingeLoss",
    11: "Im2col",
    12: "ImageData",
    13: "InfogainLoss",
    14: "InnerProduct",
    15: "LRN",
    29: "MemoryData",
    16: "MultinomialLogisticLoss",
    34: "MVN",
    17: "Pooling",
    26: "Power",
    18: "ReLU",
    19: "Sigmoid",
    27: "SigmoidCrossEntropyLoss",
    36: "Silence",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    33: "Slice",
    23: "TanH",
    24: "WindowData",
    31: "Threshold",
}

# Caffe's SplitLayerName: "<blob>_<layer>_<top index>_split".
_SPLIT_NAME = re.compile(r".+_.+_\d+_split")
# A text prototxt starts with a comment or `identifier:` / `identifier {`.
_TEXT_START = re.compile(rb"\s*(#|[A-Za-z_][A-Za-z0-9_]*\s*[:{])")
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


@dataclass
class BlobRecord:
    """One ``BlobProto``: its data, shaped, and where the shape came from."""

    data: np.ndarray
    """float32 (float64 when the blob used ``double_data``), shaped, read-only; a zero-copy view
    of the memory-mapped file when the data was stored packed."""
    legacy_4d: bool
    """True when the shape came from the deprecated num/channels/height/width fields."""


@dataclass
class LayerRecord:
    """One layer of a caffemodel: its name, type, blobs and every other field as raw bytes."""

    name: str
    type: str
    """V2: as written. V1: the enum converted to the V2 string (``V1_LAYER_TYPES``). V0: as
    written (the old lowercase strings such as ``"conv"``)."""
    blobs: list[BlobRecord]
    header: bytes
    """The layer message without its blobs fields: a ``LayerParameter`` (V2), a
    ``V1LayerParameter`` (V1), or for V0 the ``V1LayerParameter`` wrapper (bottom, top) whose
    ``layer`` field holds the ``V0LayerParameter`` without its blobs."""
    format: str
    """'V2' (NetParameter.layer), 'V1' (NetParameter.layers) or 'V0' (layers { layer { } })."""
    is_split: bool
    """A split layer Caffe inserted itself (type Split, name ``<blob>_<layer>_<i>_split``)."""


@dataclass
class WeightFile:
    """A scanned caffemodel."""

    path: str
    layers: list[LayerRecord]
    net_header: bytes
    """The NetParameter without its layer/layers fields (name, input, state ...)."""
    format: str
    """'V2', 'V1', 'V0' (any layer in V0 form) or 'empty' (no layers)."""
    _by_name: dict[str, LayerRecord] | None = field(default=None, repr=False, compare=False)

    def by_name(self) -> dict[str, LayerRecord]:
        """Layers by name; with duplicate names the last one wins, as in Caffe's
        ``CopyTrainedLayersFrom`` (each namesake is copied in turn, the last overwrites)."""
        if self._by_name is None:
            table: dict[str, LayerRecord] = {}
            for layer in self.layers:
                table[layer.name] = layer
            self._by_name = table
        return self._by_name


# --------------------------------------------------------------------------------------------
# Reading


class _WireError(Exception):
    """Internal: a malformed byte at `offset`; read_caffemodel adds the file and layer."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(what)
        self.what = what
        self.offset = offset
        self.layer: str | None = None
        # For a length-delimited field that runs past its message: (field number, payload start).
        self.payload: tuple[int, int] | None = None


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    # Fast path: most tags and small lengths fit in one byte.
    if pos < end:
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
    start = pos
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise _WireError("varint runs past the end of its message", start)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            # A varint holds at most 64 bits (10 bytes); more is garbage, not a bigger number.
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise _WireError("varint longer than 10 bytes", start)


def _fields(buf: mmap.mmap | bytes, pos: int, end: int) -> Iterable[tuple[int, int, int, int, int]]:
    """Yield (field number, wire type, field start, value start, value end) over a message.

    For a varint the value is decoded later by the caller from [value start, value end); for a
    length-delimited field [value start, value end) is the payload. The payload is never read
    here, which is what makes skipping packed data O(1).
    """
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0", start)
        if wire == _VARINT:
            vstart = pos
            _, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            length, vstart = _varint(buf, pos, end)
            pos = vstart + length
        elif wire == _I32:
            vstart, pos = pos, pos + 4
        elif wire == _I64:
            vstart, pos = pos, pos + 8
        elif wire == _SGROUP:
            vstart = pos
            pos = _skip_group(buf, pos, end, number, start)
        else:
            # An end-group tag with no start group, or wire types 6/7 that do not exist.
            raise _WireError(f"bad wire type {wire} for field {number}", start)
        if pos > end:
            err = _WireError(f"field {number} runs past the end of its message", start)
            if wire == _LEN:
                err.payload = (number, vstart)
            raise err
        yield number, wire, start, vstart, pos


#: protobuf's own default nesting limit (``io::CodedInputStream``): deeper is malformed.
_MAX_DEPTH = 100


def _skip_group(buf: mmap.mmap | bytes, pos: int, end: int, number: int, start: int) -> int:
    # Groups are deprecated and never in Caffe's schema, but a fork could have one; skip it.
    # Iterative, with protobuf's nesting limit: a file of group-start bytes must not recurse.
    stack = [(number, start)]
    while pos < end:
        key_at = pos
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == _EGROUP:
            if key >> 3 != stack[-1][0]:
                raise _WireError("mismatched end-group tag", key_at)
            stack.pop()
            if not stack:
                return pos
        elif wire == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif wire == _I32:
            pos += 4
        elif wire == _I64:
            pos += 8
        elif wire == _SGROUP:
            if len(stack) >= _MAX_DEPTH:
                raise _WireError(f"groups nested deeper than {_MAX_DEPTH}", key_at)
            stack.append((key >> 3, key_at))
        else:
            raise _WireError(f"bad wire type {wire}", key_at)
    raise _WireError(f"group {stack[-1][0]} is not closed", stack[-1][1])


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _varint_at(buf: mmap.mmap | bytes, pos: int, end: int) -> int:
    return _varint(buf, pos, end)[0]


def _read_dims(buf: mmap.mmap, pos: int, end: int) -> list[int]:
    dims: list[int] = []
    for number, wire, _, vstart, vend in _fields(buf, pos, end):
        if number != _S_DIM:
            continue
        if wire == _VARINT:
            dims.append(_int64(_varint_at(buf, vstart, vend)))
        elif wire == _LEN:  # packed: a run of varints
            p = vstart
            while p < vend:
                value, p = _varint(buf, p, vend)
                dims.append(_int64(value))
        else:
            raise _WireError(f"BlobShape.dim has wire type {wire}", vstart)
    return dims


def _view(buf: mmap.mmap, segments: list[tuple[int, int, int, int]], dtype: str
          ) -> np.ndarray:
    """The elements of `segments` [(offset, records, stride, elements per record)] as one
    array; zero-copy when there is one packed run."""
    size = np.dtype(dtype).itemsize
    if len(segments) == 1 and segments[0][2] == size and segments[0][3] == 1:
        offset, count, _, _ = segments[0]
        return np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    if not segments:
        return np.empty(0, dtype=dtype)
    # Several packed runs or unpacked elements: legal protobuf, never written by Caffe. One
    # copy into an array of the final size (never a list of per-element arrays).
    out = np.empty(sum(n * w for _, n, _, w in segments), dtype=dtype)
    at = 0
    for offset, count, stride, width in segments:
        out[at:at + count * width] = np.ndarray(
            (count, width), dtype=dtype, buffer=buf, offset=offset, strides=(stride, size)
        ).reshape(-1)
        at += count * width
    return out


def _run(buf: mmap.mmap | bytes, start: int, end: int, head: bytes, size: int) -> int:
    """How many records ``head`` + ``size`` bytes follow one another from ``start`` (>= 1).

    An unpacked repeated float is one record per element (a 1-byte tag, then 4 bytes), and a
    writer may also split a packed field into many short runs; a run of identical records is
    found with numpy in chunks, so a 30 MB file of them costs no Python object per element.
    """
    stride = len(head) + size
    n = 0
    chunk = 64
    while True:
        avail = (end - (start + n * stride)) // stride
        if avail <= 0:
            return max(n, 1)
        take = min(chunk, avail)
        recs = np.frombuffer(buf, np.uint8, count=take * stride,
                             offset=start + n * stride).reshape(take, stride)[:, :len(head)]
        miss = np.flatnonzero((recs != np.frombuffer(head, np.uint8)).any(axis=1))
        if miss.size:
            return max(n + int(miss[0]), 1)
        n += take
        chunk = min(chunk * 4, 1 << 22)


_UNPACKED_FLOAT = _B_DATA << 3 | _I32  # one-byte tags
_UNPACKED_DOUBLE = _B_DOUBLE << 3 | _I64


# BlobProto's element fields: number -> (name, element size, unpacked wire type, one-byte tag)
_ELEMENTS = {
    _B_DATA: ("data", 4, _I32, _UNPACKED_FLOAT),
    _B_DOUBLE: ("double_data", 8, _I64, _UNPACKED_DOUBLE),
}


def _take_elements(buf: mmap.mmap, number: int, wire: int, start: int, vstart: int, vend: int,
                   end: int, runs: list[tuple[int, int, int, int]]) -> int | None:
    """Record one ``data``/``double_data`` field in ``runs`` as ``(offset, records, stride,
    per record)``. A run of records of the same form (unpacked elements, or short packed
    arrays) is taken in one step: returns the position after it, to restart the field scan
    there; None when only this field was taken."""
    name, size, unpacked, tag = _ELEMENTS[number]
    if wire == _LEN:
        length = vend - vstart
        if length % size:
            kind = "float" if size == 4 else "double"
            raise _WireError(f"packed {kind} data length is not a multiple of {size}", start)
        if 0 < length < 128 and vstart - start == 2:  # short runs: take them all
            n = _run(buf, start, end, bytes(buf[start:vstart]), length)
            if n > 1:
                runs.append((vstart, n, 2 + length, length // size))
                return start + (2 + length) * n
        if length:
            runs.append((vstart, length // size, size, 1))
        return None
    if wire == unpacked:  # one element per record
        n = _run(buf, start, end, bytes([tag]), size)
        runs.append((vstart, n, size + 1, 1))
        return start + (size + 1) * n
    raise _WireError(f"BlobProto.{name} has wire type {wire}", start)


def _read_blob(buf: mmap.mmap, pos: int, end: int) -> BlobRecord:
    floats: list[tuple[int, int, int, int]] = []  # (offset, records, stride, per record)
    doubles: list[tuple[int, int, int, int]] = []
    shape: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    cursor = pos
    restart = True
    while restart:  # restarted after a run of unpacked elements was taken in one step
        restart = False
        for number, wire, start, vstart, vend in _fields(buf, cursor, end):
            if number in _ELEMENTS:
                runs = floats if number == _B_DATA else doubles
                nxt = _take_elements(buf, number, wire, start, vstart, vend, end, runs)
                if nxt is not None:
                    cursor, restart = nxt, True
                    break
            elif number == _B_SHAPE and wire == _LEN:
                # A repeated embedded message merges; for BlobShape that appends dims.
                shape = (shape or []) + _read_dims(buf, vstart, vend)
            elif _B_NUM <= number <= _B_WIDTH and wire == _VARINT:
                legacy[number - 1] = _int64(_varint_at(buf, vstart, vend))
                has_legacy = True
            # diff, double_diff and unknown fields: skipped without reading them.

    # Caffe's Blob::FromProto reads double_data when there is any, else data.
    array = _view(buf, doubles, "<f8") if doubles else _view(buf, floats, "<f4")
    if shape is not None:
        # The brief for this module: an explicit BlobShape wins over the legacy 4-D fields.
        # (Caffe's FromProto prefers the legacy fields; files with both are not known to exist.)
        dims, legacy_4d = shape, False
    elif has_legacy:
        dims, legacy_4d = legacy, True
    else:
        # No shape at all: keep the data 1-D (an empty BlobProto becomes shape (0,)).
        dims, legacy_4d = [array.size], False
    if any(d < 0 for d in dims) or prod(dims) != array.size:
        raise _WireError(
            f"blob holds {array.size} values but its shape {tuple(dims)} needs {prod(dims)}", pos
        )
    array = array.reshape(dims)
    array.flags.writeable = False
    return BlobRecord(data=array, legacy_4d=legacy_4d)


@dataclass
class _Scan:
    name: str = ""
    type: str = ""
    blobs: list[tuple[int, int]] = field(default_factory=list)  # payload ranges
    header: list[bytes] = field(default_factory=list)
    v0: tuple[int, int] | None = None
    v0_slot: int = -1


def _scan_layer(
    buf: mmap.mmap,
    pos: int,
    end: int,
    name_f: int,
    type_f: int,
    blobs_f: int,
    v0_f: int | None = None,
) -> _Scan:
    scan = _Scan()
    for number, wire, start, vstart, vend in _fields(buf, pos, end):
        if number == blobs_f and wire == _LEN:
            scan.blobs.append((vstart, vend))
            continue
        if number == v0_f and wire == _LEN:
            # Its header bytes are rebuilt by the caller, without its blobs, in this slot.
            scan.v0, scan.v0_slot = (vstart, vend), len(scan.header)
            scan.header.append(b"")
            continue
        scan.header.append(buf[start:vend])
        if number == name_f and wire == _LEN:
            scan.name = buf[vstart:vend].decode("utf-8", "replace")
        elif number == type_f:
            if wire == _LEN:
                scan.type = buf[vstart:vend].decode("utf-8", "replace")
            elif wire == _VARINT:
                code = _varint_at(buf, vstart, vend)
                scan.type = V1_LAYER_TYPES.get(code, f"V1LayerType({code})")
    return scan


def _read_layer(buf: mmap.mmap, pos: int, end: int, number: int) -> LayerRecord:
    if number == _NET_LAYER:
        scan = _scan_layer(buf, pos, end, _L2_NAME, _L2_TYPE, _L2_BLOBS)
        fmt = "V2"
        header = b"".join(scan.header)
    else:
        scan = _scan_layer(buf, pos, end, _L1_NAME, _L1_TYPE, _L1_BLOBS, _L1_V0)
        fmt = "V1"
        if scan.v0 is not None:
            fmt = "V0"
            inner = _scan_layer(buf, *scan.v0, _L0_NAME, _L0_TYPE, _L0_BLOBS)
            inner_bytes = b"".join(inner.header)
            # Put the V0 layer back in the wrapper at its place, minus its blobs.
            scan.header[scan.v0_slot] = (
                _tag(_L1_V0, _LEN) + _encode_varint(len(inner_bytes)) + inner_bytes
            )
            # V0 blobs live in the inner message; the wrapper's own blobs (never written) follow.
            scan.blobs = inner.blobs + scan.blobs
            scan.name = inner.name or scan.name
            scan.type = inner.type
        header = b"".join(scan.header)
    blobs = []
    for bstart, bend in scan.blobs:
        try:
            blobs.append(_read_blob(buf, bstart, bend))
        except _WireError as err:
            err.layer = scan.name
            raise
    is_split = scan.type in ("Split", "split") and bool(_SPLIT_NAME.fullmatch(scan.name))
    return LayerRecord(scan.name, scan.type, blobs, header, fmt, is_split)


def _looks_like_text(buf: mmap.mmap) -> bool:
    head = buf[: min(len(buf), 256)]
    return all(b in _TEXT_BYTES for b in head) and bool(_TEXT_START.match(head))


def _advise(buf: mmap.mmap, advice: str) -> None:
    # madvise is a hint: absent on some platforms, and failing it changes nothing but speed.
    if hasattr(mmap, advice) and hasattr(buf, "madvise"):
        try:
            buf.madvise(getattr(mmap, advice))
        except OSError:
            pass


def _where(buf: mmap.mmap, err: _WireError, layers: list[LayerRecord]) -> str:
    """Name the layer an error is in, for the message."""
    if err.layer is not None:
        return f" in layer {err.layer!r}"
    if err.payload is not None and err.payload[0] in (_NET_LAYER, _NET_LAYERS):
        # A truncated file: the last layer record claims more bytes than are left. Its name is
        # usually in the bytes that are there; find it on a best-effort basis.
        number, start = err.payload
        name_f = _L2_NAME if number == _NET_LAYER else _L1_NAME
        try:
            for field_no, wire, _, vstart, vend in _fields(buf, start, len(buf)):
                if field_no == name_f and wire == _LEN:
                    return f" in layer {buf[vstart:vend].decode('utf-8', 'replace')!r}"
        except _WireError:
            pass
        return f" in layer #{len(layers)}"
    if layers:
        return f" after layer {layers[-1].name!r}"
    return ""


def read_caffemodel(path: str | os.PathLike[str], progress: Progress | None = None) -> WeightFile:
    """Scan a binary caffemodel without parsing it, returning its blobs as mmap views.

    The arrays stay valid after the file is replaced (``os.replace``, as ``write_caffemodel``
    does) or deleted, since the mapping holds the old inode. Truncating the file in place while
    its arrays are alive makes touching them crash (SIGBUS), as with any mmap.

    Args:
        path: The ``.caffemodel`` file. Any size, including over 2 GiB.
        progress: Called as ``progress(bytes_scanned, file_size)`` after each layer.

    Returns:
        The layers in file order, each with its name, type, blobs and raw header bytes.

    Raises:
        ValueError: The file is a text prototxt, or is truncated or malformed (the message names
            the file, the layer and the byte offset).
        OSError: The file cannot be opened.
    """
    from ._inputs import open_regular

    fspath = os.fspath(path)
    with open_regular(fspath, "weights") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return WeightFile(fspath, [], b"", "empty")
        # The mapping outlives the file object: numpy views keep it alive through `.base`.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # The scan touches a few bytes between long tensors. With the default advice every cold page
    # fault reads ahead (read_ahead_kb, often megabytes) into tensor data nobody asked for yet;
    # random advice makes it read only the pages holding field headers. Restored afterwards so
    # whoever reads the tensors gets the usual readahead.
    _advise(buf, "MADV_RANDOM")
    if _looks_like_text(buf):
        raise ValueError(
            f"{fspath}: this is a text prototxt, not a binary caffemodel; "
            "check the argument order (net definition first, then the weights)"
        )
    layers: list[LayerRecord] = []
    header: list[bytes] = []
    formats: set[str] = set()
    try:
        for number, wire, start, vstart, vend in _fields(buf, 0, size):
            if wire == _LEN and number in (_NET_LAYER, _NET_LAYERS):
                layer = _read_layer(buf, vstart, vend, number)
                layers.append(layer)
                formats.add(layer.format)
                if progress is not None:
                    progress(vend, size)
            else:
                header.append(buf[start:vend])
    except _WireError as err:
        raise ValueError(
            f"{fspath}: {err.what} at byte {err.offset}{_where(buf, err, layers)} ({_HINT})"
        ) from None
    finally:
        _advise(buf, "MADV_NORMAL")
    if "V2" in formats and len(formats) > 1:
        # Caffe refuses this too (UpgradeV0Net / UpgradeV1Net: "both 'layer' and 'layers'").
        raise ValueError(f"{fspath}: has both 'layer' (V2) and 'layers' (V1) fields")
    fmt = "V0" if "V0" in formats else formats.pop() if formats else "empty"
    if progress is not None and not layers:
        progress(size, size)
    return WeightFile(fspath, layers, b"".join(header), fmt)


# --------------------------------------------------------------------------------------------
# Writing


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _split_at(message: bytes, number: int, what: str) -> tuple[bytes, bytes]:
    """Split `message` before its first field numbered above `number`.

    protobuf serializes known fields in field-number order, so inserting our repeated field
    there makes the output byte-identical to protobuf's for a canonically ordered header.
    """
    for field_no, _, start, _, _ in _fields(message, 0, len(message)):
        if field_no == number:
            raise ValueError(f"{what} already holds field {number}; pass blobs separately")
        if field_no > number:
            return message[:start], message[start:]
    return message, b""


def _blob_parts(array: np.ndarray) -> tuple[list[bytes | memoryview], int]:
    # Caffe's nets are float: write float32 little-endian; no copy when it already is one.
    data = np.asarray(array, dtype="<f4", order="C")  # unlike ascontiguousarray, keeps 0-d
    dims = b"".join(_encode_varint(d & 0xFFFFFFFFFFFFFFFF) for d in data.shape)
    shape = _tag(_S_DIM, _LEN) + _encode_varint(len(dims)) + dims if dims else b""
    # protobuf order: data (5) before shape (7). An empty packed field is not written at all;
    # the shape is always written, so a scalar blob keeps an explicit (empty) BlobShape.
    parts: list[bytes | memoryview] = []
    nbytes = data.size * 4
    if nbytes:
        parts.append(_tag(_B_DATA, _LEN) + _encode_varint(nbytes))
        parts.append(memoryview(data.reshape(-1)).cast("B"))
    parts.append(_tag(_B_SHAPE, _LEN) + _encode_varint(len(shape)) + shape)
    return parts, sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def write_caffemodel(
    path: str | os.PathLike[str],
    net_header: bytes,
    layers: Iterable[tuple[bytes, Sequence[np.ndarray]]],
    format: str = "V2",
    progress: Progress | None = None,
) -> int:
    """Stream a caffemodel to `path` atomically, writing tensors without copying them.

    Each layer becomes a ``layer`` (V2) or ``layers`` (V1) record: its header bytes with one
    ``blobs`` field per array spliced in at its field-number place, each blob holding the packed
    float32 data and an explicit ``BlobShape``. For headers serialized by protobuf (fields in
    number order) the output is byte-identical to protobuf's serialization of the same message.

    The file is written to a temporary file in the same directory and moved over `path` with
    ``os.replace`` (through :mod:`surgery._atomic`, joining an open set of outputs), so readers
    never see a half-written file, and arrays still mapped from the old file stay valid.

    Args:
        path: Destination file.
        net_header: NetParameter bytes without layer/layers fields (``WeightFile.net_header``).
        layers: ``(header, arrays)`` per layer: a LayerParameter (V2) or V1LayerParameter (V1)
            without blobs, and its blobs. Arrays of other dtypes are converted to float32.
        format: 'V2' or 'V1'.
        progress: Called as ``progress(bytes_written, total_bytes)`` after each array.

    Returns:
        The number of bytes written.

    Raises:
        ValueError: Unknown `format`, or a header that already holds blobs / layers.
        OSError, SurgeryError: The file cannot be written; `path` is left untouched.
    """
    if format == "V2":
        layer_field, blobs_field = _NET_LAYER, _L2_BLOBS
    elif format == "V1":
        layer_field, blobs_field = _NET_LAYERS, _L1_BLOBS
    else:
        raise ValueError(f"write_caffemodel: format must be 'V2' or 'V1', not {format!r}")

    # Lay out everything but the tensor bytes first: lengths must precede their payloads.
    net_before, net_after = _split_at(bytes(net_header), layer_field, "net_header")
    layer_tag = _tag(layer_field, _LEN)
    blob_tag = _tag(blobs_field, _LEN)
    plan: list[list[bytes | memoryview]] = []
    total = len(net_before) + len(net_after)
    for header, arrays in layers:
        before, after = _split_at(bytes(header), blobs_field, "layer header")
        chunks: list[bytes | memoryview] = [before]
        body = len(before) + len(after)
        for array in arrays:
            parts, size = _blob_parts(np.asarray(array))
            chunks.append(blob_tag + _encode_varint(size))
            chunks.extend(parts)
            body += len(chunks[-len(parts) - 1]) + size
        chunks.append(after)
        chunks.insert(0, layer_tag + _encode_varint(body))
        total += len(chunks[0]) + body
        plan.append(chunks)

    with _atomic.outputs() as out:
        tmp = out.file(path)
        written = 0
        with open(tmp, "wb") as f:
            f.write(net_before)
            written += len(net_before)
            for chunks in plan:
                for chunk in chunks:
                    f.write(chunk)
                    written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
                    if progress is not None and isinstance(chunk, memoryview):
                        progress(written, total)
            f.write(net_after)
            written += len(net_after)
        if written != total:  # a bug in the layout above, never the caller's data
            raise AssertionError(f"wrote {written} bytes, planned {total}")
    if progress is not None:
        progress(total, total)
    return total
