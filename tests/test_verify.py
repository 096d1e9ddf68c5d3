"""surgery.verify: backends against goldens, tolerance failures, the comparison rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import surgery  # noqa: E402
from surgery.errors import SurgeryError  # noqa: E402
from surgery.net import Param  # noqa: E402
from surgery.verify import compare, load_inputs, net_input_shapes, verify  # noqa: E402

from .conftest import GOLDEN  # noqa: E402


def _load(name: str) -> surgery.Net:
    d = GOLDEN / name
    meta = json.loads((d / "meta.json").read_text())
    return surgery.load(d / "net.prototxt", d / meta["weights"])


@pytest.mark.parametrize("name", ["lenet", "mtcnn_det1"])
def test_golden_passes_on_every_backend(name: str) -> None:
    rep = verify(_load(name), golden=GOLDEN / name)
    assert rep.passed, rep.table()
    assert rep.reference.startswith("golden")
    assert rep.tolerance == json.loads((GOLDEN / name / "meta.json").read_text())["tolerance"]
    for backend in ("onnxruntime", "torch", "opencv"):
        if backend in rep.skipped:
            continue
        assert rep.worst(backend) is not None
    blobs = {r.blob for r in rep.rows if r.backend == "onnxruntime"}
    assert {"prob" if name == "lenet" else "prob1", "conv1"} <= blobs
    assert "PASS" in rep.table()


def test_split_and_probed_blobs_are_compared() -> None:
    rep = verify(_load("face_res10"), golden=GOLDEN / "face_res10", backends=["onnxruntime"])
    assert rep.passed, rep.table()
    blobs = {r.blob for r in rep.rows}
    assert any("_split_" in b for b in blobs)
    assert any(r.note == "probed" for r in rep.rows)
    assert {"mbox_loc", "mbox_conf_flatten", "mbox_priorbox"} <= blobs


def test_tolerance_zero_fails() -> None:
    rep = verify(_load("lenet"), golden=GOLDEN / "lenet", backends=["onnxruntime"],
                 tolerance=0.0)
    assert not rep.passed
    assert "FAIL" in rep.table()


def test_corrupted_weight_is_found() -> None:
    net = _load("lenet")
    conv2 = net.layer("conv2")
    w = conv2.params[0].data.copy()
    w[0, 0, 0, 0] += 1.0
    conv2.params[0] = Param(w, conv2.params[0].lr_mult, conv2.params[0].decay_mult)
    rep = verify(net, golden=GOLDEN / "lenet", backends=["onnxruntime", "torch"])
    assert not rep.passed
    failing = {r.blob for r in rep.failures}
    assert "conv2" in failing and "conv1" not in failing


def test_random_input_against_opencv() -> None:
    pytest.importorskip("cv2")
    rep = verify(_load("squeezenet_v1_1"), backends=["onnxruntime", "opencv"], seed=1)
    assert rep.reference.startswith("opencv"), rep.reference
    assert rep.inputs == {"data": (10, 3, 227, 227)}
    assert rep.passed, rep.table()


def test_unknown_backend_and_bad_tolerance() -> None:
    net = _load("lenet")
    with pytest.raises(SurgeryError, match="unknown backend"):
        verify(net, backends=["caffe2"])
    with pytest.raises(SurgeryError, match="tolerance"):
        verify(net, backends=["onnxruntime"], tolerance=-1)


def test_inputs_checked() -> None:
    net = _load("lenet")
    with pytest.raises(SurgeryError, match="no input array"):
        verify(net, backends=["onnxruntime"], inputs={"x": np.zeros((1, 1, 28, 28))})
    with pytest.raises(SurgeryError, match="axes"):
        verify(net, backends=["onnxruntime"], inputs={"data": np.zeros((28, 28))})


def test_load_inputs(tmp_path) -> None:
    p = tmp_path / "x.npz"
    np.savez(p, anything=np.ones((1, 1, 28, 28)))
    assert load_inputs(p, ["data"])["data"].dtype == np.float32
    np.savez(p, a=np.ones(1), b=np.ones(1))
    with pytest.raises(SurgeryError, match="no array for input"):
        load_inputs(p, ["data"])
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(SurgeryError, match="cannot read"):
        load_inputs(tmp_path / "bad.npz", ["data"])


def test_net_input_shapes() -> None:
    assert net_input_shapes(_load("lenet")) == {"data": (64, 1, 28, 28)}


def test_compare_rules() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    assert compare(a, a) == (0.0, 0.0, "")
    diff, rel, _ = compare(a + 0.4, a)
    assert math.isclose(diff, 0.4, rel_tol=1e-6) and math.isclose(rel, 0.1, rel_tol=1e-6)
    assert compare(a.reshape(-1), a)[1] == 0.0  # same count, other layout: reshaped
    assert compare(a[:1], a)[1] == math.inf
    bad = a.copy()
    bad[0, 0] = np.nan
    assert compare(bad, a)[2] == "non-finite values"
    assert compare(a[::-1], a, as_set=True)[1] == 0.0  # detections: rows as a set
    assert compare(a[::-1], a)[1] > 0


def _conv_net(extra: list, readers: int = 1) -> surgery.Net:
    from surgery.net import Layer, Net

    rng = np.random.default_rng(0)
    return Net("v", [
        Layer("input", "Input", [], ["data"], attrs={"shape": [{"dim": [2, 3, 6, 6]}]},
              param_field="input_param"),
        Layer("conv1", "Convolution", ["data"], ["conv1"],
              attrs={"num_output": 4, "kernel_size": [3]}, param_field="convolution_param",
              params=[Param(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
                      Param(rng.normal(size=4).astype(np.float32))]),
        *extra,
    ])


def test_split_copies_of_many_readers_are_compared(tmp_path) -> None:
    """Caffe names one split copy per reader; a blob with 20 readers has ``_split_19``."""
    from surgery.export import reference
    from surgery.net import Layer

    net = _conv_net([Layer(f"r{i}", "ReLU", ["conv1"], [f"r{i}"]) for i in range(20)])
    x = np.random.default_rng(1).normal(size=(2, 3, 6, 6)).astype(np.float32)
    conv1 = reference.forward(net.layer("conv1"), [x])[0]
    np.savez(tmp_path / "input.npz", data=x)
    np.savez(tmp_path / "outputs.npz", conv1_conv1_0_split_19=conv1, r19=np.maximum(conv1, 0))
    rep = verify(net, golden=tmp_path, backends=["onnxruntime"])
    assert {r.blob for r in rep.rows} == {"conv1_conv1_0_split_19", "r19"}, rep.table()
    assert rep.passed and not rep.uncompared["onnxruntime"], rep.table()


def test_train_phase_backends_agree_on_batch_statistics() -> None:
    """In TRAIN a BatchNorm uses the batch's statistics on every backend (Dropout off)."""
    pytest.importorskip("torch")
    from surgery.net import Layer

    rng = np.random.default_rng(2)
    net = _conv_net([
        Layer("bn", "BatchNorm", ["conv1"], ["conv1"], param_field="batch_norm_param",
              params=[Param(rng.normal(size=4).astype(np.float32)),
                      Param(rng.uniform(0.5, 2, size=4).astype(np.float32)),
                      Param(np.array([1.0], np.float32))]),
        Layer("drop", "Dropout", ["conv1"], ["conv1"], param_field="dropout_param"),
    ])
    rep = verify(net, backends=["onnxruntime", "torch"], phase="TRAIN")
    assert rep.passed, rep.table()
    assert {r.blob for r in rep.rows} >= {"conv1"}


