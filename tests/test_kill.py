"""SIGKILL at random moments never leaves a partial file at a target path (issue 8, "Done when").

A ~100 MB model (four 2500x2500 InnerProduct layers, random weights written with our own
writer) goes through ``transplant``, ``rename-heads --weights``, ``export onnx`` and ``export
torch`` in subprocesses that are killed with SIGKILL: while they write (a moment drawn after
their first temporary appears; twice, once for the slower exports) and once at a moment drawn
over a whole run. After each
kill every target holds either its old content or exactly what a complete run writes, nothing
else but the inputs and recognisable temporaries is in the folder, and the next run in that
folder removes the temporaries.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from surgery import _atomic, caffe_io
from surgery.cli import main
from surgery.net import Param

from .conftest import ROOT, needs

N = 2500  # 4 layers of N*N float32 weights: 100 MB
SEED = 8  # the kill moments are drawn from this seed


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("big")
    layers = [f'layer {{ name: "data" type: "Input" top: "data" '
              f'input_param {{ shape {{ dim: 1 dim: {N} }} }} }}']
    bottom = "data"
    for i in range(4):
        layers.append(f'layer {{ name: "fc{i}" type: "InnerProduct" bottom: "{bottom}" '
                      f'top: "fc{i}" inner_product_param {{ num_output: {N} }} }}')
        bottom = f"fc{i}"
    layers.append(f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}')
    (d / "big.prototxt").write_text('name: "big"\n' + "\n".join(layers) + "\n")
    net = caffe_io.load(d / "big.prototxt")
    rng = np.random.default_rng(0)
    for lay in net.layers:
        if lay.type == "InnerProduct":
            w = rng.standard_normal((N, N), dtype=np.float32) * 0.01
            lay.params = [Param(w), Param(np.zeros(N, np.float32))]
    caffe_io.save(net, None, d / "big.caffemodel")
    assert (d / "big.caffemodel").stat().st_size > 100_000_000
    return d


def _digest(path: Path) -> object:
    """A file's SHA-1, or a folder's {name: SHA-1}; None when absent."""
    if path.is_dir():
        return {p.name: _digest(p) for p in sorted(path.iterdir())}
    if not path.exists():
        return None
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if _atomic.TEMP_MARK in p.name]


VERBS = {
    "transplant": (["transplant", "big.prototxt", "--from", "big.caffemodel", "-o",
                    "t.caffemodel"], ["t.caffemodel"]),
    "rename-heads": (["rename-heads", "big.prototxt", "--weights", "big.caffemodel",
                      "--num-output", "10", "--layer", "fc3", "-o", "r.prototxt",
                      "--out-weights", "r.caffemodel"], ["r.prototxt", "r.caffemodel"]),
    "export-onnx": (["export", "onnx", "big.prototxt", "--weights", "big.caffemodel", "-o",
                     "m.onnx"], ["m.onnx"]),
    "export-torch": (["export", "torch", "big.prototxt", "--weights", "big.caffemodel", "-o",
                      "mt"], ["mt"]),
}


def _write_old(folder: Path, target: str, new: Path) -> None:
    """Put an "old" version at the target: different bytes (a previous export for folders)."""
    path = folder / target
    if new.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(new, path)
        (path / "weights.safetensors").write_bytes(b"old")
    else:
        path.write_bytes(b"old " + target.encode())


#: The extra each verb needs (skipped where it is missing: the minimum-version CI run).
NEEDS = {"export-onnx": ("onnx",), "export-torch": ("torch", "safetensors")}


@pytest.mark.parametrize(
    "verb", [pytest.param(v, marks=needs(*NEEDS.get(v, ()))) for v in VERBS])
def test_sigkill_never_leaves_a_partial_target(
    big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    argv, targets = VERBS[verb]
    work = tmp_path / "w"
    work.mkdir()
    for name in ("big.prototxt", "big.caffemodel"):
        os.link(big / name, work / name)
    inputs = {n: (work / n).stat().st_mtime_ns for n in ("big.prototxt", "big.caffemodel")}

    # a complete run (in this process) gives the new content and the time a run takes
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("big.prototxt", "big.caffemodel"):
        os.link(big / name, ref / name)
    monkeypatch.chdir(ref)
    start = time.monotonic()
    assert main(argv) == 0
    whole = time.monotonic() - start + 1.0  # + the subprocess's start-up
    new = {t: _digest(ref / t) for t in targets}
    monkeypatch.chdir(work)

    rng = random.Random(f"{SEED}-{verb}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen_temporaries = 0
    kills = 2 if verb.startswith("export") else 3  # the exports import torch/onnx: slower
    for attempt in range(kills):
        old = {}
        for t in targets:
            _write_old(work, t, ref / t)
            old[t] = _digest(work / t)
        proc = subprocess.Popen([sys.executable, "-m", "surgery", *argv], cwd=work, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if attempt < kills - 1:  # while writing: after the first temporary appears
                deadline = time.monotonic() + 4 * whole + 30
                while not _temporaries(work) and proc.poll() is None:
                    assert time.monotonic() < deadline, "no temporary ever appeared"
                    time.sleep(0.002)
                # at once (the first kill: the write has surely not finished), then later
                time.sleep(0 if attempt == 0 else rng.uniform(0, 0.4))
            else:  # anywhere in a run
                time.sleep(rng.uniform(0, whole))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        seen_temporaries += bool(_temporaries(work))
        for t in targets:
            got = _digest(work / t)
            assert got in (old[t], new[t]), f"{verb}: partial {t} after a kill ({attempt})"
        names = set(os.listdir(work)) - set(_temporaries(work))
        assert names == {"big.prototxt", "big.caffemodel", *targets}, names
        assert {n: (work / n).stat().st_mtime_ns for n in inputs} == inputs

    assert seen_temporaries, f"{verb}: no kill landed while writing; the test tested nothing"
    # the next run writing into this folder removes what the killed runs left
    assert main(["upgrade", "big.prototxt", "-o", "next.prototxt"]) == 0
    assert _temporaries(work) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_while_writing_clean_up(big: Path, tmp_path: Path, sig: int) -> None:
    """SIGTERM is handled as Ctrl-C: the temporaries go, the targets stay old, exit 143/130."""
    argv, targets = VERBS["rename-heads"]
    for name in ("big.prototxt", "big.caffemodel"):
        os.link(big / name, tmp_path / name)
    for t in targets:
        (tmp_path / t).write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "surgery", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _temporaries(tmp_path) and proc.poll() is None:
            assert time.monotonic() < deadline, "no temporary ever appeared"
            time.sleep(0.001)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == sorted(["big.prototxt", "big.caffemodel", *targets])
    assert all((tmp_path / t).read_bytes() == b"old" for t in targets)
