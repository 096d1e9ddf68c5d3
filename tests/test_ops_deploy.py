"""surgery.ops.deploy: to_deploy (train_val -> deploy) and fc_to_conv (fully convolutional)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.caffe_io import load, save
from surgery.check import check
from surgery.errors import LayerNotFoundError, NetError, SurgeryError
from surgery.ops import fc_to_conv, to_deploy
from surgery.ops._common import fill_missing_weights, param_shapes

from .conftest import MODELS, ZOO

GOOGLENET = ZOO / "bvlc_googlenet"
CAFFENET = ZOO / "bvlc_reference_caffenet"
HEADS3 = ["loss1/classifier", "loss2/classifier", "loss3/classifier"]


def errors(net: surgery.Net) -> list[str]:
    return [str(p) for p in check(net) if p.severity == "error"]


def roundtrip(net: surgery.Net, tmp: Path, weights: bool = False) -> surgery.Net:
    w = tmp / "out.caffemodel" if weights else None
    save(net, tmp / "out.prototxt", w)
    back = load(tmp / "out.prototxt", w)
    assert errors(back) == []
    return back


# -- to_deploy ----------------------------------------------------------------------------------
def test_googlenet_train_val_to_deploy_is_the_published_deploy(tmp_path: Path) -> None:
    # issue 7 item 6: the auxiliary heads (loss_weight 0.3) go with the branches that only
    # feed them; the result is the zoo's deploy.prototxt, layer for layer
    tv = load(GOOGLENET / "train_val.prototxt")
    out, rep = to_deploy(tv, input_shape="10,3,224,224")
    zoo = load(GOOGLENET / "deploy.prototxt")
    assert [(lay.name, lay.type, lay.bottoms, lay.tops) for lay in out.layers] == [
        (lay.name, lay.type, lay.bottoms, lay.tops) for lay in zoo.layers]
    def plain(lay):  # the two files write different fillers (xavier std is unused)
        return {k: v for k, v in lay.attrs.items() if not k.endswith("filler")}

    assert [plain(lay) for lay in out.layers] == [plain(lay) for lay in zoo.layers]
    assert rep.data["outputs"] == ["prob"]
    assert rep.data["aux_dropped"] == ["loss1/loss", "loss2/loss"]
    assert any("--keep-aux" in c["what"] and "loss1/ave_pool" in c["what"] for c in rep.changed)
    roundtrip(out, tmp_path)


def test_googlenet_train_val_to_deploy_keep_aux(tmp_path: Path) -> None:
    tv = load(GOOGLENET / "train_val.prototxt")
    out, rep = to_deploy(tv, keep_aux=True)
    first = out.layers[0]
    assert (first.name, first.type, first.tops) == ("data", "Input", ["data"])
    assert first.attrs["shape"][0]["dim"] == [50, 3, 224, 224]  # TEST batch, crop, 3 means
    types = {lay.type for lay in out.layers}
    assert not types & {"Data", "SoftmaxWithLoss", "Accuracy", "Silence"}
    assert all(not lay.include and not lay.exclude for lay in out.layers)
    assert all("label" not in lay.bottoms for lay in out.layers)
    probs = [lay for lay in out.layers if lay.type == "Softmax"]
    assert [(p.name, p.bottoms, p.tops) for p in probs] == [
        (f"{h}/prob", [h], [f"{h}/prob"]) for h in HEADS3
    ]
    assert rep.data["outputs"] == [f"{h}/prob" for h in HEADS3]
    # every layer of the zoo's own deploy.prototxt is there, wired the same way
    zoo = load(GOOGLENET / "deploy.prototxt")
    ours = {lay.name: lay for lay in out.layers}
    for lay in zoo.layers:
        if lay.name in ("data", "prob"):
            continue
        assert (ours[lay.name].type, ours[lay.name].bottoms, ours[lay.name].tops) == (
            lay.type,
            lay.bottoms,
            lay.tops,
        ), lay.name
    extra = set(ours) - {lay.name for lay in zoo.layers}
    assert all(n.startswith(("loss1/", "loss2/", "loss3/classifier/prob")) for n in extra)
    roundtrip(out, tmp_path)


def test_single_head_is_prob_and_input_shape_given(tmp_path: Path) -> None:
    tv = load(CAFFENET / "train_val.prototxt")
    out, rep = to_deploy(tv, input_shape="10,3,227,227")
    assert out.layers[0].attrs["shape"][0]["dim"] == [10, 3, 227, 227]
    prob = out.layer("prob")
    assert (prob.type, prob.bottoms, prob.tops) == ("Softmax", ["fc8"], ["prob"])
    zoo = load(CAFFENET / "deploy.prototxt")
    assert [lay.name for lay in out.layers] == [lay.name for lay in zoo.layers]
    assert [lay.type for lay in out.layers] == [lay.type for lay in zoo.layers]
    roundtrip(out, tmp_path)


def test_input_shape_needed_when_not_determinable() -> None:
    tv = load(CAFFENET / "train_val.prototxt")  # mean_file: channels unknown
    with pytest.raises(SurgeryError, match="--input-shape N,C,H,W"):
        to_deploy(tv)
    with pytest.raises(SurgeryError, match="N,C,H,W"):
        to_deploy(tv, input_shape="10,a,3")


def test_channels_from_loaded_conv_weights_and_weights_kept(tmp_path: Path) -> None:
    tv = load(CAFFENET / "train_val.prototxt")  # mean_file: channels only from conv1's weights
    rng = np.random.default_rng(0)
    blobs = [rng.standard_normal(s).astype(np.float32) for s in ((96, 3, 11, 11), (96,))]
    for lay in tv.layers_named("conv1"):
        for p, b in zip(lay.params, blobs, strict=True):
            p.data = b
    out, _ = to_deploy(tv)
    assert out.layers[0].attrs["shape"][0]["dim"] == [50, 3, 227, 227]
    assert all(p.data is b for p, b in zip(out.layer("conv1").params, blobs, strict=True))
    roundtrip(out, tmp_path, weights=True)


def test_tiny_googlenet_and_label_readers_dropped(tmp_path: Path) -> None:
    text = (
        (MODELS / "tiny_googlenet_train_val.prototxt").read_text()
        + """
