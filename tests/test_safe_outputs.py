"""The CLI never destroys a user's files (issue 8, items 1 and 3): export folders, the ONNX
external data file, recipe outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from surgery import _atomic
from surgery.cli import main

from .conftest import GOLDEN, needs

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
@needs("torch")
def test_export_torch_into_the_folder_of_its_inputs_is_refused(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    before = _snapshot(tmp_path)
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o",
                 str(tmp_path)]) == 2
    _one_line_error(capsys, "holds the input", "new folder")
    assert _snapshot(tmp_path) == before


@needs("torch")
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


@needs("torch")
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


@needs("torch")
def test_export_torch_replaces_a_previous_export_as_a_whole(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    out = tmp_path / "out"
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "caffe_names.json", "model.py", "net.prototxt", "weights.safetensors"]
    (out / "__pycache__").mkdir()  # importing model.py leaves this
    (out / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"")
    (out / "weights.safetensors").write_bytes(b"stale")
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "caffe_names.json", "model.py", "net.prototxt", "weights.safetensors"]
    assert (out / "weights.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "net.prototxt", "out", "weights.caffemodel"]
    # an empty folder is fine too
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["export", "torch", str(net), "--weights", str(weights), "-o", str(empty)]) == 0


@needs("torch")
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


@needs("torch")
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


# -- item 3: recipes --------------------------------------------------------------------------
@pytest.fixture
def recipe_dir(tmp_path: Path, lenet: tuple[Path, Path]) -> Path:
    folder = tmp_path / "r"
    folder.mkdir()
    for p in lenet:
        shutil.move(p, folder / p.name)
    return folder


def _recipe(folder: Path, body: str) -> Path:
    p = folder / "recipe.toml"
    p.write_text('net = "net.prototxt"\nweights = "weights.caffemodel"\n' + body
                 + '\n[[step]]\nop = "rename-heads"\nnum_output = 3\nlayer = ["ip2"]\n')
    return p


@pytest.mark.parametrize(("body", "words"), [
    ('output = "recipe.toml"', ["is the recipe itself"]),
    ('output = "net.prototxt"', ["would overwrite the net", "--in-place"]),
    ('out_weights = "weights.caffemodel"\noutput = "o.prototxt"',
     ["would overwrite the weights", "--in-place"]),
    ('output = "o.prototxt"\nout_weights = "src.caffemodel"\n[[step]]\nop = "transplant"\n'
     'from = "src.caffemodel"', ["would overwrite step 1 (transplant) from", "--in-place"]),
    ('output = "../outside.txt"', ["existing file outside the recipe's folder", "--force"]),
    ('output = 5', ["recipe: output must be a file path in quotes (a string); got int 5"]),
    ('net = ["a", "b"]', ["recipe: net must be a file path"]),
    ('output = "o.prototxt"\n[[step]]\nop = "transplant"\nfrom = 7',
     ["step 1 (transplant) from must be a file path"]),
    ('output = "o.prototxt"\nx = ' + "[" * 400 + "]" * 400, ["nested too deeply"]),
    ('output = "o.prototxt"\nx = ' + "[" * 5 + "]" * 5 + '\n', ["unknown key(s) 'x'"]),
    ('output = "o.prototxt"\nseed = ' + "[" * 20 + "]" * 20, ["nested too deeply"]),
    ('RAW:net = "net.prototxt"\noutput = "o.prototxt"\n[step]\nop = "freeze"',
     ["[[step]] (double brackets)"]),
])
def test_recipe_outputs_and_types_are_checked(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str], body: str, words: list[str]
) -> None:
    if body.startswith("RAW:"):
        p = recipe_dir / "recipe.toml"
        p.write_text(body[4:] + "\n")
    elif body.startswith("net = "):
        p = recipe_dir / "recipe.toml"
        p.write_text(body + '\noutput = "o.prototxt"\n[[step]]\nop = "freeze"\nuntil = "ip1"\n')
    else:
        if "src.caffemodel" in body:
            shutil.copy(recipe_dir / "weights.caffemodel", recipe_dir / "src.caffemodel")
        p = _recipe(recipe_dir, body)
    (recipe_dir.parent / "outside.txt").write_text("keep")
    before = _snapshot(recipe_dir.parent)
    assert main(["apply", str(p)]) == 2
    _one_line_error(capsys, *words)
    assert _snapshot(recipe_dir.parent) == before


def test_recipe_in_place_and_force_allow_it(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (recipe_dir.parent / "outside.prototxt").write_text("old")
    # a new file outside the folder, or one given on the command line, needs no option
    p = _recipe(recipe_dir, 'output = "../new.prototxt"')
    assert main(["apply", str(p), "--no-weights"]) == 0
    assert main(["apply", str(p), "--no-weights", "-o",
                 str(recipe_dir.parent / "outside.prototxt")]) == 0
    assert "ip2_ft" in (recipe_dir.parent / "outside.prototxt").read_text()
    (recipe_dir.parent / "outside.prototxt").write_text("old")
    p = _recipe(recipe_dir, 'output = "../outside.prototxt"')
    assert main(["apply", str(p), "--force"]) == 0
    assert "ip2_ft" in (recipe_dir.parent / "outside.prototxt").read_text()
    p = _recipe(recipe_dir, 'output = "net.prototxt"')
    assert main(["apply", str(p), "--in-place"]) == 0
    assert "ip2_ft" in (recipe_dir / "net.prototxt").read_text()


def test_recipe_report_shows_resolved_paths(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    p = _recipe(recipe_dir, 'output = "o.prototxt"\nout_weights = "o.caffemodel"')
    monkeypatch.chdir(recipe_dir.parent)
    assert main(["apply", "r/recipe.toml", "--json"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert files["net"] == str(recipe_dir / "net.prototxt")
    assert files["weights"] == str(recipe_dir / "weights.caffemodel")
    assert files["output"] == str(recipe_dir / "o.prototxt")
    assert files["out_weights"] == str(recipe_dir / "o.caffemodel")
    assert main(["apply", "r/recipe.toml"]) == 0
    text = capsys.readouterr().out
    assert f"read {recipe_dir / 'net.prototxt'}" in text
    assert f"wrote {recipe_dir / 'o.prototxt'} and {recipe_dir / 'o.caffemodel'}" in text
    assert p.is_file()


def test_apply_recipe_library_checks_too(recipe_dir: Path) -> None:
    from surgery.errors import SurgeryError
    from surgery.ops import apply_recipe

    p = _recipe(recipe_dir, 'output = "o.prototxt"\nout_weights = "weights.caffemodel"')
    before = _snapshot(recipe_dir)
    with pytest.raises(SurgeryError, match="would overwrite the weights"):
        apply_recipe(p)
    assert _snapshot(recipe_dir) == before
    net, rep = apply_recipe(p, in_place=True)
    assert rep.data["files"]["out_weights"] == str(recipe_dir / "weights.caffemodel")
    with pytest.raises(SurgeryError, match="nested too deeply"):
        apply_recipe({"step": [{"op": "freeze", "layers": [[[[[[[[["x"]]]]]]]]]}]}, net,
                     write=False)


# -- item 2 through the CLI: a failing second write leaves no first file --------------------------
_PAIR_VERBS = {
    "rename-heads": ["rename-heads", "N", "--weights", "W", "--num-output", "5", "--layer", "ip2"],
    "fc-to-conv": ["fc-to-conv", "N", "--weights", "W"],
    "upgrade": ["upgrade", "N", "--weights", "W"],
    "insert-gate": ["insert-gate", "N", "--at", "conv1", "--weights", "W"],
    "cut": ["cut", "N", "--at", "ip1", "--weights", "W"],
}


@pytest.mark.parametrize("verb", list(_PAIR_VERBS))
def test_failing_caffemodel_write_leaves_no_prototxt(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    from surgery import _wire

    def disk_full(path, *args, **kwargs):  # half the caffemodel, then the disk is full
        with _atomic.outputs() as out:
            out.file(path).write_bytes(b"\x00" * 4096)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(_wire, "write_caffemodel", disk_full)
    net, weights = lenet
    argv = [{"N": str(net), "W": str(weights)}.get(a, a) for a in _PAIR_VERBS[verb]]
    before = _snapshot(tmp_path)
    assert main([*argv, "-o", str(tmp_path / "o.prototxt"), "--out-weights",
                 str(tmp_path / "o.caffemodel")]) == 2
    _one_line_error(capsys, "o.caffemodel: cannot write: No space left on device")
    assert _snapshot(tmp_path) == before


def test_transplant_report_that_cannot_be_written_leaves_no_caffemodel(
    tmp_path: Path, lenet: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    net, weights = lenet
    (tmp_path / "r.json").mkdir()  # the second output cannot be written
    before = _snapshot(tmp_path)
    assert main(["transplant", str(net), "--from", str(weights), "-o",
                 str(tmp_path / "o.caffemodel"), "--report", str(tmp_path / "r.json")]) == 2
    _one_line_error(capsys, "r.json: cannot write: it is a folder")
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["net.prototxt", "weights.caffemodel", "r.json"])


def test_apply_failing_caffemodel_write_leaves_no_prototxt(
    recipe_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from surgery import _wire

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_wire, "write_caffemodel", disk_full)
    p = _recipe(recipe_dir, 'output = "o.prototxt"\nout_weights = "o.caffemodel"')
    before = _snapshot(recipe_dir)
    assert main(["apply", str(p)]) == 2
    _one_line_error(capsys, "No space left on device")
    assert _snapshot(recipe_dir) == before


def test_export_onnx_removes_only_its_own_obsolete_data_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from surgery.caffe_io import load
    from surgery.export.onnx import save_onnx

    net = load(LENET / "net.prototxt", LENET / "weights.caffemodel")
    out, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    save_onnx(net, out, external_threshold=1024)  # a big model: weights in m.onnx.data
    assert data.is_file()
    save_onnx(net, out)  # now small: the old model's data file goes with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    data.write_bytes(b"someone else's file")  # not used by m.onnx: kept
    save_onnx(net, out)
    assert data.read_bytes() == b"someone else's file"


def test_data_dump_is_one_set(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lmdb")
    import surgery.data.summary as summary

    from .test_data import data_net, lmdb_of, pixels

    lmdb_of(tmp_path, [pixels(i, (3, 6, 6)) for i in range(4)], labels=[1, 1, 2, 5])
    proto = data_net(tmp_path, transform="scale: 0.5")
    argv = ["data", str(proto), "--layer", "data", "--phase", "test", "--count", "4", "--dump"]
    calls = []
    real = summary._is_image

    def fail_late(a):  # the third sample's image fails: two samples' files are written by then
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(a)

    monkeypatch.setattr(summary, "_is_image", fail_late)
    before = _snapshot(tmp_path)
    with pytest.raises(OSError):
        main([*argv, str(tmp_path / "new")])
    assert _snapshot(tmp_path) == before and not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mine.txt").write_text("keep")
    calls.clear()
    with pytest.raises(OSError):
        main([*argv, str(tmp_path / "old")])
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["mine.txt"]
    monkeypatch.setattr(summary, "_is_image", real)
    assert main([*argv, str(tmp_path / "old")]) == 0
    assert len(list((tmp_path / "old").iterdir())) == 1 + 4 * 3
