"""CLI verbs export onnx, export torch and verify through main([...]): exit codes, no partial
output, no heavy import at module import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from surgery.cli import main

from .conftest import GOLDEN, ROOT, needs

LENET = GOLDEN / "lenet"
NET, WEIGHTS = str(LENET / "net.prototxt"), str(LENET / "weights.caffemodel")


def test_no_heavy_imports() -> None:
    code = ("import sys, surgery.cli, surgery.cli.export; surgery.cli.build_parser(); "
            "bad = [m for m in ('onnx', 'onnxruntime', 'torch', 'cv2') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_export_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "lenet.onnx"
    rc = main(["export", "onnx", NET, "--weights", WEIGHTS, "-o", str(out), "--opset", "18",
               "--input-shape", "data=2,1,28,28", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["outputs"] == ["prob"] and rep["opset"] == 18
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(LENET / "input.npz")["data"]
    got = sess.run(["prob"], {"data": x})[0]
    want = np.load(LENET / "outputs.npz")["prob"]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_export_onnx_dynamic_fold(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    d = GOLDEN / "mobilenet_v1"
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(d / "net.prototxt"), "--weights",
                 str(d / "weights.caffemodel"), "-o", str(out), "--dynamic-batch",
                 "--fold-bn"]) == 0
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}


def _no_output(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    before = set(tmp_path.iterdir())
    assert main(argv) == 2
    assert set(tmp_path.iterdir()) == before, "partial output left behind"
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_export_onnx_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    out = str(tmp_path / "x.onnx")
    err = _no_output(tmp_path, ["export", "onnx", NET, "-o", out], capsys)
    assert "no weights" in err  # missing --weights: every layer named in one line
    bad = tmp_path / "bad.prototxt"
    bad.write_text(Path(NET).read_text().replace('type: "ReLU"', 'type: "Fancy"'))
    err = _no_output(tmp_path, ["export", "onnx", str(bad), "--weights", WEIGHTS, "-o", out],
                     capsys)
    assert "Fancy" in err
    err = _no_output(tmp_path, ["export", "onnx", NET, "--weights", WEIGHTS, "-o", out,
                                "--input-shape", "data=1,a"], capsys)
    assert "--input-shape" in err
    err = _no_output(tmp_path, ["export", "onnx", NET, "--weights", WEIGHTS, "-o", out,
                                "--input-shape", "nope=1,1,28,28"], capsys)
    assert "not inputs" in err
    err = _no_output(tmp_path, ["export", "onnx", NET, "--weights", WEIGHTS, "-o", out,
                                "--opset", "9"], capsys)
    assert "opset" in err
    err = _no_output(tmp_path, ["export", "onnx", NET, "--weights", WEIGHTS, "-o",
                                str(tmp_path / "missing" / "x.onnx")], capsys)
    assert "does not exist" in err


def test_export_onnx_refuses_to_overwrite_input(tmp_path: Path) -> None:
    copy = tmp_path / "net.prototxt"
    copy.write_text(Path(NET).read_text())
    assert main(["export", "onnx", str(copy), "--weights", WEIGHTS, "-o", str(copy)]) == 2
    assert copy.read_text() == Path(NET).read_text()


def test_export_torch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "lenet_torch"
    assert main(["export", "torch", NET, "--weights", WEIGHTS, "-o", str(out)]) == 0
    assert {"model.py", "weights.safetensors", "caffe_names.json"} <= {
        p.name for p in out.iterdir()}


def test_export_torch_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    bad = tmp_path / "bad.prototxt"
    bad.write_text(Path(NET).read_text().replace('type: "ReLU"', 'type: "Fancy"'))
    before = set(tmp_path.iterdir())
    assert main(["export", "torch", str(bad), "--weights", WEIGHTS, "-o",
                 str(tmp_path / "out")]) == 2
    assert set(tmp_path.iterdir()) == before
    assert "Fancy" in capsys.readouterr().err


def test_verify_golden_passes(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["verify", NET, "--weights", WEIGHTS, "--golden", str(LENET)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "prob" in out
    assert "onnxruntime abs / rel" in out.splitlines()[0]


def test_verify_tolerance_exceeded(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    assert main(["verify", NET, "--weights", WEIGHTS, "--golden", str(LENET),
                 "--backends", "onnxruntime", "--tolerance", "0"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_input_npz_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    x = tmp_path / "x.npz"
    np.savez(x, data=np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32))
    assert main(["verify", NET, "--weights", WEIGHTS, "--input", str(x), "--backends",
                 "onnxruntime,torch", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["passed"] and rep["inputs"] == {"data": [3, 1, 28, 28]}
    assert rep["reference"] == "onnxruntime"


@pytest.mark.parametrize("argv,what", [
    (["--backends", "caffe2"], "--backends"),
    (["--input", "/nonexistent.npz"], "cannot read"),
    (["--golden", "/nonexistent"], "no such folder"),
    (["--tolerance", "-1"], "--tolerance"),
])
def test_verify_bad_input(argv: list[str], what: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", NET, "--weights", WEIGHTS, *argv]) == 2
    assert what in capsys.readouterr().err


@needs("torch")
def test_export_torch_with_detection_output(tmp_path):
    """`--detection-output` puts Caffe's DetectionOutput in model.py (SSD nets)."""
    from surgery.cli import main

    from .conftest import GOLDEN

    g = GOLDEN / "face_res10"
    out = tmp_path / "ssd"
    rc = main(["export", "torch", str(g / "net.prototxt"), "--weights",
               str(g / "weights.caffemodel"), "-o", str(out), "--detection-output"])
    assert rc == 0
    src = (out / "model.py").read_text()
    assert "detection_out" in src
