"""Foundation: every zoo definition loads, round-trips, and the goldens' shapes match Caffe's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from surgery import caffe_io
from surgery._proto import caffe_pb2
from surgery.cli import main
from surgery.errors import ParseError, SurgeryError
from surgery.upgrade import upgrade_net

from .conftest import GOLDEN, MODELS, ZOO

# Files under ../shared/zoo that are not network definitions (solvers, label maps) are recognised
# by content; the ones below are network definitions Caffe itself refuses, with the reason.
KNOWN_INVALID: dict[str, str] = {}


def _is_net_file(path: Path) -> bool:
    text = path.read_text(errors="replace")
    if "layer" not in text and "input" not in text:
        return False  # solvers and label maps
    return not any(w in text for w in ("base_lr:", "item {", "train_net:", "test_iter:"))


NET_FILES = sorted(
    p for p in list(ZOO.rglob("*.prototxt")) + list(GOLDEN.glob("*/net.prototxt"))
    if _is_net_file(p)
)


def _id(p: Path) -> str:
    return str(p.relative_to(p.parents[1]))


@pytest.mark.parametrize("path", NET_FILES, ids=_id)
def test_every_zoo_definition_loads_and_round_trips(path: Path) -> None:
    rel = _id(path)
    if rel in KNOWN_INVALID:
        with pytest.raises(ParseError):
            caffe_io.load(path)
        return
    net = caffe_io.load(path)
    assert net.layers, "no layers read"
    # Round trip: our net written back equals protobuf's parse of the file after Caffe's upgrade.
    expected = caffe_pb2.NetParameter()
    text_format.Parse(path.read_text(), expected)
    upgrade_net(expected, str(path))
    again = caffe_io.net_to_proto(net)
    assert again == expected, f"{rel}: round trip changed the message"
    # And the text we write parses back to the same message.
    reparsed = caffe_pb2.NetParameter()
    text_format.Parse(caffe_io.net_to_text(net), reparsed)
    assert reparsed == expected


GOLDEN_NETS = sorted(p.name for p in GOLDEN.iterdir() if (p / "meta.json").is_file())


def _golden_weights(name: str) -> Path | None:
    meta = json.loads((GOLDEN / name / "meta.json").read_text())
    w = meta.get("weights")
    return (GOLDEN / name / w).resolve() if w else None


@pytest.mark.parametrize("name", GOLDEN_NETS)
def test_info_json_shapes_match_caffe_probes(name: str, capsys: pytest.CaptureFixture) -> None:
    """`surgery info --json` gives Caffe's shape for every blob Caffe made (in-place included)."""
    folder = GOLDEN / name
    meta = json.loads((folder / "meta.json").read_text())
    probes = json.loads((folder / "probes.json").read_text())
    # The goldens ran with batch reduced to 2: feed that shape through an edited Input layer.
    net = caffe_io.load(folder / "net.prototxt")
    for lay in net.layers:
        if lay.type == "Input":
            lay.attrs["shape"] = [{"dim": list(meta["inputs"][t])} for t in lay.tops]
    from surgery.cli import info_report

    rep = info_report(net, "TEST")
    last: dict[str, list[int]] = {}
    for lay in rep["layers"]:
        for top, shape in zip(lay["tops"], lay["top_shapes"], strict=True):
            last[top] = shape
    missing = [b for b in probes if b not in last]
    assert not missing, f"blobs Caffe made that we do not: {missing}"
    wrong = {b: (last[b], p["shape"]) for b, p in probes.items() if last[b] != p["shape"]}
    assert not wrong, f"(ours, Caffe's) shapes differ: {wrong}"


