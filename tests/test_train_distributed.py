"""torchrun DDP on CPU (gloo) ends with the same weights as one process with iter_size 2.

Caffe's multi-GPU semantics: each of the 2 processes takes batch_size samples per iteration,
dealt round-robin (sample k to rank k % 2), gradients averaged; one process with iter_size: 2
sees the same 2 x batch_size samples per update. Net without BatchNorm/Dropout. 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from surgery import caffe_io

NET = """name: "ddp"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "LIST" batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_two_processes_equal_iter_size_two(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["data"] = rng.standard_normal((24, 2, 5, 5)).astype(np.float32)
        f["label"] = rng.integers(0, 3, 24).astype(np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'd.h5'}\n")
    (tmp_path / "net.prototxt").write_text(NET.replace("LIST", str(tmp_path / "list.txt")))
    base = (f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "step"\n'
            "stepsize: 3\ngamma: 0.5\nmomentum: 0.9\nweight_decay: 0.01\nmax_iter: 7\n"
            "random_seed: 5\nsolver_mode: CPU\n")
    (tmp_path / "ddp.prototxt").write_text(base + f'snapshot_prefix: "{tmp_path / "ddp"}"\n')
    (tmp_path / "one.prototxt").write_text(base + "iter_size: 2\n"
                                           f'snapshot_prefix: "{tmp_path / "one"}"\n')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "surgery", "train",
                        str(tmp_path / "ddp.prototxt"), "--device", "cpu"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Optimization Done.") == 1  # rank 0 alone prints
    r1 = subprocess.run([sys.executable, "-m", "surgery", "train",
                         str(tmp_path / "one.prototxt"), "--device", "cpu"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a = caffe_io.load(tmp_path / "net.prototxt", tmp_path / "ddp_iter_7.caffemodel")
    b = caffe_io.load(tmp_path / "net.prototxt", tmp_path / "one_iter_7.caffemodel")
    for name in ("conv", "ip"):
        for pa, pb in zip(a.layer(name).params, b.layer(name).params, strict=True):
            np.testing.assert_allclose(pa.data, pb.data, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not (tmp_path / "ddp_iter_7.solverstate.tmp").exists()
