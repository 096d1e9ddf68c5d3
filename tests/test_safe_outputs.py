"""The CLI never destroys a user's files (issue 8, items 1 and 3): export folders, the ONNX
external data file, recipe outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from surgery import _atomic
from surgery.cli import main

from .conftest import GOLDEN

LENET = GOLDEN / "lenet"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def lenet(tmp_path: Path) -> tuple[Path, Path]:
    net, weights = tmp_path / "net.prototxt", tmp_path / "weights.caffemodel"
    shutil.copy(LENET / "net.prototxt", net)
    shutil.copy(LENET / "weights.caffemodel", weights)
    return net, weights


# -- item 1: export torch never deletes a folder it did not write --------------------------------
def test_export_torch_into_the_folder_of_its_inputs_is_refused(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    before = _snapshot(tmp_path)
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o",
                 str(tmp_path)]) == 2
    _one_line_error(capsys, "holds the input", "new folder")
    assert _snapshot(tmp_path) == before


def test_export_torch_into_a_folder_with_other_files_is_refused(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.py").write_text("# mine too")
    before = _snapshot(tmp_path)
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(out)]) == 2
    _one_line_error(capsys, "is not a previous export")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", [".", "..", "./", "sub/.."])
def test_export_torch_to_the_current_folder_or_above_is_refused(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    net, weights = lenet
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", where]) == 2
    _one_line_error(capsys, f"-o {where}: is the current folder or one above it")
    assert _snapshot(tmp_path) == before


def test_export_torch_replaces_a_previous_export_as_a_whole(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    out = tmp_path / "out"
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "caffe_names.json", "model.py", "weights.safetensors"]
    (out / "__pycache__").mkdir()  # importing model.py leaves this
    (out / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    (out / "weights.safetensors").write_bytes(b"stale")
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "caffe_names.json", "model.py", "weights.safetensors"]
    assert (out / "weights.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "net.prototxt", "out", "weights.caffemodel"]
    # an empty folder is fine too
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(empty)]) == 0


def test_export_torch_never_replaces_a_previous_export_holding_an_input(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    out = tmp_path / "out"
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(out)]) == 0
    # an export whose model.py is then used as the net's input (names match ours exactly)
    shutil.copy(net, out / "model.py")
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(["export", "torch", str(out / "model.py"), "--weights", str(weights), "-o",
                 str(out)]) == 2
    _one_line_error(capsys, "holds the input")
    assert _snapshot(tmp_path) == before


def test_export_torch_onto_a_file_is_refused(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    (tmp_path / "f").write_text("keep")
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o",
                 str(tmp_path / "f")]) == 2
    _one_line_error(capsys, "not a folder")
    assert (tmp_path / "f").read_text() == "keep"


# -- export onnx: the external data file is an output too ----------------------------------------
def test_export_onnx_data_file_never_overwrites_an_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = tmp_path / "m.onnx.data"  # a net whose name is the .data file of -o m.onnx
    shutil.copy(LENET / "net.prototxt", net)
    before = _snapshot(tmp_path)
    assert main(["export", "onnx", str(net), "-o", str(tmp_path / "m.onnx")]) == 2
    _one_line_error(capsys, "would overwrite the input")
    assert _snapshot(tmp_path) == before


def test_export_onnx_external_pair_is_written_as_a_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx")
    from surgery.caffe_io import load
    from surgery.errors import SurgeryError
    from surgery.export.onnx import save_onnx

    net = load(LENET / "net.prototxt", LENET / "weights.caffemodel")
    out = tmp_path / "m.onnx"
    real = os.replace

    def fail_on_the_model(src, dst):  # the .data rename went through, the model's fails
        if os.fspath(dst) == str(out):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_model)
    with pytest.raises(SurgeryError, match="cannot write"):
        save_onnx(net, out, external_threshold=1024)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", real)
    save_onnx(net, out, external_threshold=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert not any(_atomic.TEMP_MARK in p.name for p in tmp_path.iterdir())
