"""One shape inference for every verb (issue 7, item 5).

A train_val net whose data layers read a ``mean_file`` (so nothing in the definition tells the
channels): ``info`` infers the data shape (batch_size x 3 x crop x crop, the 3 assumed and
reported), and every other verb that needs shapes -- transplant, export onnx/torch, verify --
now uses exactly that, or ``--input-shape``. Before, transplant failed with "shapes cannot be
inferred", export torch/onnx refused the net, and export torch had no ``--input-shape``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.cli import main, parse_input_shapes
from surgery.net import Param
from surgery.ops._common import fill_missing_weights

from .conftest import import_generated, needs

TRAIN_VAL = """
name: "tiny_tv"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 8 mean_file: "mean.binaryproto" }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 8 mean_file: "mean.binaryproto" }
  data_param { source: "val_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""


@pytest.fixture()
def tv(tmp_path: Path) -> tuple[str, str]:
    """The train_val definition and a caffemodel for it (weights drawn from its fillers)."""
    proto = tmp_path / "train_val.prototxt"
    proto.write_text(TRAIN_VAL)
    net = surgery.load(proto)
    fill_missing_weights(net, np.random.default_rng(0))  # uses info's inference too
    weights = tmp_path / "w.caffemodel"
    surgery.save(net, weights=weights)
    return str(proto), str(weights)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_one_parser_for_input_shapes() -> None:
    from surgery.cli import export, inspect

    assert not hasattr(export, "parse_input_shapes") and not hasattr(inspect,
                                                                      "parse_input_shapes")
    assert parse_input_shapes(["data=1,3,8,8", "2x1x4x4"]) == {"data": (1, 3, 8, 8),
                                                               "": (2, 1, 4, 4)}


def test_info_assumes_and_reports(tv: tuple[str, str], capsys: pytest.CaptureFixture[str]
                                  ) -> None:
    rep = _json(capsys, ["info", tv[0]])
    assert rep["layers"][0]["top_shapes"] == [[2, 3, 8, 8], [2]]
    assert "assumed 3" in rep["assumptions"][0]
    rep = _json(capsys, ["info", tv[0], "--weights", tv[1], "--phase", "train"])
    assert rep["layers"][0]["top_shapes"] == [[4, 3, 8, 8], [4]]
    assert "from 'conv1''s weights" in rep["assumptions"][0]


def test_transplant_train_val_fills_with_info_shapes(
    tv: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Source has conv1 only: fc must be filled, which needs pool1's shape (was: "cannot be
    # inferred").
    src_net = surgery.load(tv[0], tv[1])
    for lay in src_net.layers_named("fc"):
        for p in lay.params:
            p.data = None
    src = tmp_path / "conv1_only.caffemodel"
    surgery.save(src_net, weights=src)
    out = tmp_path / "t.caffemodel"
    rep = _json(capsys, ["transplant", tv[0], "--from", str(src), "-o", str(out)])
    assert rep["data"]["filled"] == ["fc"] and rep["data"]["copied"] == ["conv1"]
    assert any(n.startswith("assumed: ") and "3x8x8" in n for n in rep["notes"])
    got = surgery.load(tv[0], out)
    assert got.layer("fc").params[0].data.shape == (5, 4 * 3 * 3)
    # --input-shape changes what the filled layer gets (and a wrong channel count is caught)
    rep = _json(capsys, ["transplant", tv[0], "--from", str(src), "-o", str(out),
                         "--input-shape", "data=2,3,12,12", "--on-mismatch", "reinit"])
    assert surgery.load(tv[0], out).layer("fc").params[0].data.shape == (5, 4 * 5 * 5)
    assert main(["transplant", tv[0], "--from", str(src), "-o", str(out),
                 "--input-shape", "2,1,8,8"]) == 2
    assert "conv1" in capsys.readouterr().err


def test_export_torch_and_onnx_need_no_input_shape(
    tv: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ort = pytest.importorskip("onnxruntime")
    rep = _json(capsys, ["export", "torch", tv[0], "--weights", tv[1], "-o",
                         str(tmp_path / "t")])
    assert rep["inputs"] == ["data"] and rep["outputs"] == ["fc"]
    assert any("2x3x8x8" in n for n in rep["notes"])
    rep = _json(capsys, ["export", "onnx", tv[0], "--weights", tv[1], "-o",
                         str(tmp_path / "m.onnx")])
    assert any("assumed" in n for n in rep["notes"])
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    want = sess.run(["fc"], {"data": x})[0]
    mod = import_generated(tmp_path / "t" / "model.py", "tv_model")
    model = mod.CaffeNet()
    model.load_weights(str(tmp_path / "t" / "weights.safetensors"))
    import torch

    got = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # --input-shape on export torch, bare (the only image input) and by name
    rep = _json(capsys, ["export", "torch", tv[0], "--weights", tv[1], "-o",
                         str(tmp_path / "t3"), "--input-shape", "1,3,8,8"])
    assert not any("assumed" in n for n in rep["notes"])
    assert main(["export", "torch", tv[0], "--weights", tv[1], "-o", str(tmp_path / "t4"),
                 "--input-shape", "prob=1,3,10,10"]) == 2
    assert "not inputs of the net" in capsys.readouterr().err
    assert not (tmp_path / "t4").exists()


@needs("torch")
def test_export_torch_phase_train_from_cli(
    tv: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    rep = _json(capsys, ["export", "torch", tv[0], "--weights", tv[1], "-o",
                         str(tmp_path / "tr"), "--phase", "train"])
    assert rep["phase"] == "TRAIN" and rep["inputs"] == ["data", "label"]
    mod = import_generated(tmp_path / "tr" / "model.py", "tv_train")
    model = mod.CaffeNet()
    model.load_weights(str(tmp_path / "tr" / "weights.safetensors"))
    x = torch.randn(4, 3, 8, 8)
    label = torch.tensor([0.0, 1.0, 2.0, 4.0])
    out = model(x, label)
    # Caffe's SoftmaxWithLoss on fc, computed here independently
    fc = model.fc(torch.flatten(torch.max_pool2d(torch.relu(model.conv1(x)), 2, 2, ceil_mode=True),
                                1))
    want = torch.nn.functional.cross_entropy(fc, label.long())
    assert torch.allclose(out["loss"], want, atol=1e-5)
    out["total_loss"].backward()
    assert model.conv1.weight.grad is not None


def test_verify_random_input_of_inferred_shapes(
    tv: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    rep = _json(capsys, ["verify", tv[0], "--weights", tv[1], "--backends",
                         "onnxruntime,torch"])
    assert rep["inputs"] == {"data": [2, 3, 8, 8]} and rep["passed"]
    rep = _json(capsys, ["verify", tv[0], "--weights", tv[1], "--backends",
                         "onnxruntime,torch", "--input-shape", "data=3,3,8,8"])
    assert rep["inputs"] == {"data": [3, 3, 8, 8]} and rep["passed"]


def test_bare_input_shape_needs_one_input(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    proto = tmp_path / "two.prototxt"
    proto.write_text(
        'layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "s" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }\n')
    assert main(["info", str(proto), "--input-shape", "3,2"]) == 2
    assert "one input" in capsys.readouterr().err
    rep = _json(capsys, ["info", str(proto), "--input-shape", "b=3,2", "--input-shape",
                         "a=3,2"])
    assert rep["layers"][2]["top_shapes"] == [[3, 2]]


def test_fc_to_conv_on_train_val(tv: tuple[str, str], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fc.prototxt"
    assert main(["fc-to-conv", tv[0], "--layers", "fc", "-o", str(out)]) == 0, (
        capsys.readouterr().err)
    assert surgery.load(out).layer("fc-conv").attrs["kernel_size"] == [3]  # pool1: 4x3x3
    # a shape the definition contradicts (crop_size 8) is refused, nothing written
    out.unlink()
    assert main(["fc-to-conv", tv[0], "--layers", "fc", "-o", str(out), "--input-shape",
                 "data=2,3,12,12"]) == 2
    assert "would fail `surgery info`" in capsys.readouterr().err and not out.exists()


_HDF5 = """
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 2 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_rename_heads_and_fc_to_conv_take_input_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proto = tmp_path / "h5.prototxt"
    proto.write_text(_HDF5)
    net = surgery.load(proto)
    rng = np.random.default_rng(0)
    for lay, shapes in (("conv1", [(4, 3, 3, 3), (4,)]), ("fc", [(5, 36), (5,)])):
        net.layer(lay).params = [Param(data=rng.standard_normal(s).astype(np.float32))
                                 for s in shapes]
    weights = tmp_path / "w.caffemodel"
    surgery.save(net, weights=weights)
    argv = ["rename-heads", str(proto), "--num-output", "7", "--weights", str(weights),
            "--out-weights", str(tmp_path / "ft.caffemodel"), "-o", str(tmp_path / "ft.prototxt")]
    # HDF5 data: nothing tells the shape of 'data'; the head's K comes from the given shape
    assert main([*argv, "--input-shape", "data=2,3,5,5"]) == 0, capsys.readouterr().err
    ft = surgery.load(tmp_path / "ft.prototxt", tmp_path / "ft.caffemodel")
    assert ft.layer("fc_ft").params[0].data.shape == (7, 36)
    fc = tmp_path / "fc.prototxt"
    assert main(["fc-to-conv", str(proto), "-o", str(fc)]) == 2
    assert "input" in capsys.readouterr().err and not fc.exists()
    assert main(["fc-to-conv", str(proto), "-o", str(fc), "--input-shape", "data=2,3,5,5"]) == 0
    assert surgery.load(fc).layer("fc-conv").attrs["kernel_size"] == [3]
