"""``surgery convert``: the batch pipeline of :mod:`surgery.convert` on a handful of tiny nets.

Worker processes, resumption (a rerun reuses unchanged nets, an edited definition is converted
again), a worker killed with SIGKILL or past ``--timeout`` as that net's row, the Markdown
report and JSON, bad arguments, and no torch/onnx in the parent process. The nets are written
here (a convolution and an inner product on a 1x3x8x8 input), so each converts in well under a
second; most of the time is the workers' start (importing torch and onnxruntime).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.convert import ConvertOptions, Result, markdown_report, run_batch

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]

NET = """name: "{name}"
layer {{ name: "data" type: "Input" top: "data"
  input_param {{ shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: {c} kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param {{ num_output: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""
UNSUPPORTED = """name: "odd"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "py" type: "Python" bottom: "data" top: "out"
  python_param { module: "m" layer: "L" } }
"""


def _zoo(root: Path, n: int = 3) -> Path:
    for i in range(n):
        (root / f"net{i}").mkdir(parents=True)
        (root / f"net{i}" / "deploy.prototxt").write_text(NET.format(name=f"net{i}", c=2 + i))
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop(("SURGERY_CONVERT_HANG"), None)
    env.update(extra)
    return env


# The parent process must not import torch/onnx/cv2 (the workers do): run the CLI in a
# subprocess that reports what it imported.
RUN = ("import sys; from surgery.cli import main; rc = main(sys.argv[1:]); "
       "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'cv2') if m in sys.modules]; "
       "print('IMPORTED', bad, file=sys.stderr); sys.exit(rc)")


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          env=_env(**env), timeout=300)


def test_convert_then_resume_then_one_edited(tmp_path: Path) -> None:
    zoo = _zoo(tmp_path / "zoo")
    (zoo / "odd").mkdir()
    (zoo / "odd" / "deploy.prototxt").write_text(UNSUPPORTED)
    out, rep, js = tmp_path / "out", tmp_path / "r.md", tmp_path / "r.json"
    args = [str(zoo), "-o", str(out), "--jobs", "2", "--verify", "onnxruntime,torch",
            "--report", str(rep), "--json", str(js)]
    proc = _cli(["convert", *args])
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stderr  # the workers imported torch, not the parent
    rows = {r["name"]: r for r in json.loads(js.read_text())["nets"]}
    assert sorted(rows) == ["net0/deploy", "net1/deploy", "net2/deploy", "odd/deploy"]
    assert rows["odd/deploy"]["status"] == "unsupported: Python"
    for i in range(3):
        r = rows[f"net{i}/deploy"]
        assert r["status"] == "ok" and r["weights"] == "random" and not r["reused"]
        assert 0 <= r["torch_vs_onnx"] <= 1e-5
        # conv 3x3 from 3 to c channels + bias, then fc from c*6*6 to 5 + bias
        c = 2 + i
        assert r["params"] == c * 27 + c + c * 36 * 5 + 5
        assert set(r["export_seconds"]) == {"onnx", "torch"}
        assert r["sizes"]["onnx"] == (out / f"net{i}" / "deploy" / "model.onnx").stat().st_size
        assert (out / f"net{i}" / "deploy" / "torch" / "model.py").is_file()
    assert "[4/4]" in proc.stderr and "left" in proc.stderr  # progress, one line per net
    assert "3 ok, 1 unsupported" in proc.stdout
    md = rep.read_text()
    assert "| net1/deploy |" in md and "## Unsupported" in md and "`odd/deploy`: Python" in md
    onnx_mtime = (out / "net0" / "deploy" / "model.onnx").stat().st_mtime_ns

    # a second run reuses every net (nothing converted: the outputs are not rewritten)
    proc = _cli(["convert", *args])
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(js.read_text())["nets"]}
    assert all(r["reused"] for r in rows.values()), rows
    assert rows["odd/deploy"]["status"] == "unsupported: Python"
    assert "4 net(s) unchanged" in proc.stdout
    assert "[4/4] odd/deploy: unsupported: Python (weights -, unchanged, reused)" in proc.stderr
    assert (out / "net0" / "deploy" / "model.onnx").stat().st_mtime_ns == onnx_mtime

    # an edited definition is converted again, alone; so is a net whose output was damaged
    net1 = zoo / "net1" / "deploy.prototxt"
    net1.write_text(net1.read_text().replace("num_output: 5", "num_output: 7"))
    (out / "net2" / "deploy" / "model.onnx").write_bytes(b"damaged")
    proc = _cli(["convert", *args])
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(js.read_text())["nets"]}
    assert [n for n, r in rows.items() if not r["reused"]] == ["net1/deploy", "net2/deploy"]
    assert rows["net1/deploy"]["params"] == 3 * 27 + 3 + 3 * 36 * 7 + 7
    assert (out / "net0" / "deploy" / "model.onnx").stat().st_mtime_ns == onnx_mtime
    # other options are other inputs: the net is converted again (--only: the other rows
    # stay in OUT/convert.json)
    proc = _cli(["convert", *args, "--seed", "3", "--only", "net0/*"])
    rows = {r["name"]: r for r in json.loads(js.read_text())["nets"]}
    assert proc.returncode == 0 and list(rows) == ["net0/deploy"]
    assert not rows["net0/deploy"]["reused"]
    state = json.loads((out / "convert.json").read_text())["nets"]
    assert sorted(state) == ["net0/deploy", "net1/deploy", "net2/deploy", "odd/deploy"]


def test_sigkill_of_one_worker_is_that_nets_row(tmp_path: Path) -> None:
    zoo = _zoo(tmp_path / "zoo", 4)
    out, js, pidfile = tmp_path / "out", tmp_path / "r.json", tmp_path / "pid"
    args = ["-m", "surgery", "convert", str(zoo), "-o", str(out), "--jobs", "2", "--to", "onnx",
            "--verify", "onnxruntime", "--json", str(js)]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=_env(SURGERY_CONVERT_HANG="net2/*",
                                     SURGERY_CONVERT_HANG_PIDFILE=str(pidfile)))
    try:
        deadline = time.monotonic() + 240
        while not pidfile.exists() or not pidfile.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    rows = {r["name"]: r for r in json.loads(js.read_text())["nets"]}
    assert rows["net2/deploy"]["status"] == (
        "error: worker killed by SIGKILL (out of memory, or killed)")
    assert rows["net2/deploy"]["failed"]
    assert [rows[f"net{i}/deploy"]["status"] for i in (0, 1, 3)] == ["ok"] * 3
    assert "net2/deploy  " in stdout and "3 ok, 1 error" in stdout
    # the rerun converts the killed net only
    proc2 = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert proc2.returncode == 0, proc2.stderr
    rows = {r["name"]: r for r in json.loads(js.read_text())["nets"]}
    assert [n for n, r in rows.items() if not r["reused"]] == ["net2/deploy"]
    assert rows["net2/deploy"]["status"] == "ok"


def test_timeout_kills_a_hung_worker_and_the_rest_complete(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    zoo = _zoo(tmp_path / "zoo", 2)
    monkeypatch.setenv("SURGERY_CONVERT_HANG", "net0")
    paths = [zoo / "net0" / "deploy.prototxt", zoo / "net1" / "deploy.prototxt"]
    # nothing exported nor run: the workers never import torch, so this is quick
    opts = ConvertOptions(to=(), verify=())
    start = time.monotonic()
    rows = run_batch(paths, tmp_path / "out", opts, names=["net0", "net1"], jobs=2, timeout=5)
    assert time.monotonic() - start < 60
    assert rows[0].status == "error: timeout after 5s (worker killed)" and rows[0].failed
    assert rows[1].status == "ok" and rows[1].weights == "random"
    assert rows[1].params == 3 * 27 + 3 + 3 * 36 * 5 + 5  # net1: 3 channels
    assert "error: timeout" in markdown_report(rows)


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zoo = _zoo(tmp_path / "zoo", 1)
    out = str(tmp_path / "out")
    for args, words in [
        ([str(tmp_path / "nope"), "-o", out], "no such file"),
        ([str(zoo), "-o", out, "--to", "tflite"], "--to"),
        ([str(zoo), "-o", out, "--verify", "caffe"], "--caffe PYCAFFE"),
        ([str(zoo), "-o", out, "--caffe", str(zoo)], "not an executable"),
        ([str(zoo), "-o", out, "--jobs", "0"], "--jobs"),
        ([str(zoo), "-o", out, "--input-shape", "data=1,a"], "--input-shape"),
        ([str(zoo), "-o", out, "--only", "other*"], "no net definition"),
    ]:
        assert main(["convert", *args]) == 2, args
        assert words in capsys.readouterr().err
    assert not Path(out).exists()


def test_result_round_trips_through_the_state_file() -> None:
    r = Result("a/b", "/x/b.prototxt", status="ok", params=3, export_seconds={"onnx": 0.1})
    from dataclasses import asdict

    assert Result.from_dict({**asdict(r), "failed": False, "new_key": 1}) == r