layer { name: "label_copy" type: "Power" bottom: "label" top: "label_copy" }
layer { name: "label_sink" type: "Silence" bottom: "label_copy" }
"""
    )
    (tmp_path / "t.prototxt").write_text(text)
    out, rep = to_deploy(load(tmp_path / "t.prototxt"))
    assert out.layers[0].attrs["shape"][0]["dim"] == [10, 3, 32, 32]
    assert not out.layers_named("label_copy") and not out.layers_named("label_sink")
    assert any(c["layer"] == "label_copy" and "training-only" in c["what"] for c in rep.changed)
    assert len([lay for lay in out.layers if lay.type == "Softmax"]) == 1
    out, rep = to_deploy(load(tmp_path / "t.prototxt"), keep_aux=True)
    assert len([lay for lay in out.layers if lay.type == "Softmax"]) == 3
    roundtrip(out, tmp_path)


def test_deploy_of_deploy_is_stable() -> None:
    net = load(GOOGLENET / "deploy.prototxt")
    out, rep = to_deploy(net)
    assert [lay.name for lay in out.layers] == [lay.name for lay in net.layers]


# -- fc_to_conv ---------------------------------------------------------------------------------
def _conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A plain stride-1, no-pad convolution (N,C,H,W) * (O,C,kh,kw) -> (N,O,H',W')."""
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b[None, :, None, None]


@pytest.fixture(scope="module")
def lenet() -> surgery.Net:
    net = load(MODELS / "lenet.prototxt")
    fill_missing_weights(net, np.random.default_rng(4))
    return net


