"""surgery._wire: the wire-format caffemodel reader and writer, checked against protobuf itself."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery import _wire
from surgery._proto import caffe_pb2
from surgery._wire import read_caffemodel, write_caffemodel
from surgery.errors import SurgeryError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = sorted(SHARED.glob("zoo/**/*.caffemodel")) + sorted(
    SHARED.glob("golden/*/weights.caffemodel")
)
V1_MODELS = [p for p in MODELS if "v1_trained" in str(p)]

# Caffe's UpgradeV1LayerType, written out independently of _wire.V1_LAYER_TYPES.
V1_TO_V2 = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}  # fmt: skip


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(SHARED)) for p in paths]


def _parse(data: bytes) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    net.ParseFromString(data)
    return net


def _pb_layers(net: caffe_pb2.NetParameter) -> list:
    return list(net.layer) or list(net.layers)


def _pb_shape(blob: caffe_pb2.BlobProto) -> tuple[int, ...]:
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    return (blob.num, blob.channels, blob.height, blob.width)


def _without_blobs(layer):
    copy = type(layer)()
    copy.CopyFrom(layer)
    del copy.blobs[:]
    return copy


def _canonical(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """What our writer stores for `net`: float data and an explicit BlobShape, nothing else."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    for layer in _pb_layers(out):
        for blob in layer.blobs:
            if blob.HasField("shape") and not (blob.diff or blob.double_data or blob.double_diff):
                continue  # already in our form; rebuilding big blobs would be slow
            shape, data = _pb_shape(blob), np.array(blob.data, np.float32)
            blob.Clear()
            blob.data.extend(data.tolist())
            blob.shape.SetInParent()
            blob.shape.dim.extend(shape)
    return out


# ------------------------------------------------------------------------------------------
# The corpus: every real caffemodel, against protobuf's own parse


@pytest.mark.parametrize("path", MODELS, ids=_ids(MODELS))
def test_corpus_matches_protobuf(path: Path) -> None:
    ours = read_caffemodel(path)
    net = _parse(path.read_bytes())
    pb_layers = _pb_layers(net)
    assert ours.format == ("V2" if net.layer else "V1")
    assert len(ours.layers) == len(pb_layers)
    for rec, layer in zip(ours.layers, pb_layers, strict=True):
        assert rec.name == layer.name
        if rec.format == "V2":
            assert rec.type == layer.type
            header = caffe_pb2.LayerParameter()
        else:
            assert rec.type == V1_TO_V2[caffe_pb2.V1LayerParameter.LayerType.Name(layer.type)]
            header = caffe_pb2.V1LayerParameter()
        header.ParseFromString(rec.header)
        assert header == _without_blobs(layer)
        assert rec.is_split == (rec.type == "Split" and rec.name.endswith("_split"))
        assert len(rec.blobs) == len(layer.blobs)
        for blob, pb_blob in zip(rec.blobs, layer.blobs, strict=True):
            assert blob.data.dtype == np.float32
            assert blob.data.shape == _pb_shape(pb_blob)
            assert blob.legacy_4d == (not pb_blob.HasField("shape"))
            assert np.array_equal(blob.data.ravel(), np.array(pb_blob.data, np.float32))
            assert not blob.data.flags.writeable
            with pytest.raises(ValueError):
                blob.data.reshape(-1)[:1] = 0
    rest = caffe_pb2.NetParameter()
    rest.ParseFromString(ours.net_header)
    expected = caffe_pb2.NetParameter()
    expected.CopyFrom(net)
    expected.ClearField("layer")
    expected.ClearField("layers")
    assert rest == expected
    assert set(ours.by_name()) == {layer.name for layer in pb_layers}


