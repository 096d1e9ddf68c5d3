"""Small things a user trips on (issue 7 items 12, 13, 15): a missing extra named in one line,
a report piped into ``head``, an ``info`` table that fits 100 columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from surgery.cli import main

from .conftest import MODELS, ROOT, ZOO

LENET = str(MODELS / "lenet.prototxt")
GOOGLENET_TRAIN_VAL = ZOO / "bvlc_googlenet" / "train_val.prototxt"


def _run_without(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter where ``modules`` cannot be imported (a core-only
    install): a ``None`` entry in ``sys.modules`` makes ``import`` raise ModuleNotFoundError."""
    code = (
        "import sys\n"
        f"for m in {modules!r}: sys.modules[m] = None\n"
        "from surgery.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(
    ("verb", "missing", "extra"),
    [
        (["export", "onnx"], ["onnx", "onnxruntime"], "onnx"),
        (["export", "torch"], ["torch", "safetensors"], "torch"),
    ],
)
def test_export_without_its_extra_names_the_extra(tmp_path, verb, missing, extra):
    out = tmp_path / ("m.onnx" if verb[1] == "onnx" else "m")
    proc = _run_without(missing, [*verb, LENET, "-o", str(out)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert f"pip install 'caffe-surgery[{extra}]'" in err[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_verify_opencv_without_cv2_names_the_extra(tmp_path):
    golden = ROOT.parent / "shared" / "golden" / "lenet"
    argv = ["verify", str(golden / "net.prototxt"), "--weights",
            str(golden / "weights.caffemodel"), "--backends", "opencv"]
    proc = _run_without(["cv2"], argv, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "pip install 'caffe-surgery[all]'" in proc.stderr


def test_unrelated_missing_module_still_raises():
    from surgery.cli import missing_extra_message

    assert missing_extra_message(ModuleNotFoundError("x", name="yaml")) is None
    assert "[onnx]" in missing_extra_message(ModuleNotFoundError("x", name="onnx.helper"))


def test_report_piped_into_head_exits_quietly(tmp_path):
    # `surgery info NET | head -1`: the reader closes the pipe after one line
    proc = subprocess.run(
        f"{sys.executable} -m surgery info {GOOGLENET_TRAIN_VAL} --wide | head -c 10",
        shell=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stderr == "", proc.stderr
    assert len(proc.stdout) == 10


def test_broken_pipe_in_process_returns_0(monkeypatch, capsys):
    import surgery.cli.inspect as inspect_cli

    def broken(*_a, **_k):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect_cli, "emit", broken)
    monkeypatch.setattr("surgery.cli._quiet_broken_pipe", lambda: 0)
    assert main(["info", LENET]) == 0
    assert capsys.readouterr().err == ""


def test_info_table_fits_100_columns_on_googlenet_train_val(capsys):
    assert main(["info", str(GOOGLENET_TRAIN_VAL)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    table = lines[: lines.index("")]
    assert len(table) == 1 + 165 + 13  # header, TEST layers, implicit Splits
    # every real layer name is visible in full where it fits 26 characters
    assert any(line.startswith("inception_3a/3x3_reduce ") for line in table)
    split = next(line for line in table if line.startswith("label_data_1_split "))
    assert "label -> 9 tops" in split and "Split*" in split
    assert "--wide" in out


def test_info_wide_shows_everything(capsys):
    assert main(["info", str(GOOGLENET_TRAIN_VAL), "--wide"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) > 300
    assert ",".join(f"label_data_1_split_{i}" for i in range(9)) in out
    assert "inception_4a/output_inception_4a/output_0_split" in out
