"""surgery._atomic: a set of outputs is written all together or not at all (issue 8, item 2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from surgery import _atomic, _wire, caffe_io
from surgery.errors import SurgeryError
from surgery.net import Layer, Net, Param

from .conftest import ROOT


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if _atomic.TEMP_MARK in p.name)


def _net() -> Net:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    ip = Layer("ip", "InnerProduct", ["data"], ["ip"], [Param(w), Param(np.zeros(2, np.float32))],
               attrs={"num_output": 2})
    inp = Layer("data", "Input", [], ["data"], attrs={"shape": [{"dim": [1, 3]}]})
    return Net("tiny", [inp, ip])


def test_set_is_renamed_only_at_the_end(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    with _atomic.outputs() as out:
        out.write_text(a, "first")
        tmp = out.file(b)
        assert tmp.parent == tmp_path and _atomic.is_temporary(tmp.name)
        tmp.write_bytes(b"second")
        assert not a.exists() and not b.exists()  # nothing at a target before the commit
    assert a.read_text() == "first" and b.read_bytes() == b"second"
    assert _temporaries(tmp_path) == []
    assert (a.stat().st_mode & 0o777) == 0o666 & ~_atomic._umask()


def test_exception_leaves_no_file_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError), _atomic.outputs() as out:
        out.write_text(tmp_path / "a.txt", "first")
        out.write_bytes(tmp_path / "b.bin", b"new")
        raise RuntimeError("the second writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]
    assert (tmp_path / "b.bin").read_bytes() == b"old"


def test_save_failing_caffemodel_writer_leaves_no_prototxt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(path, *args, **kwargs):  # writes part of its temporary, then fails
        with _atomic.outputs() as out:
            out.file(path).write_bytes(b"\x00" * 1000)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(_wire, "write_caffemodel", half_then_fail)
    proto, weights = tmp_path / "n.prototxt", tmp_path / "n.caffemodel"
    with pytest.raises(SurgeryError, match="n.caffemodel: cannot write: No space left"):
        caffe_io.save(_net(), proto, weights)
    assert list(tmp_path.iterdir()) == []


def test_save_second_target_unwritable_leaves_no_first(tmp_path: Path) -> None:
    # root ignores read-only folders; a folder in the caffemodel's place fails for everyone
    (tmp_path / "n.caffemodel").mkdir()
    with pytest.raises(SurgeryError, match="n.caffemodel: cannot write: it is a folder"):
        caffe_io.save(_net(), tmp_path / "n.prototxt", tmp_path / "n.caffemodel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.caffemodel"]


def test_failing_rename_rolls_back_the_renamed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(SurgeryError, match="b: cannot write: Input/output error"), \
            _atomic.outputs() as out:
        out.write_text(a, "new a")
        out.write_text(b, "new b")
    assert a.read_text() == "old a" and not b.exists()
    assert _temporaries(tmp_path) == []


def test_nested_sets_join_and_standalone_writes_at_once(tmp_path: Path) -> None:
    with pytest.raises(KeyError), _atomic.outputs():
        caffe_io.save(_net(), tmp_path / "n.prototxt", tmp_path / "n.caffemodel")
        caffe_io.write_text_atomic(tmp_path / "r.json", "{}")
        assert list(tmp_path.iterdir()) != [] and not (tmp_path / "n.prototxt").exists()
        with _atomic.standalone():
            caffe_io.write_text_atomic(tmp_path / "scratch.txt", "now")
        assert (tmp_path / "scratch.txt").read_text() == "now"
        raise KeyError("a later step failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch.txt"]


def test_same_target_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="named twice"):
        caffe_io.save(_net(), tmp_path / "x", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_folder_replace_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(SurgeryError, match="the folder exists"), _atomic.outputs() as out:
        out.folder(target)
    assert (target / "old.txt").read_text() == "old"
    with _atomic.outputs() as out:
        (out.folder(target, replace=True) / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_mode_of_a_replaced_file_is_kept(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_text("x")
    p.chmod(0o640)
    _atomic.write_text(p, "y")
    assert p.read_text() == "y" and (p.stat().st_mode & 0o777) == 0o640


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale_file = tmp_path / f".w.caffemodel{_atomic.TEMP_MARK}{pid}-{_atomic._HOST}abcd"
    stale_dir = tmp_path / f".model{_atomic.TEMP_MARK}{pid}-{_atomic._HOST}cdef"
    live = tmp_path / f".x{_atomic.TEMP_MARK}{os.getpid()}-{_atomic._HOST}0000"
    elsewhere = "ffff" if _atomic._HOST != "ffff" else "eeee"  # another machine's (NFS)
    remote = tmp_path / f".y{_atomic.TEMP_MARK}{pid}-{elsewhere}0000"
    remote.write_text("")
    other = tmp_path / ".w.caffemodel.abc.tmp"  # not ours by name: never touched
    stale_file.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "model.py").write_text("")
    live.write_text("")
    other.write_text("")
    _atomic.write_text(tmp_path / "out.txt", "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other.name, remote.name, "out.txt"])


_SIGNAL_DRIVER = textwrap.dedent("""
    import sys, time
    from surgery import _atomic
    from surgery.cli import main

    real = _atomic.Outputs.commit

    def slow_commit(self):  # every temporary is complete: the worst moment for a signal
        print("ready", flush=True)
        time.sleep(60)
        real(self)

    _atomic.Outputs.commit = slow_commit
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_before_commit_cleans_up(tmp_path: Path, sig: int, code: int) -> None:
    proto, weights = tmp_path / "n.prototxt", tmp_path / "n.caffemodel"
    caffe_io.save(_net(), proto, weights)
    out, out_w = tmp_path / "o.prototxt", tmp_path / "o.caffemodel"
    argv = ["rename-heads", str(proto), "--weights", str(weights), "--num-output", "5",
            "--layer", "ip", "-o", str(out), "--out-weights", str(out_w)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_DRIVER, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert _temporaries(tmp_path), "the temporaries should exist before the commit"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.caffemodel", "n.prototxt"]


def test_remove_is_part_of_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, gone = tmp_path / "a", tmp_path / "a.data"
    gone.write_text("old companion")
    with _atomic.outputs() as out:
        out.write_text(a, "new")
        out.remove(gone)
        assert gone.exists()  # only at the commit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    gone.write_text("old companion")
    real = os.replace

    def fail_last(src, dst):  # the removal went through; a later rename fails
        if os.fspath(dst) == str(tmp_path / "b"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_last)
    with pytest.raises(SurgeryError, match="b: cannot write"), _atomic.outputs() as out:
        out.remove(gone)
        out.write_text(a, "newer")
        out.write_text(tmp_path / "b", "b")
    assert gone.read_text() == "old companion" and a.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.data"]


_KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    from surgery import _atomic

    mode, a, b = sys.argv[1:4]
    calls = []
    if mode == "after-first-rename":
        real = _atomic._Step.apply

        def apply(self):
            real(self)
            os.kill(os.getpid(), signal.SIGKILL)

        _atomic._Step.apply = apply
    else:  # before the commit point: the pointer is written, the main journal is not
        real = _atomic._write_json

        def write_json(path, data):
            calls.append(path)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)

        _atomic._write_json = write_json
    with _atomic.outputs() as out:
        out.write_text(a, "new a")
        d = out.folder(b, replace=True)
        (d / "f").write_text("new b")