@pytest.mark.parametrize("path", MODELS, ids=_ids(MODELS))
def test_corpus_round_trip_is_protobufs_bytes(path: Path, tmp_path: Path) -> None:
    ours = read_caffemodel(path)
    out = tmp_path / "out.caffemodel"
    fmt = "V1" if ours.format == "V1" else "V2"
    layers = [(r.header, [b.data for b in r.blobs]) for r in ours.layers]
    size = write_caffemodel(out, ours.net_header, layers, format=fmt)
    written = out.read_bytes()
    assert size == len(written)
    # Byte-identical to protobuf serializing the same content (legacy dims become a BlobShape).
    assert written == _canonical(_parse(path.read_bytes())).SerializeToString()
    again = read_caffemodel(out)
    assert again.net_header == ours.net_header
    for a, b in zip(again.layers, ours.layers, strict=True):
        assert (a.name, a.type, a.header, a.format) == (b.name, b.type, b.header, b.format)
        for x, y in zip(a.blobs, b.blobs, strict=True):
            assert x.data.shape == y.data.shape and np.array_equal(x.data, y.data)


def test_v2_caffe_files_are_rewritten_byte_for_byte(tmp_path: Path) -> None:
    # Caffe itself writes data then shape, like protobuf: a V2 file survives unchanged.
    for path in MODELS:
        ours = read_caffemodel(path)
        if ours.format != "V2":
            continue
        out = tmp_path / "same.caffemodel"
        layers = [(r.header, [b.data for b in r.blobs]) for r in ours.layers]
        write_caffemodel(out, ours.net_header, layers)
        assert out.read_bytes() == path.read_bytes(), path


@pytest.mark.parametrize("path", V1_MODELS, ids=_ids(V1_MODELS))
def test_v1_files_have_legacy_4d_shapes(path: Path) -> None:
    ours = read_caffemodel(path)
    assert ours.format == "V1"
    blobs = [b for layer in ours.layers for b in layer.blobs]
    assert blobs and all(b.legacy_4d and b.data.ndim == 4 for b in blobs)
    assert {"Convolution", "InnerProduct"} <= {layer.type for layer in ours.layers}


def test_zero_copy_views_of_the_file() -> None:
    path = next(p for p in MODELS if p.stat().st_size > 1_000_000)
    blob = max(
        (b for r in read_caffemodel(path).layers for b in r.blobs), key=lambda b: b.data.size
    )
    base = blob.data
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert not isinstance(base, np.ndarray)  # the mmap itself, not a copy
    assert not blob.data.flags.owndata


# ------------------------------------------------------------------------------------------
# Hand-built wire formats: every wire type, packed and not, legacy and V0


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, wire: int, payload: bytes = b"") -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _unknowns(number: int) -> bytes:
    """One unknown field of every wire type, a group holding a nested group included."""
    group = _field(number + 1, 3) + _field(1, 0, _varint(7)) + _field(number + 1, 4)
    return (
        _field(number, 0, _varint(-1))
        + _field(number, 1, b"\x01" * 8)
        + _field(number, 2, b"\xff\x00junk")
        + _field(number, 5, b"\x02" * 4)
        + _field(number, 3, group + _field(2, 2, b"x"))
        + _field(number, 4)
    )