def test_lenet_fc_to_conv_numerically_equal(lenet: surgery.Net, tmp_path: Path) -> None:
    out, rep = fc_to_conv(lenet, ["ip1", "ip2"])
    ip1, ip2 = lenet.layer("ip1"), lenet.layer("ip2")
    c1, c2 = out.layer("ip1-conv"), out.layer("ip2-conv")
    assert c1.type == c2.type == "Convolution"
    assert c1.attrs["kernel_size"] == [4] and c2.attrs["kernel_size"] == [1]
    assert c1.params[0].data.shape == (500, 50, 4, 4)
    assert c2.params[0].data.shape == (10, 500, 1, 1)
    assert c1.params[1].data is ip1.params[1].data  # the bias is the same array
    assert c1.tops == ["ip1-conv"] and out.layer("relu1").tops == ["ip1-conv"]
    assert [p.lr_mult for p in c1.params] == [1, 2]  # param specs carried over
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 50, 4, 4)).astype(np.float32)
    ref1 = x.reshape(2, -1) @ ip1.params[0].data.T + ip1.params[1].data
    got1 = _conv_ref(x, c1.params[0].data, c1.params[1].data)
    assert got1.shape == (2, 500, 1, 1)
    np.testing.assert_allclose(got1[:, :, 0, 0], ref1, rtol=1e-5, atol=1e-5)
    h = np.maximum(ref1, 0)
    ref2 = h @ ip2.params[0].data.T + ip2.params[1].data
    got2 = _conv_ref(np.maximum(got1, 0), c2.params[0].data, c2.params[1].data)
    np.testing.assert_allclose(got2[:, :, 0, 0], ref2, rtol=1e-5, atol=1e-5)
    # on a larger map every position is the InnerProduct of its window
    big = rng.standard_normal((1, 50, 6, 6)).astype(np.float32)
    got = _conv_ref(big, c1.params[0].data, c1.params[1].data)
    assert got.shape == (1, 500, 3, 3)
    win = big[:, :, 1:5, 2:6].reshape(1, -1) @ ip1.params[0].data.T + ip1.params[1].data
    np.testing.assert_allclose(got[:, :, 1, 2], win, rtol=1e-5, atol=1e-5)
    back = roundtrip(out, tmp_path, weights=True)
    assert np.array_equal(back.layer("ip1-conv").params[0].data, c1.params[0].data)


def test_transposed_inner_product(tmp_path: Path) -> None:
    text = """
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 4 transpose: true } }
"""
    (tmp_path / "t.prototxt").write_text(text)
    net = load(tmp_path / "t.prototxt")
    fill_missing_weights(net, np.random.default_rng(1))
    w = net.layer("fc").params[0].data
    assert w.shape == (18, 4)
    out, _ = fc_to_conv(net, suffix="")
    conv = out.layer("fc")
    assert "transpose" not in conv.attrs
    x = np.random.default_rng(2).standard_normal((1, 2, 3, 3)).astype(np.float32)
    ref = x.reshape(1, -1) @ w + net.layer("fc").params[1].data
    got = _conv_ref(x, conv.params[0].data, conv.params[1].data)
    np.testing.assert_allclose(got[:, :, 0, 0], ref, rtol=1e-5, atol=1e-5)


def test_caffenet_matches_net_surgery_full_conv() -> None:
    net = load(CAFFENET / "deploy.prototxt")
    out, rep = fc_to_conv(net, ["fc6", "fc7", "fc8"])
    full = load(ZOO / "caffe_net_surgery" / "bvlc_caffenet_full_conv.prototxt")
    for name in ("fc6-conv", "fc7-conv", "fc8-conv"):
        assert param_shapes(out, name) == param_shapes(full, name), name
        ours, theirs = out.layer(name), full.layer(name)
        assert (ours.type, ours.bottoms, ours.tops) == (theirs.type, theirs.bottoms, theirs.tops)
    assert param_shapes(out, "fc6-conv")[0] == (4096, 256, 6, 6)
    assert out.layer("prob").bottoms == ["fc8-conv"]
    assert [c["kernel"] for c in rep.changed] == [[6, 6], [1, 1], [1, 1]]
    assert errors(out) == []


