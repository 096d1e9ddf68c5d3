"""The generated Caffe schema: in sync with protos/caffe.proto, BVLC's facts, real files."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from surgery._proto import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "caffe.proto"
GENERATED = ROOT / "surgery" / "_proto" / "caffe_pb2.py"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHA_PREFIX = "# source-sha256: "  # written by tools/gen_proto.py

# Files under shared/ that are network definitions but do not parse, with the
# reason.  Empty today: every definition in the zoo parses.
KNOWN_INVALID: dict[str, str] = {}


# ---- (a) the committed module matches protos/caffe.proto -------------------

def _recorded_sha() -> str:
    for line in GENERATED.read_text(encoding="utf-8").splitlines()[:10]:
        if line.startswith(SHA_PREFIX):
            return line[len(SHA_PREFIX):].strip()
    raise AssertionError(f"{GENERATED.name} has no '{SHA_PREFIX.strip()}' header line")


def test_generated_module_records_current_proto_hash():
    actual = hashlib.sha256(PROTO.read_bytes()).hexdigest()
    assert _recorded_sha() == actual, (
        "protos/caffe.proto changed since surgery/_proto/caffe_pb2.py was generated; "
        "run tools/gen_proto.py (see its docstring for the pinned grpcio-tools)"
    )
    sha_file = PROTO.with_name("caffe.proto.sha256").read_text(encoding="utf-8").split()
    assert sha_file[0] == actual


def _normalized(fdp: descriptor_pb2.FileDescriptorProto) -> bytes:
    """Remove what differs between protoc's outputs but means the same.

    protoc's descriptor sets carry json_name and float defaults as written
    ("1e-08"); the Python generator drops json_name and reprints float
    defaults from the float value ("9.99999994e-09").
    """
    fd = descriptor_pb2.FieldDescriptorProto

    def strip(messages):
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
                if field.HasField("default_value") and field.type == fd.TYPE_FLOAT:
                    value = struct.unpack("<f", struct.pack("<f", float(field.default_value)))[0]
                    field.default_value = repr(value)
                elif field.HasField("default_value") and field.type == fd.TYPE_DOUBLE:
                    field.default_value = repr(float(field.default_value))
            strip(message.nested_type)

    fdp = descriptor_pb2.FileDescriptorProto.FromString(fdp.SerializeToString())
    strip(fdp.message_type)
    return fdp.SerializeToString(deterministic=True)


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools not installed (the `test` extra installs it)",
)
def test_generated_descriptor_equals_compiled_proto(tmp_path):
    out = tmp_path / "caffe.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={PROTO.parent}",
         f"--descriptor_set_out={out}", PROTO.name],
        check=True, cwd=PROTO.parent,
    )
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(caffe_pb2.DESCRIPTOR.serialized_pb)
    assert _normalized(committed) == _normalized(fresh)


# ---- (b) BVLC facts ----------------------------------------------------------

def _field(message, name):
    return message.DESCRIPTOR.fields_by_name[name]


def _field_proto(message, name) -> descriptor_pb2.FieldDescriptorProto:
    """The field as declared (label/type/options), read the same way on every runtime."""
    proto = descriptor_pb2.DescriptorProto()
    message.DESCRIPTOR.CopyToProto(proto)
    return next(f for f in proto.field if f.name == name)


@pytest.mark.parametrize(
    ("message", "name", "number"),
    [
        (caffe_pb2.PoolingParameter, "round_mode", 13),
        (caffe_pb2.LayerParameter, "blobs", 7),
        (caffe_pb2.LayerParameter, "param", 6),
        (caffe_pb2.LayerParameter, "include", 8),
        (caffe_pb2.LayerParameter, "transform_param", 100),
        (caffe_pb2.LayerParameter, "convolution_param", 106),
        (caffe_pb2.LayerParameter, "clip_param", 148),
        (caffe_pb2.LayerParameter, "swish_param", 147),
        (caffe_pb2.V1LayerParameter, "blobs", 6),
        (caffe_pb2.V1LayerParameter, "layer", 1),
        (caffe_pb2.V1LayerParameter, "blobs_lr", 7),
        (caffe_pb2.V0LayerParameter, "blobs", 50),
        (caffe_pb2.NetParameter, "layer", 100),
        (caffe_pb2.NetParameter, "layers", 2),
        (caffe_pb2.NetParameter, "input_dim", 4),
        (caffe_pb2.BlobProto, "data", 5),
        (caffe_pb2.BlobProto, "shape", 7),
        (caffe_pb2.BlobProto, "num", 1),
        (caffe_pb2.SolverParameter, "layer_wise_reduce", 41),
        (caffe_pb2.SolverParameter, "weights", 42),
        (caffe_pb2.ParamSpec, "lr_mult", 3),
        (caffe_pb2.ParamSpec, "decay_mult", 4),
    ],
)
def test_bvlc_field_numbers(message, name, number):
    assert _field(message, name).number == number


def test_bvlc_types_labels_and_defaults():
    fd = descriptor_pb2.FieldDescriptorProto
    data = _field_proto(caffe_pb2.BlobProto, "data")
    assert data.label == fd.LABEL_REPEATED and data.type == fd.TYPE_FLOAT
    assert data.options.packed
    assert _field_proto(caffe_pb2.BlobShape, "dim").options.packed
    assert _field_proto(caffe_pb2.BlobProto, "num").type == fd.TYPE_INT32
    assert _field_proto(caffe_pb2.BlobShape, "dim").type == fd.TYPE_INT64

    filler = caffe_pb2.FillerParameter()
    assert filler.type == "constant" and filler.value == 0 and filler.std == 1
    assert filler.sparse == -1 and filler.variance_norm == caffe_pb2.FillerParameter.FAN_IN
    pool = caffe_pb2.PoolingParameter()
    assert pool.round_mode == caffe_pb2.PoolingParameter.CEIL and pool.stride == 1
    assert caffe_pb2.PoolingParameter.RoundMode.Value("FLOOR") == 1
    assert caffe_pb2.ConvolutionParameter().bias_term is True
    assert caffe_pb2.ConvolutionParameter().group == 1
    assert caffe_pb2.BatchNormParameter().eps == pytest.approx(1e-5)
    assert caffe_pb2.BatchNormParameter().moving_average_fraction == pytest.approx(0.999)
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.ParamSpec().lr_mult == 1.0 and caffe_pb2.ParamSpec().decay_mult == 1.0
    assert caffe_pb2.LRNParameter().k == 1.0 and caffe_pb2.LRNParameter().local_size == 5
    assert caffe_pb2.SolverParameter().type == "SGD"
    assert caffe_pb2.V1LayerParameter.LayerType.Value("CONVOLUTION") == 4
    assert _field_proto(caffe_pb2.ClipParameter, "min").label == fd.LABEL_REQUIRED


def test_fork_fields_do_not_take_bvlc_numbers():
    pool = caffe_pb2.PoolingParameter.DESCRIPTOR
    assert pool.fields_by_name["ceil_mode"].number != 13
    assert pool.fields_by_name["ceil_mode"].default_value is True
    layer = caffe_pb2.LayerParameter.DESCRIPTOR
    numbers = [f.number for f in layer.fields]
    assert len(numbers) == len(set(numbers))
    # SSD's own numbers
    assert layer.fields_by_name["prior_box_param"].number == 203
    assert layer.fields_by_name["detection_output_param"].number == 204


# ---- (c) both pooling spellings -------------------------------------------

@pytest.mark.parametrize(
    "text",
    [
        "pool: MAX\nkernel_size: 3\nstride: 2\nceil_mode: false\n",
        "pool: MAX\nkernel_size: 3\nstride: 2\nround_mode: FLOOR\n",
        "pool: AVE\nglobal_pooling: true\nceil_mode: true\n",
    ],
)
def test_pooling_rounding_spellings_round_trip(text):
    param = text_format.Parse(text, caffe_pb2.PoolingParameter())
    assert text_format.MessageToString(param) == text
    again = caffe_pb2.PoolingParameter.FromString(param.SerializeToString())
    assert again == param


def test_ceil_mode_and_round_mode_are_distinct_fields():
    param = text_format.Parse("ceil_mode: false", caffe_pb2.PoolingParameter())
    assert param.HasField("ceil_mode") and not param.HasField("round_mode")
    param = text_format.Parse("round_mode: FLOOR", caffe_pb2.PoolingParameter())
    assert param.HasField("round_mode") and not param.HasField("ceil_mode")


# ---- (d) every real network definition parses ----------------------------

def _top_level_keys(text: str) -> set[str]:
    keys, depth = set(), 0
    for line in text.splitlines():
        line = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line).split("#")[0]
        if depth == 0:
            match = re.match(r"\s*([A-Za-z_]\w*)", line)
            if match:
                keys.add(match.group(1))
        depth += line.count("{") - line.count("}")
    return keys


def _kind(text: str) -> str:
    keys = _top_level_keys(text)
    if keys == {"item"}:
        return "labelmap"
    # .keys(): protobuf 4.21's upb maps iterate over the descriptors, not the names
    net_fields = set(caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name.keys())
    solver_fields = set(caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name.keys())
    if keys - net_fields and keys <= solver_fields:
        return "solver"
    return "net"


def _prototxts() -> list[tuple[str, str]]:
    found = []
    for sub in ("zoo", "golden"):
        base = SHARED / sub
        if base.is_dir():
            for path in sorted(base.rglob("*.prototxt")):
                rel = path.relative_to(SHARED).as_posix()
                found.append((rel, _kind(path.read_text(encoding="utf-8", errors="replace"))))
    return found


_FILES = _prototxts()
_MESSAGES = {
    "net": caffe_pb2.NetParameter,
    "solver": caffe_pb2.SolverParameter,
    "labelmap": caffe_pb2.LabelMap,
}


def test_shared_files_found():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    assert sum(kind == "net" for _, kind in _FILES) > 100


@pytest.mark.parametrize(("rel", "kind"), _FILES, ids=[rel for rel, _ in _FILES])
def test_shared_prototxt_parses(rel, kind):
    text = (SHARED / rel).read_text(encoding="utf-8")
    message = _MESSAGES[kind]()
    if rel in KNOWN_INVALID:
        with pytest.raises(text_format.ParseError):
            text_format.Parse(text, message)
        return
    text_format.Parse(text, message)
    # Text and binary round trips keep every field.
    assert text_format.Parse(text_format.MessageToString(message), _MESSAGES[kind]()) == message
    assert _MESSAGES[kind].FromString(message.SerializeToString()) == message