def _write(tmp_path: Path, data: bytes, name: str = "m.caffemodel") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_unpacked_split_and_double_data_match_protobuf(tmp_path: Path) -> None:
    floats = np.arange(6, dtype="<f4")
    shape_unpacked = _field(1, 0, _varint(2)) + _field(1, 0, _varint(3))
    blob_a = (  # unpacked fixed32 records, a shape with unpacked dims, unknown fields
        b"".join(_field(5, 5, v.tobytes()) for v in floats)
        + _unknowns(3000)
        + _field(7, 2, shape_unpacked)
        + _field(6, 2, b"\x00" * 8)  # diff: skipped
    )
    blob_b = (  # two packed runs of one field, and both legacy dims and a shape
        _field(5, 2, floats[:2].tobytes())
        + _field(5, 2, floats[2:].tobytes())
        + _field(1, 0, _varint(1))
        + _field(2, 0, _varint(6))
        + _field(7, 2, _field(1, 2, _varint(3) + _varint(2)))
    )
    doubles = np.linspace(0, 1, 4).astype("<f8")
    blob_c = _field(8, 2, doubles.tobytes()) + _field(7, 2, _field(1, 2, _varint(4)))
    legacy = b"".join(_field(i, 0, _varint(d)) for i, d in ((1, 1), (2, 2), (3, 1), (4, 1)))
    blob_d = legacy + _field(5, 2, b"\0" * 8)
    layer = (
        _field(1, 2, b"ip")
        + _field(2, 2, b"InnerProduct")
        + _field(7, 2, blob_a)
        + _unknowns(5000)
        + _field(7, 2, blob_b)
        + _field(7, 2, blob_c)
        + _field(7, 2, blob_d)
        + _field(7, 2, b"")  # empty blob
    )
    data = _field(1, 2, b"net") + _unknowns(4000) + _field(100, 2, layer)
    path = _write(tmp_path, data)
    ours = read_caffemodel(path)
    pb_blobs = _parse(data).layer[0].blobs
    got = ours.layers[0].blobs
    assert [b.data.shape for b in got] == [(2, 3), (3, 2), (4,), (1, 2, 1, 1), (0,)]
    assert [b.legacy_4d for b in got] == [False, False, False, True, False]
    assert got[2].data.dtype == np.float64
    assert np.array_equal(got[2].data, np.array(pb_blobs[2].double_data))
    for blob, pb_blob in zip(got[:2], pb_blobs[:2], strict=True):
        assert np.array_equal(blob.data.ravel(), np.array(pb_blob.data, np.float32))
        assert not blob.data.flags.writeable
    assert ours.layers[0].header == _field(1, 2, b"ip") + _field(2, 2, b"InnerProduct") + (
        _unknowns(5000)
    )
    assert ours.net_header == _field(1, 2, b"net") + _unknowns(4000)


def test_v0_layers(tmp_path: Path) -> None:
    net = caffe_pb2.NetParameter(name="old")
    wrapper = net.layers.add(bottom=["data"], top=["conv1"])
    wrapper.layer.name = "conv1"
    wrapper.layer.type = "conv"
    wrapper.layer.num_output = 2
    blob = wrapper.layer.blobs.add(num=2, channels=1, height=1, width=3)
    blob.data.extend(range(6))
    wrapper.layer.blobs_lr.extend([1.0])
    split = net.layers.add(bottom=["conv1"], top=["a", "b"])
    split.layer.name = "conv1_conv1_0_split"
    split.layer.type = "split"
    ours = read_caffemodel(_write(tmp_path, net.SerializeToString()))
    assert ours.format == "V0"
    conv, split_rec = ours.layers
    assert (conv.name, conv.type, conv.format, conv.is_split) == ("conv1", "conv", "V0", False)
    assert split_rec.is_split
    assert conv.blobs[0].legacy_4d and conv.blobs[0].data.shape == (2, 1, 1, 3)
    assert np.array_equal(conv.blobs[0].data.ravel(), np.arange(6))
    header = caffe_pb2.V1LayerParameter()
    header.ParseFromString(conv.header)
    expected = caffe_pb2.V1LayerParameter()
    expected.CopyFrom(wrapper)
    del expected.layer.blobs[:]
    assert header == expected


def test_v1_enum_table_is_complete() -> None:
    for value in caffe_pb2.V1LayerParameter.LayerType.values():
        name = caffe_pb2.V1LayerParameter.LayerType.Name(value)
        assert _wire.V1_LAYER_TYPES[value] == V1_TO_V2[name]


def test_empty_files(tmp_path: Path) -> None:
    assert read_caffemodel(_write(tmp_path, b"")).format == "empty"
    only_name = read_caffemodel(_write(tmp_path, _field(1, 2, b"n"), "n.caffemodel"))
    assert (only_name.format, only_name.layers, only_name.net_header) == (
        "empty",
        [],
        _field(1, 2, b"n"),
    )


# ------------------------------------------------------------------------------------------
# Errors


def _blob_bytes(shape: tuple[int, ...], count: int) -> bytes:
    dims = b"".join(_varint(d) for d in shape)
    return _field(5, 2, b"\0" * 4 * count) + _field(7, 2, _field(1, 2, dims))