def test_axpy_net_is_not_checked_against_opencv(tmp_path) -> None:
    """OpenCV 4.x reads SENet's Axpy as a*y + x (its importer scales bottom 2), Caffe's layer is
    a*x + y: on SE-ResNet-50 `surgery verify` failed every blob after the first Axpy against
    OpenCV while onnxruntime and torch agreed. OpenCV is skipped, naming the reason."""
    pytest.importorskip("cv2")
    p = tmp_path / "axpy.prototxt"
    p.write_text(
        'layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 2 dim: 1 '
        'dim: 1 } } }\n'
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 dim: 3 '
        'dim: 3 } } }\n'
        'layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 1 dim: 2 dim: 3 '
        'dim: 3 } } }\n'
        'layer { name: "axpy" type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "z" }\n'
    )
    rng = np.random.default_rng(0)
    feed = {
        "a": rng.standard_normal((1, 2, 1, 1), dtype=np.float32),
        "x": rng.standard_normal((1, 2, 3, 3), dtype=np.float32),
        "y": rng.standard_normal((1, 2, 3, 3), dtype=np.float32),
    }
    rep = verify(surgery.load(p), inputs=feed, backends=["onnxruntime", "torch", "opencv"])
    assert "opencv" in rep.skipped and "a*x + y" in rep.skipped["opencv"], rep.skipped
    assert rep.reference == "onnxruntime" and rep.backends == ["torch"] and rep.passed
    # and torch computes SENet's a * x + y
    from surgery.export.torch import run_blobs, to_torch

    got = run_blobs(to_torch(surgery.load(p)), feed)["z"]
    np.testing.assert_allclose(got, feed["a"] * feed["x"] + feed["y"], rtol=1e-6)