@pytest.mark.parametrize("name", GOLDEN_NETS)
def test_golden_weights_attach_with_the_inferred_shapes(name: str) -> None:
    w = _golden_weights(name)
    if w is None:
        pytest.fail(f"{name}: meta.json names no weights")
    net = caffe_io.load(GOLDEN / name / "net.prototxt", w)
    assert net.has_weights
    from surgery.check import check

    errors = [p for p in check(net) if p.severity == "error"]
    assert not errors, errors
    # every blob is a read-only float array
    for lay in net.layers:
        for p in lay.params:
            if p.data is not None:
                assert not p.data.flags.writeable


def test_legacy_v1_weights_are_reshaped_to_caffes_shapes() -> None:
    net = caffe_io.load(
        ZOO / "v1_trained_lenet" / "lenet.prototxt",
        ZOO / "v1_trained_lenet" / "lenet_iter_10000.caffemodel",
    )
    assert net.layer("ip1").params[0].data.shape == (500, 800)
    assert net.layer("ip1").params[1].data.shape == (500,)
    assert net.layer("conv1").params[0].data.shape == (20, 1, 5, 5)


def test_legacy_v1_biases_are_written_with_caffes_shapes(tmp_path: Path) -> None:
    # A V1 caffemodel stores every blob as num/channels/height/width (a bias is 1x1x1xN). Read
    # with a train_test definition (Data layers: no input shape to infer from), the biases of
    # Convolution layers and the InnerProduct weights kept those 4-D shapes, and the saved file
    # said `shape { dim: 1 dim: 1 dim: 1 dim: 20 }` for conv1's bias: the real Caffe refuses it
    # ("Cannot copy param 1 weights from layer 'conv1'; shape mismatch ... 1 1 1 20 (20);
    # target param shape is 20 (20)"). Found by tools/caffe_acceptance.py.
    net = caffe_io.load(
        ZOO / "v1_trained_lenet" / "lenet_train_test.prototxt",
        ZOO / "v1_trained_lenet" / "lenet_iter_10000.caffemodel",
    )
    want = {
        "conv1": [(20, 1, 5, 5), (20,)],
        "conv2": [(50, 20, 5, 5), (50,)],
        "ip1": [(500, 800), (500,)],
        "ip2": [(10, 500), (10,)],
    }
    for name, shapes in want.items():
        assert [p.data.shape for p in net.layer(name).params] == shapes, name
    caffe_io.save(net, tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString((tmp_path / "a.caffemodel").read_bytes())
    written = {lp.name: [tuple(b.shape.dim) for b in lp.blobs] for lp in msg.layer}
    for name, shapes in want.items():
        assert written[name] == shapes, name


def test_save_round_trips_weights(tmp_path: Path) -> None:
    src = GOLDEN / "lenet"
    net = caffe_io.load(src / "net.prototxt", src / "weights.caffemodel")
    caffe_io.save(net, tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    again = caffe_io.load(tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    for a, b in zip(net.layers, again.layers, strict=True):
        assert a.name == b.name
        for pa, pb in zip(a.params, b.params, strict=True):
            assert np.array_equal(pa.data, pb.data)
    # protobuf's own parser reads our caffemodel and sees the same values
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString((tmp_path / "a.caffemodel").read_bytes())
    conv1 = next(lp for lp in msg.layer if lp.name == "conv1")
    assert np.array_equal(
        np.asarray(conv1.blobs[0].data, np.float32).reshape(tuple(conv1.blobs[0].shape.dim)),
        net.layer("conv1").params[0].data,
    )


def test_parse_error_names_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom: 3\n}\n')
    with pytest.raises(ParseError) as exc:
        caffe_io.load(bad)
    msg = str(exc.value)
    assert "bad.prototxt:5" in msg and "bottom" in msg
    # a field the schema does not know is kept verbatim, not an error (tests/test_forks.py)
    bad.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  frobnicate: 3\n}\n')
    (v,) = caffe_io.load(bad).layers[0].verbatim
    assert v.text == "frobnicate: 3" and v.where.endswith("bad.prototxt:5")


def test_binary_file_given_as_definition_is_explained() -> None:
    with pytest.raises(ParseError, match="binary"):
        caffe_io.load(GOLDEN / "lenet" / "weights.caffemodel")


def test_unknown_layer_types_and_fork_fields_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "fork.prototxt"
    src.write_text(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 '
        'dim: 8 dim: 8 } } }\n'
        'layer { name: "p" type: "Pooling" bottom: "x" top: "p" '
        'pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }\n'
        'layer { name: "m" type: "MyForkLayer" bottom: "p" top: "m" propagate_down: false }\n'
    )
    net = caffe_io.load(src)
    out = tmp_path / "out.prototxt"
    caffe_io.save(net, out)
    text = out.read_text()
    assert "ceil_mode: false" in text and "MyForkLayer" in text and "propagate_down: false" in text


def test_cli_info_text_and_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(MODELS / "lenet.prototxt")]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "20x1x5x5" in out and "parameters" in out
    assert main(["info", str(MODELS / "lenet.prototxt"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"layers", "totals", "upgrades", "problems"}
    ip1 = next(lay for lay in rep["layers"] if lay["name"] == "ip1")
    assert ip1["top_shapes"] == [[1, 500]]
    assert [p["shape"] for p in ip1["params"]] == [[500, 800], [500]]
    assert [p["lr_mult"] for p in ip1["params"]] == [1.0, 2.0]
    assert rep["totals"]["params"] == 20 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 5010


def test_cli_info_train_phase_of_three_head_net(capsys: pytest.CaptureFixture) -> None:
    path = MODELS / "tiny_googlenet_train_val.prototxt"
    assert main(["info", str(path), "--phase", "train", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    names = [lay["name"] for lay in rep["layers"]]
    assert "loss1/top-1" not in names  # TEST-only accuracy is filtered out in TRAIN
    assert names.count("data") == 1


def test_cli_bad_input_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(tmp_path / "missing.prototxt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.prototxt" in err[0]


def test_cli_upgrade_v1_with_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = ZOO / "v1_trained_lenet"
    out, outw = tmp_path / "new.prototxt", tmp_path / "new.caffemodel"
    rc = main(
        [
            "upgrade", str(src / "lenet.prototxt"), "-o", str(out),
            "--weights", str(src / "lenet_iter_10000.caffemodel"), "--out-weights", str(outw),
        ]
    )
    assert rc == 0
    text = out.read_text()
    assert "layers {" not in text and 'type: "Convolution"' in text
    net = caffe_io.load(out, outw)
    assert not net.upgrades
    assert net.layer("ip2").params[0].data.shape == (10, 500)


def test_cli_never_overwrites_input(tmp_path: Path) -> None:
    src = tmp_path / "net.prototxt"
    src.write_text((MODELS / "lenet.prototxt").read_text())
    before = src.read_text()
    assert main(["upgrade", str(src), "-o", str(src)]) == 2
    assert src.read_text() == before
    assert main(["upgrade", str(src), "-o", str(src), "--in-place"]) == 0


def test_info_path_imports_no_torch_or_onnx() -> None:
    code = (
        "import sys; from surgery.cli import main; "
        f"main(['info', {str(MODELS / 'lenet.prototxt')!r}, '--json']); "
        "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'cv2') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ir_core_imports_no_serialization_format() -> None:
    """net.py and dataflow.py never import protobuf (the IR is independent of the format)."""
    root = Path(__file__).resolve().parents[1] / "surgery"
    for mod in ("net.py", "dataflow.py", "errors.py"):
        src = (root / mod).read_text()
        assert "google.protobuf" not in src and "caffe_pb2" not in src, mod


def test_info_guesses_dataset_shapes_and_reports_the_assumption(
    capsys: pytest.CaptureFixture,
) -> None:
    path = ZOO / "bvlc_googlenet" / "train_val.prototxt"
    assert main(["info", str(path), "--phase", "train", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["assumptions"] and "32x3x224x224" in rep["assumptions"][0]
    # GoogLeNet with its two auxiliary heads: 13,378,280 learnable values (1000 classes)
    assert rep["totals"]["params"] == 13_378_280
    heads = [lay for lay in rep["layers"] if lay["name"].endswith("/classifier")]
    assert [h["params"][0]["shape"] for h in heads] == [[1000, 1024]] * 3


def test_info_input_shape_overrides_data_and_label(capsys: pytest.CaptureFixture) -> None:
    path = ZOO / "caffe_mnist" / "lenet_train_test.prototxt"
    assert main(["info", str(path), "--input-shape", "data=64,1,28,28", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ip2 = next(lay for lay in rep["layers"] if lay["name"] == "ip2")
    assert ip2["top_shapes"] == [[64, 10]]
    assert rep["assumptions"] == []
    assert main(["info", str(path), "--input-shape", "data=0,1"]) == 2


def test_save_writes_nothing_when_the_weights_cannot_be_saved(tmp_path: Path) -> None:
    # Regression: the prototxt was written before the weights were validated.
    net = caffe_io.load(GOLDEN / "lenet" / "net.prototxt", GOLDEN / "lenet" / "weights.caffemodel")
    conv1 = net.layer("conv1")
    conv1.params[1].data = None  # weights for blob 0 only
    proto, weights = tmp_path / "out.prototxt", tmp_path / "out.caffemodel"
    with pytest.raises(SurgeryError, match="conv1"):
        caffe_io.save(net, proto, weights)
    assert not proto.exists() and not weights.exists()
    with pytest.raises(SurgeryError, match="does not exist"):
        lenet = GOLDEN / "lenet"
        full = caffe_io.load(lenet / "net.prototxt", lenet / "weights.caffemodel")
        caffe_io.save(full, proto, tmp_path / "no_such_dir" / "out.caffemodel")
    assert not proto.exists()


def test_write_text_atomic_raises_surgery_error(tmp_path: Path) -> None:
    # Regression: an OSError escaped, so the CLI printed a traceback instead of one line.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SurgeryError, match="cannot write"):
        caffe_io.write_text_atomic(blocker / "out.prototxt", "text")


def test_cli_upgrade_out_weights_needs_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Regression: --out-weights without --weights was ignored but reported as written.
    out, outw = tmp_path / "new.prototxt", tmp_path / "new.caffemodel"
    argv = ["upgrade", str(MODELS / "lenet.prototxt"), "-o", str(out), "--out-weights", str(outw)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out-weights needs --weights" in err[0]
    assert not out.exists() and not outw.exists()


def test_cli_upgrade_refuses_one_file_for_both_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = ZOO / "v1_trained_lenet"
    out = tmp_path / "new.prototxt"
    rc = main(
        [
            "upgrade", str(src / "lenet.prototxt"), "-o", str(out),
            "--weights", str(src / "lenet_iter_10000.caffemodel"),
            "--out-weights", str(tmp_path / "." / "new.prototxt"),
        ]
    )
    assert rc == 2
    assert "name the same file" in capsys.readouterr().err
    assert not out.exists()


def test_duplicate_layer_names_in_weights_last_wins(tmp_path: Path) -> None:
    """Caffe's CopyTrainedLayersFrom copies each namesake in turn: the last one stays."""
    from surgery import _wire

    header = caffe_pb2.LayerParameter(name="ip2", type="InnerProduct").SerializeToString()
    first = [np.zeros((10, 500), np.float32), np.zeros(10, np.float32)]
    last = [np.ones((10, 500), np.float32), np.ones(10, np.float32)]
    w = tmp_path / "dup.caffemodel"
    _wire.write_caffemodel(w, b"", [(header, first), (header, last)])
    net = caffe_io.load(MODELS / "lenet.prototxt", w)
    assert np.array_equal(net.layer("ip2").params[0].data, last[0])
