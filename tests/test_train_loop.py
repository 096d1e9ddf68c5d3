"""The training loop (surgery.train.Trainer, `surgery train`): Caffe's Solver semantics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `train` extra

from surgery import caffe_io  # noqa: E402
from surgery.cli import main  # noqa: E402
from surgery.errors import SolverError  # noqa: E402
from surgery.train import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NET = """name: "tiny"
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  include { phase: TRAIN }
  memory_data_param { batch_size: BATCH channels: 2 height: 5 width: 5 } }
layer { name: "data" type: "MemoryData" top: "data" top: "label"
  include { phase: TEST }
  memory_data_param { batch_size: 4 channels: 2 height: 5 width: 5 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
"""


class Samples(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((n, 2, 5, 5)).astype(np.float32)
        self.y = rng.integers(0, 3, n).astype(np.float32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _solver(tmp: Path, extra: str = "", batch: int = 4, name: str = "solver") -> Path:
    (tmp / "net.prototxt").write_text(NET.replace("BATCH", str(batch)))
    s = tmp / f"{name}.prototxt"
    s.write_text(f'net: "{tmp / "net.prototxt"}"\nbase_lr: 0.05\nlr_policy: "fixed"\n'
                 f'momentum: 0.9\nweight_decay: 0.001\nmax_iter: 6\nrandom_seed: 3\n'
                 f'snapshot_prefix: "{tmp / name}"\n' + extra)
    return s


def _trainer(s: Path, n: int = 16, **kw) -> tuple[Trainer, list[str]]:
    lines: list[str] = []
    t = Trainer(s, datasets={"data": Samples(n)}, test_datasets={"data": Samples(8, 1)},
                log=lines.append, **kw)
    return t, lines


def _weights(t: Trainer) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in t.model.state_dict().items()}


def test_caffe_lines_tests_and_snapshots(tmp_path: Path) -> None:
    s = _solver(tmp_path, "display: 2\naverage_loss: 2\ntest_iter: 2\ntest_interval: 3\n"
                          "snapshot: 4\n")
    t, lines = _trainer(s, log_json=str(tmp_path / "log.jsonl"))
    t.solve()
    text = "\n".join(lines)
    # test at 0 (test_initialization), 3, and at the end (6 % 3 == 0); displays at 0, 2, 4
    assert [ln for ln in lines if "Testing net" in ln] == [
        f"Iteration {i}, Testing net (#0)" for i in (0, 3, 6)]
    assert "    Test net output #0: acc = " in text and "#1: loss = " in text
    assert "(* 1 = " in text
    for i in (0, 2, 4):
        assert any(ln.startswith(f"Iteration {i} (") and "loss = " in ln for ln in lines)
        assert f"Iteration {i}, lr = 0.05" in lines
    assert "images/s" in text and "Optimization Done." in lines[-1]
    assert sorted(p.name for p in tmp_path.glob("solver_iter_*")) == [
        "solver_iter_4.caffemodel", "solver_iter_4.solverstate",
        "solver_iter_6.caffemodel", "solver_iter_6.solverstate"]
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    disp = [r for r in recs if "lr" in r]
    assert [r["iter"] for r in disp] == [0, 2, 4] and set(disp[0]["outputs"]) == {"loss"}
    tests = [r for r in recs if r.get("phase") == "test"]
    assert set(tests[0]["outputs"]) == {"acc", "loss"}
    # the snapshot is a caffemodel of the train net with the trained weights
    net = caffe_io.load(tmp_path / "net.prototxt", tmp_path / "solver_iter_6.caffemodel")
    np.testing.assert_array_equal(net.layer("ip").params[0].data,
                                  t.model.ip.weight.detach().numpy())


def test_smoothed_loss_is_the_mean_of_the_last_average_loss(tmp_path: Path) -> None:
    s = _solver(tmp_path, "display: 1\naverage_loss: 3\n")
    t, lines = _trainer(s)
    t.step(5)
    printed = [float(ln.rsplit("= ", 1)[1]) for ln in lines if ln.startswith("Iteration ")
               and "iter/s" in ln]
    raw = [float(ln.split("= ")[1].split(" ")[0]) for ln in lines if "Train net output" in ln]
    expect = [np.mean(raw[max(0, i - 2):i + 1]) for i in range(5)]
    np.testing.assert_allclose(printed, expect, rtol=1e-5)


def test_iter_size_equals_a_larger_batch(tmp_path: Path) -> None:
    a, _ = _trainer(_solver(tmp_path, "iter_size: 2\n", batch=4, name="a"))
    b, _ = _trainer(_solver(tmp_path, "", batch=8, name="b"))
    b.model.load_state_dict(a.model.state_dict())
    a.step(4)
    b.step(4)
    for k, v in _weights(a).items():
        np.testing.assert_allclose(v, _weights(b)[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_from_a_snapshot_continues_exactly(tmp_path: Path) -> None:
    # one batch = the whole dataset, so the data stream does not depend on where we start
    s = _solver(tmp_path, 'type: "Adam"\n', batch=8)
    full, _ = _trainer(s, n=8)
    full.step(6)
    part, _ = _trainer(s, n=8)
    part.step(3)
    _, state = part.snapshot()
    resumed, lines = _trainer(s, n=8)
    resumed.restore(state)
    assert resumed.iter == 3 and any("Restored solver state" in ln for ln in lines)
    resumed.step(3)
    for k, v in _weights(full).items():
        np.testing.assert_allclose(_weights(resumed)[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_frozen_layer_stays_bit_identical(tmp_path: Path) -> None:
    s = _solver(tmp_path, "")
    text = (tmp_path / "net.prototxt").read_text().replace(
        'bottom: "data" top: "conv"\n',
        'bottom: "data" top: "conv"\n  param { lr_mult: 0 } param { lr_mult: 0 }\n')
    (tmp_path / "net.prototxt").write_text(text)
    t, _ = _trainer(s)
    before = t.model.conv.weight.detach().clone()
    t.step(3)
    assert torch.equal(before, t.model.conv.weight)
    assert not torch.equal(t.model.ip.weight, before.new_zeros(1))


def test_nan_loss_names_the_iteration_and_the_last_snapshot(tmp_path: Path) -> None:
    s = _solver(tmp_path, "snapshot: 1\n").read_text().replace("base_lr: 0.05", "base_lr: 1e30")
    (tmp_path / "solver.prototxt").write_text(s)
    t, _ = _trainer(tmp_path / "solver.prototxt")
    with pytest.raises(SolverError, match=r"iteration \d+: the loss is nan.*solver_iter_\d+"):
        t.solve()


def test_unwritable_snapshot_folder_is_refused_before_training(tmp_path: Path) -> None:
    s = _solver(tmp_path, f'snapshot: 2\nsnapshot_prefix: "{tmp_path}/missing/x"\n')
    s.write_text(s.read_text().replace(f'snapshot_prefix: "{tmp_path / "solver"}"\n', ""))
    t, lines = _trainer(s)
    with pytest.raises(SolverError, match="cannot write snapshots"):
        t.solve()
    assert t.iter == 0


def test_solverstate_from_another_net_is_refused(tmp_path: Path) -> None:
    s = _solver(tmp_path, "")
    t, _ = _trainer(s)
    bad = tmp_path / "bad.solverstate"
    caffe_io.write_solver_state(bad, iter=3, learned_net="", history=[np.zeros(3, np.float32)])
    with pytest.raises(SolverError, match="1 history blobs, but this net has 4 learnable"):
        t.restore(bad)


def test_cli_errors_exit_2(tmp_path: Path, capsys) -> None:
    s = _solver(tmp_path, "bogus_field: 1\n")
    assert main(["train", str(s)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery train: error:") and "bogus_field" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_trains_with_an_input_free_net(tmp_path: Path, capsys) -> None:
    net = tmp_path / "d.prototxt"
    net.write_text("""name: "d"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
""")
    s = tmp_path / "s.prototxt"
    s.write_text(f'net: "{net}"\nbase_lr: 0.1\nlr_policy: "inv"\ngamma: 0.1\npower: 0.75\n'
                 f"max_iter: 4\ndisplay: 2\n")
    assert main(["train", str(s), "--log-json", str(tmp_path / "l.jsonl")]) == 0
    out = capsys.readouterr().out
    lr2 = 0.1 * (1 + 0.1 * 2) ** -0.75
    assert f"Iteration 2, lr = {lr2:.6g}" in out
    assert (tmp_path / "s_iter_4.caffemodel").is_file()  # snapshot_prefix unset: solver's path
    rec = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert rec[1]["iter"] == 2 and math.isclose(rec[1]["lr"], lr2, rel_tol=1e-6)


def test_accuracy_lowering_counts_ties_as_caffe() -> None:
    from surgery.export._torch_runtime import caffe_accuracy

    x = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [3.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    y = torch.tensor([1.0, 0.0, 2.0, 2.0])
    # sample 1: a tie with class 1 -> two scores >= the true one: wrong for top-1
    assert caffe_accuracy(x, y, 1, 1, None).item() == pytest.approx(0.5)
    assert caffe_accuracy(x, y, 2, 1, None).item() == pytest.approx(1.0)
    assert caffe_accuracy(x, y, 1, 1, 0).item() == pytest.approx(2 / 3)


def test_bf16_autocast_and_channels_last_train(tmp_path: Path) -> None:
    s = _solver(tmp_path, "display: 1\n")
    t, lines = _trainer(s, amp="bf16", channels_last=True)
    before = t.model.conv.weight.detach().clone()
    t.step(2)
    assert t.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(before, t.model.conv.weight)
    assert t.model.conv.weight.dtype == torch.float32  # master weights stay float32
    losses = [float(ln.rsplit("= ", 1)[1]) for ln in lines if "iter/s" in ln]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_sigterm_snapshots_then_stops(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    net = tmp_path / "d.prototxt"
    net.write_text("""name: "d"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
""")
    s = tmp_path / "s.prototxt"
    s.write_text(f'net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 100000000\n'
                 f'display: 50\nsnapshot_prefix: "{tmp_path / "run"}"\n')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    p = subprocess.Popen([sys.executable, "-m", "surgery", "train", str(s), "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    for line in p.stdout:  # wait until it trains
        if line.startswith("Iteration 50 "):
            break
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "SIGTERM received" in out and "Optimization stopped early." in out
    snaps = sorted(tmp_path.glob("run_iter_*.solverstate"))
    assert len(snaps) == 1 and snaps[0].with_suffix(".caffemodel").is_file()
    assert caffe_io.read_solver_state(snaps[0])["iter"] > 50


def test_batchnorm_statistics_survive_snapshot_and_restore(tmp_path: Path) -> None:
    s = _solver(tmp_path, "")
    text = (tmp_path / "net.prototxt").read_text().replace(
        'layer { name: "relu"',
        'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }\n'
        'layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" '
        "scale_param { bias_term: true } }\n"
        'layer { name: "relu"')
    (tmp_path / "net.prototxt").write_text(text)
    t, _ = _trainer(s)
    t.step(3)
    _, state = t.snapshot()
    again, _ = _trainer(s)
    again.restore(state)
    for k, v in _weights(t).items():
        np.testing.assert_allclose(_weights(again)[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert len(caffe_io.read_solver_state(state)["history"]) == 9  # conv 2, bn 3, sc 2, ip 2