def test_fc_to_conv_with_weights_shape_view(lenet: surgery.Net) -> None:
    out, _ = fc_to_conv(lenet, "ip1")
    w_new = out.layer("ip1-conv").params[0].data
    assert np.shares_memory(w_new, lenet.layer("ip1").params[0].data)  # a view, no copy
    assert not w_new.flags.writeable
    for a in ("conv1", "conv2", "ip2"):
        assert out.layer(a).params[0].data is lenet.layer(a).params[0].data


def test_fc_to_conv_errors(lenet: surgery.Net) -> None:
    with pytest.raises(NetError, match="not an InnerProduct"):
        fc_to_conv(lenet, ["conv1"])
    with pytest.raises(LayerNotFoundError, match="no layer named 'ip3'.*did you mean"):
        fc_to_conv(lenet, ["ip3"])
    with pytest.raises(LayerNotFoundError, match="matches no layer"):
        fc_to_conv(lenet, ["fc*"])
    with pytest.raises(NetError, match="convert 'ip1' too"):
        fc_to_conv(lenet, ["ip2"])


def test_fc_to_conv_same_outputs_in_opencv(lenet: surgery.Net, tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    out, _ = fc_to_conv(lenet)
    save(lenet, tmp_path / "a.prototxt", tmp_path / "a.caffemodel")
    save(out, tmp_path / "b.prototxt", tmp_path / "b.caffemodel")
    x = np.random.default_rng(3).random((1, 1, 28, 28), dtype=np.float32)
    got = []
    for name in ("a", "b"):
        net = cv2.dnn.readNetFromCaffe(
            str(tmp_path / f"{name}.prototxt"), str(tmp_path / f"{name}.caffemodel")
        )
        net.setInput(x)
        got.append(net.forward().reshape(1, -1))
    np.testing.assert_allclose(got[1], got[0], rtol=1e-5, atol=1e-6)


def test_extra_image_tops_of_a_data_layer_stay_inputs(tmp_path: Path) -> None:
    """FCN's NYUD nets: one Python data layer gives ``color``, ``hha`` and ``label``; the two
    images feed convolutions and must stay inputs, only the label is dropped."""
    text = """
layer { name: "data" type: "Python" top: "color" top: "hha" top: "label"
        python_param { module: "nyud_layers" layer: "NYUDSegDataLayer" } }
layer { name: "c1" type: "Convolution" bottom: "color" top: "c1"
        convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "h1" type: "Convolution" bottom: "hha" top: "h1"
        convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "fused" type: "Eltwise" bottom: "c1" bottom: "h1" top: "fused" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fused" bottom: "label" top: "loss" }
"""
    (tmp_path / "nyud.prototxt").write_text(text)
    out, rep = to_deploy(load(tmp_path / "nyud.prototxt"),
                         {"color": [1, 3, 8, 8], "hha": [1, 3, 8, 8]})
    first = out.layers[0]
    assert (first.type, first.tops) == ("Input", ["color", "hha"])
    assert [d["dim"] for d in first.attrs["shape"]] == [[1, 3, 8, 8], [1, 3, 8, 8]]
    assert [lay.name for lay in out.layers] == ["color", "c1", "h1", "fused", "prob"]
    assert rep.data["inputs"] == {"color": [1, 3, 8, 8], "hha": [1, 3, 8, 8]}
    assert errors(out) == []
    with pytest.raises(SurgeryError, match="hha=N,C,H,W"):
        to_deploy(load(tmp_path / "nyud.prototxt"), {"color": [1, 3, 8, 8]})
