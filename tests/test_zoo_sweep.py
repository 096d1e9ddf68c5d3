"""The zoo pipeline (:mod:`surgery.convert`, ``surgery convert``) on a handful of small but
diverse real nets.

Each net is loaded with random weights from Caffe's fillers, exported to ONNX and PyTorch,
run on onnxruntime, torch and (when installed) OpenCV 4.x, and every common blob compared.
Inputs are cut down where the net allows it, so the whole file stays well under a minute.
The full run (``surgery convert ../shared/zoo -o OUT``) covers every net of ``../shared/zoo``;
the batch machinery (workers, resumption, kills) is tested on tiny nets in test_convert.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from surgery import convert as zoo_convert  # noqa: E402

from .conftest import ZOO  # noqa: E402

HAVE_CV2 = importlib.util.find_spec("cv2") is not None

# (net, input shapes or None for the net's own, what it covers)
NETS = [
    ("bvlc_alexnet/deploy.prototxt", {"data": (2, 3, 99, 99)},
     "group conv, LRN across channels, Dropout, InnerProduct"),
    ("bvlc_reference_caffenet/train_val.prototxt", {"data": (1, 3, 99, 99)},
     "train_val in TEST: Data layer as input, Accuracy/loss dropped"),
    ("squeezenet_v1.1/deploy.prototxt", {"data": (1, 3, 67, 67)},
     "Concat fire modules, ceil pooling, global AVE pooling"),
    ("mobilenet_v2/mobilenet_v2_deploy.prototxt", {"data": (1, 3, 64, 64)},
     "depthwise group conv, BatchNorm + Scale with bias, Eltwise SUM"),
    ("inception_v3/deploy_inception-v3.prototxt", {"data": (1, 3, 107, 107)},
     "kernel_h/kernel_w/pad_h/pad_w convs, AVE pooling with pad"),
    ("fcn_voc-fcn-alexnet/val.prototxt", {"data": (1, 3, 48, 56)},
     "Python data layer, Deconvolution, Crop with offset"),
    ("shufflenet_v2_x0.5/shufflenet_v2_x0.5.prototxt", None,
     "ShuffleChannel, Slice, ConvolutionDepthwise"),
    ("caffe_siamese/mnist_siamese_train_test.prototxt", None,
     "Slice, shared params by name"),
]


@pytest.mark.parametrize("rel,shapes,what", NETS, ids=[n[0].split("/")[0] for n in NETS])
def test_zoo_net_matches_everywhere(rel: str, shapes: dict | None, what: str,
                                    tmp_path: Path) -> None:
    path = ZOO / rel
    if not path.exists():
        pytest.skip(f"{path} is not in ../shared/zoo")
    res = zoo_convert.convert(path, tmp_path, input_shapes=shapes, opencv=HAVE_CV2)
    assert res.status == "ok", (res.status, res.notes[-3:])
    assert res.torch_vs_onnx is not None and res.torch_vs_onnx <= 1e-4
    assert res.compared["torch/onnx"] > 5
    if HAVE_CV2:
        assert res.vs_opencv is not None and res.vs_opencv <= 1e-4, res.notes
        assert res.compared["ours/opencv"] > 5
    name = res.name
    assert (tmp_path / name / "model.onnx").is_file()
    assert (tmp_path / name / "torch" / "model.py").is_file()
    if shapes:
        assert res.inputs == {k: list(v) for k, v in shapes.items()}


def test_pspnet_fork_bn_matches(tmp_path: Path) -> None:
    """PSPNet-50 (60 fork ``BN`` layers, Interp by size and by zoom) through the sweep.

    The pyramid pools conv5_3 (60x60 at 473x473) with kernels 60/30/20/10 and resizes back to
    a fixed 60x60, so no smaller input is valid: the pyramid is scaled to a 6x6 conv5_3
    (kernels 6/3/2/1, Interp to 6x6) and the net run at 41x41. Every other layer is the
    zoo's own.
    """
    import surgery

    path = ZOO / "pspnet50_ade20k" / "pspnet50_ADE20K_473.prototxt"
    if not path.exists():
        pytest.skip(f"{path} is not in ../shared/zoo")
    net = surgery.load(path)
    assert sum(lay.type == "BN" for lay in net.layers) == 60
    for lay in net.layers:
        if lay.type == "Pooling" and lay.bottoms == ["conv5_3"]:
            for key in ("kernel_size", "stride"):
                v = lay.attrs[key]
                lay.attrs[key] = [x // 10 for x in v] if isinstance(v, list) else v // 10
        elif lay.type == "Interp" and "height" in lay.attrs:
            lay.attrs["height"] = lay.attrs["width"] = 6
    small = tmp_path / "pspnet50_small.prototxt"
    surgery.save(net, small)
    res = zoo_convert.convert(small, tmp_path / "out", input_shapes={"data": (1, 3, 41, 41)},
                              opencv=False)
    assert res.status == "ok", (res.status, res.notes[-3:])
    assert res.torch_vs_onnx is not None and res.torch_vs_onnx <= 1e-4
    assert res.compared["torch/onnx"] > 100


def test_random_weights_are_never_all_zero() -> None:
    import numpy as np

    import surgery
    from surgery.dataflow import resolve
    from surgery.net import NetState
    from surgery.shapes import infer

    net = surgery.load(ZOO / "mobilenet_v2" / "mobilenet_v2_deploy.prototxt")
    flow = resolve(net, NetState("TEST"))
    filled = zoo_convert.fill_random(net, flow, infer(flow, {"data": (1, 3, 32, 32)}), 0)
    assert filled
    for lay in net.layers:
        if lay.type == "BatchNorm":
            mean, var, factor = (p.data for p in lay.params)
            assert not mean.any() and (var == 1).all() and factor.tolist() == [1.0]
        elif lay.type in ("Convolution", "Scale"):
            assert all(np.any(p.data != 0) for p in lay.params), lay.name


def test_unsupported_and_skipped_rows(tmp_path: Path) -> None:
    res = zoo_convert.convert(ZOO / "faster_rcnn_zf_voc" / "test.prototxt", tmp_path)
    assert res.status == "unsupported: Python, ROIPooling"
    assert not res.failed
    res = zoo_convert.convert(ZOO / "colorization" / "train_val.prototxt", tmp_path)
    assert res.status.startswith("skip: the TEST net does not resolve")
    table = zoo_convert.table([res])
    assert "colorization/train_val" in table and "1 skip" in table


def test_table_shows_weights_and_a_head_on_random_values(tmp_path: Path) -> None:
    """LeNet with a renamed head (``ip2`` -> ``ip2_new``): the trained caffemodel covers
    conv1, conv2 and ip1, ip2_new gets random values. The row must say so (issue 7 item 14),
    not just "ok"."""
    import shutil

    src = ZOO / "lenet_trained"
    text = (src / "lenet.prototxt").read_text()
    assert '"ip2"' in text
    (tmp_path / "lenet.prototxt").write_text(text.replace('"ip2"', '"ip2_new"'))
    shutil.copy(src / "lenet_iter_10000.caffemodel", tmp_path)
    res = zoo_convert.convert(tmp_path / "lenet.prototxt", tmp_path / "out", opencv=False)
    assert res.status == "ok", (res.status, res.notes[-3:])
    assert res.weights == "lenet_iter_10000.caffemodel + 1 random"
    assert res.random_layers == ["ip2_new"]
    full = zoo_convert.convert(src / "lenet.prototxt", tmp_path / "out2", opencv=False)
    assert full.weights == "lenet_iter_10000.caffemodel" and not full.random_layers
    text = zoo_convert.table([res, full])
    header, row, row_full = text.splitlines()[:3]
    assert "weights" in header.split()
    assert "lenet_iter_10000.caffemodel + 1 random" in row
    assert "lenet_iter_10000.caffemodel " in row_full and "random" not in row_full
    assert "random ip2_new" in text and "1 net(s) compared with a caffemodel plus random" in text