""")


def _kill_in_commit(tmp_path: Path, mode: str) -> tuple[Path, Path]:
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    a, b = tmp_path / "A" / "a.txt", tmp_path / "B" / "export"
    a.write_text("old a")
    b.mkdir()
    (b / "f").write_text("old b")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILL_DRIVER, mode, str(a), str(b)], env=env)
    assert proc.returncode == -signal.SIGKILL
    return a, b


def _all_temporaries(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.rglob("*") if _atomic.TEMP_MARK in p.name)


def test_sigkill_among_the_renames_is_finished_by_the_next_run(tmp_path: Path) -> None:
    a, b = _kill_in_commit(tmp_path, "after-first-rename")
    assert a.read_text() == "new a" and (b / "f").read_text() == "old b"  # half done
    journals = [n for n in _all_temporaries(tmp_path) if n.startswith(".surgery-commit.")]
    assert len(journals) == 2  # the journal in A, a pointer in B
    _atomic.write_text(b.parent / "other.txt", "x")  # any run writing into B
    assert a.read_text() == "new a" and (b / "f").read_text() == "new b"
    assert _all_temporaries(tmp_path) == []


def test_sigkill_among_the_renames_leaves_a_target_written_since(tmp_path: Path) -> None:
    a, b = _kill_in_commit(tmp_path, "after-first-rename")
    shutil.rmtree(b)
    b.mkdir()
    (b / "f").write_text("the user's")
    future = time.time() + 5
    os.utime(b, (future, future))
    _atomic.clean_stale(a.parent)
    assert (b / "f").read_text() == "the user's"
    assert a.read_text() == "new a"
    assert _all_temporaries(tmp_path) == []


def test_sigkill_before_the_commit_point_leaves_everything_old(tmp_path: Path) -> None:
    a, b = _kill_in_commit(tmp_path, "before-commit-point")
    assert _all_temporaries(tmp_path)
    _atomic.clean_stale(b.parent)
    _atomic.clean_stale(a.parent)
    assert a.read_text() == "old a" and (b / "f").read_text() == "old b"
    assert _all_temporaries(tmp_path) == []
