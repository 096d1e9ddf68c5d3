"""Staged fine-tuning: examples/googlenet_two_stage.toml end to end on a generated dataset.

The example recipe and solver run as written, on the bundled 32x32 GoogLeNet-shaped net
(models/tiny_googlenet_train_val.prototxt, three heads) placed where the recipe looks for
GoogLeNet, with seeded random "pretrained" weights and small generated LMDBs; only the stage
lengths are shortened (max_iter) so the test is fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from surgery import caffe_io
from surgery.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]


def _lmdb(path: Path, n: int, seed: int) -> None:
    lmdb = pytest.importorskip("lmdb")
    from surgery._proto import caffe_pb2

    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            d = caffe_pb2.Datum(channels=3, height=32, width=32, label=int(rng.integers(0, 7)),
                                data=rng.integers(0, 256, (3, 32, 32), np.uint8).tobytes())
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()


def test_googlenet_two_stage_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    g = tmp_path / "bvlc_googlenet"
    g.mkdir()
    shutil.copy(ROOT / "models" / "tiny_googlenet_train_val.prototxt", g / "train_val.prototxt")
    _lmdb(g / "train_lmdb", 40, 0)
    _lmdb(g / "val_lmdb", 20, 1)
    # "pretrained" weights: the net's fillers, seeded
    assert main(["init", str(g / "train_val.prototxt"), "-o",
                 str(g / "bvlc_googlenet.caffemodel"), "--seed", "3"]) == 0
    recipe = (ROOT / "examples" / "googlenet_two_stage.toml").read_text()
    recipe = recipe.replace("max_iter = 2000", "max_iter = 3").replace("max_iter = 4000",
                                                                       "max_iter = 3")
    (tmp_path / "recipe.toml").write_text(recipe)
    solver = (ROOT / "examples" / "googlenet_two_stage_solver.prototxt").read_text()
    (tmp_path / "googlenet_two_stage_solver.prototxt").write_text(
        solver.replace("test_iter: 50", "test_iter: 2").replace("display: 20", "display: 1"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["apply", "recipe.toml", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "== train stage 'heads' ==" in out and "== train stage 'all' ==" in out
    init = caffe_io.load(tmp_path / "googlenet_ft_train_val.prototxt",
                         tmp_path / "googlenet_ft_init.caffemodel")
    s1 = caffe_io.load(tmp_path / "googlenet_ft_train_val.prototxt",
                       tmp_path / "googlenet_ft_heads_iter_3.caffemodel")
    s2 = caffe_io.load(tmp_path / "googlenet_ft_train_val.prototxt",
                       tmp_path / "googlenet_ft_all_iter_3.caffemodel")
    assert (tmp_path / "googlenet_ft_all_iter_3.solverstate").is_file()
    trunk, head = "conv1/3x3_s1", "loss3/classifier_ft"
    # stage 1: the frozen trunk is bit-identical, the heads learned
    for a, b in zip(init.layer(trunk).params, s1.layer(trunk).params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(init.layer(head).params[0].data, s1.layer(head).params[0].data)
    assert s1.layer(head).params[0].data.shape == (7, init.layer(head).params[0].data.shape[1])
    # stage 2 starts from stage 1 and trains the trunk too
    assert not np.array_equal(s1.layer(trunk).params[0].data, s2.layer(trunk).params[0].data)
    # the snapshot loads in OpenCV (with the deploy net of the trained definition)
    cv2 = pytest.importorskip("cv2")
    assert main(["deploy", "googlenet_ft_train_val.prototxt", "-o", "deploy.prototxt",
                 "--input-shape", "1,3,32,32"]) == 0
    cvnet = cv2.dnn.readNetFromCaffe("deploy.prototxt", "googlenet_ft_all_iter_3.caffemodel")
    cvnet.setInput(np.zeros((1, 3, 32, 32), np.float32))
    assert cvnet.forward().shape == (1, 7)


def test_bad_stage_is_refused_before_training(tmp_path: Path, capsys) -> None:
    (tmp_path / "r.toml").write_text(
        'net = "n.prototxt"\noutput = "o.prototxt"\n[[step]]\nop = "freeze"\n'
        'layers = ["*"]\n[[train]]\nmax_iters = 3\n')
    (tmp_path / "n.prototxt").write_text((ROOT / "models" / "lenet.prototxt").read_text())
    assert main(["apply", str(tmp_path / "r.toml")]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) max_iters" in err
    assert not (tmp_path / "o.prototxt").exists()