def test_truncated_file_names_file_layer_and_offset(tmp_path: Path) -> None:
    source = next(p for p in MODELS if p.name == "lenet_iter_10000.caffemodel")
    data = source.read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) * 2 // 3, len(data) - 1):
        path = _write(tmp_path, data[:cut], f"cut{cut}.caffemodel")
        with pytest.raises(ValueError, match="truncated or not a caffemodel") as info:
            read_caffemodel(path)
        assert str(path) in str(info.value) and "byte" in str(info.value)


def test_truncated_inside_a_blob_names_the_layer(tmp_path: Path) -> None:
    layer = _field(1, 2, b"fc") + _field(7, 2, _blob_bytes((2, 2), 4)[:-3])
    path = _write(tmp_path, _field(100, 2, layer))
    with pytest.raises(ValueError, match=r"in layer 'fc'.*truncated"):
        read_caffemodel(path)


def test_count_mismatch_names_the_layer(tmp_path: Path) -> None:
    layer = _field(1, 2, b"conv9") + _field(7, 2, _blob_bytes((2, 3), 5))
    path = _write(tmp_path, _field(100, 2, layer))
    with pytest.raises(ValueError, match=r"holds 5 values.*\(2, 3\).*'conv9'") as info:
        read_caffemodel(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "data",
    [b"\x0a" + b"\xff" * 11, b"\x0f", b"\x0c", b"\x00\x00", b"\x1b\x08\x01"],
    ids=["long-varint", "wire-type-7", "stray-end-group", "field-0", "open-group"],
)
def test_malformed_bytes(tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_caffemodel(path)


def test_prototxt_passed_as_weights(tmp_path: Path) -> None:
    text = SHARED / "zoo" / "lenet_trained" / "lenet.prototxt"
    path = text if text.exists() else _write(tmp_path, b'name: "x"\nlayer {\n}\n', "x.prototxt")
    with pytest.raises(ValueError, match="text prototxt.*argument order"):
        read_caffemodel(path)
    with pytest.raises(ValueError, match="text prototxt"):
        read_caffemodel(_write(tmp_path, b"# a comment\nlayer { name: 'a' }\n", "c.prototxt"))


def test_mixed_v1_and_v2_is_refused(tmp_path: Path) -> None:
    data = _field(100, 2, _field(1, 2, b"a")) + _field(2, 2, _field(4, 2, b"b"))
    with pytest.raises(ValueError, match="both 'layer'"):
        read_caffemodel(_write(tmp_path, data))


def test_over_2gib_sparse_file(tmp_path: Path) -> None:
    # A sparse file: the zeros are never written or read, yet every offset past 2**31 is real.
    count = (2**31 + 2**20) // 4
    data_head = _varint(5 << 3 | 2) + _varint(count * 4)
    shape = _field(7, 2, _field(1, 2, _varint(count)))
    blob_len = len(data_head) + count * 4 + len(shape)
    layer_head = _field(1, 2, b"big") + _varint(7 << 3 | 2) + _varint(blob_len)
    path = tmp_path / "big.caffemodel"
    with open(path, "wb") as f:
        f.write(_varint(100 << 3 | 2) + _varint(len(layer_head) + blob_len))
        f.write(layer_head + data_head)
        f.seek(count * 4, os.SEEK_CUR)
        f.write(shape + _field(1000, 0, _varint(1)))
    ours = read_caffemodel(path)
    (blob,) = ours.layers[0].blobs
    assert blob.data.shape == (count,) and blob.data[-1] == 0
    assert ours.net_header == _field(1000, 0, _varint(1))


# ------------------------------------------------------------------------------------------
# Writing


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.caffemodel"
    path.write_bytes(b"old")

    def broken(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(SurgeryError, match="disk full"):
        write_caffemodel(path, b"", [(b"", [np.ones(3)])])
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.caffemodel"]


def test_write_refuses_headers_with_blobs_and_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already holds field 7"):
        write_caffemodel(tmp_path / "a", b"", [(_field(7, 2, b""), [])])
    with pytest.raises(ValueError, match="already holds field 100"):
        write_caffemodel(tmp_path / "a", _field(100, 2, b""), [])
    with pytest.raises(ValueError, match="format"):
        write_caffemodel(tmp_path / "a", b"", [], format="V0")


def test_progress_and_conversions(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    arrays = [np.arange(12, dtype=np.float64).reshape(3, 4).T, np.float32(2.5) * np.ones(())]
    path = tmp_path / "p.caffemodel"
    total = write_caffemodel(path, b"", [(b"", arrays)], progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    read: list[tuple[int, int]] = []
    got = read_caffemodel(path, progress=lambda d, t: read.append((d, t))).layers[0].blobs
    assert read[-1] == (total, total)
    assert got[0].data.dtype == np.float32 and np.array_equal(got[0].data, arrays[0])
    assert got[1].data.shape == () and got[1].data == 2.5


_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
_shapes = st.lists(st.integers(0, 4), max_size=4).map(tuple)


@st.composite
def _nets(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[bytes, list[np.ndarray]]]]:
    fmt = draw(st.sampled_from(["V2", "V1"]))
    net = caffe_pb2.NetParameter(name=draw(_names), input=draw(st.lists(_names, max_size=2)))
    net_header = net.SerializeToString() + draw(st.sampled_from([b"", _unknowns(4000)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers = []
    for _ in range(draw(st.integers(0, 4))):
        names = {"name": draw(_names), "bottom": draw(st.lists(_names, max_size=2))}
        if fmt == "V2":
            layer = caffe_pb2.LayerParameter(type=draw(_names), **names)
            layer.param.add(lr_mult=draw(st.floats(0, 10, width=32)))
            if draw(st.booleans()):
                layer.include.add(phase=caffe_pb2.TEST)
                layer.convolution_param.num_output = draw(st.integers(0, 2**32 - 1))
        else:
            layer = caffe_pb2.V1LayerParameter(type=caffe_pb2.V1LayerParameter.RELU, **names)
            layer.blobs_lr.extend(draw(st.lists(st.floats(0, 10, width=32), max_size=2)))
        header = layer.SerializeToString() + draw(st.sampled_from([b"", _unknowns(6000)]))
        shapes = draw(st.lists(_shapes, max_size=3))
        layers.append((header, [rng.standard_normal(s).astype(np.float32) for s in shapes]))
    return fmt, net_header, layers


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(net=_nets())
def test_random_nets_round_trip(tmp_path: Path, net: tuple) -> None:
    fmt, net_header, layers = net
    path = tmp_path / "r.caffemodel"
    write_caffemodel(path, net_header, layers, format=fmt)
    written = path.read_bytes()

    # protobuf reads it, and serializing what it read gives our bytes back.
    expected = caffe_pb2.NetParameter()
    expected.ParseFromString(net_header)
    for header, arrays in layers:
        layer = (expected.layer if fmt == "V2" else expected.layers).add()
        layer.ParseFromString(header)
        for array in arrays:
            blob = layer.blobs.add()
            blob.data.extend(array.ravel().tolist())
            blob.shape.SetInParent()
            blob.shape.dim.extend(array.shape)
    assert _parse(written) == expected
    assert written == expected.SerializeToString()

    ours = read_caffemodel(path)
    assert ours.format == (fmt if layers else "empty")
    assert ours.net_header == net_header
    assert [r.header for r in ours.layers] == [h for h, _ in layers]
    for rec, (_, arrays) in zip(ours.layers, layers, strict=True):
        assert [b.data.shape for b in rec.blobs] == [a.shape for a in arrays]
        assert all(np.array_equal(b.data, a) for b, a in zip(rec.blobs, arrays, strict=True))


def test_float_bits_survive_exactly(tmp_path: Path) -> None:
    bits = np.array([0x7FC00001, 0xFF800000, 0x00000001, 0x80000000], dtype="<u4")
    values = bits.view("<f4")
    path = tmp_path / "nan.caffemodel"
    write_caffemodel(path, b"", [(b"", [values])])
    got = read_caffemodel(path).layers[0].blobs[0].data
    assert np.array_equal(got.view("<u4"), bits)
    assert struct.unpack("<I", got[:1].tobytes())[0] == 0x7FC00001
