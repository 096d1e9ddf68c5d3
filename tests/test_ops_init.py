"""surgery init / init_weights and --fill-missing (issue 7 items 3 and 8): random weights from
the net's own fillers, checked by loading them back in surgery and in OpenCV 4.x (an
independent reader of caffemodels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from surgery import caffe_io
from surgery.cli import main
from surgery.errors import NetError
from surgery.ops.init import init_weights, missing_weights

from .conftest import GOLDEN, ZOO, needs
from .test_ops_insert import TINY
from .test_verbs_check import assert_passes_check

GOOGLENET = ZOO / "bvlc_googlenet"


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_init_googlenet_deploy_loads_in_opencv_and_surgery(tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    out = tmp_path / "g.caffemodel"
    rc, text, _ = _run(capsys, "init", GOOGLENET / "deploy.prototxt", "-o", out, "--seed", "5")
    assert rc == 0 and "seed 5" in text and f"wrote {out}" in text
    net = caffe_io.load(GOOGLENET / "deploy.prototxt", out)
    assert missing_weights(net) == []
    for lay in net.layers:
        for p in lay.params[:1]:  # no all-zero weight blob
            assert p.data is not None and np.any(p.data != 0), lay.name
    cv = cv2.dnn.readNetFromCaffe(str(GOOGLENET / "deploy.prototxt"), str(out))
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, 224, 224)).astype(np.float32)
    cv.setInput(x)
    prob = cv.forward()
    assert prob.shape == (1, 1000) and np.isfinite(prob).all()
    assert abs(float(prob.sum()) - 1.0) < 1e-4 and prob.std() > 0
    # OpenCV's blobs are ours
    conv = cv.getParam(cv.getLayerId("conv1/7x7_s2"), 0)
    assert np.array_equal(conv, net.layer("conv1/7x7_s2").params[0].data)


def test_init_seed_and_zero_filler_rule(tmp_path):
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY.replace('weight_filler { type: "xavier" }', "", 1))  # 'a': no filler
    net = caffe_io.load(p)
    a, rep = init_weights(net, seed=1)
    b, _ = init_weights(net, seed=1)
    c, _ = init_weights(net, seed=2)
    assert rep.seed == 1 and rep.data["filled"] == ["a", "b", "m", "c"]
    for name in rep.data["filled"]:
        assert np.array_equal(a.layer(name).params[0].data, b.layer(name).params[0].data)
        assert not np.array_equal(a.layer(name).params[0].data, c.layer(name).params[0].data)
        assert np.any(a.layer(name).params[0].data)
        assert not np.any(a.layer(name).params[1].data)  # bias: constant 0, as written
    assert "weight filler constant 0 replaced by xavier" in rep.changed[0]["what"]
    assert not net.has_weights  # input untouched


def test_init_batchnorm_statistics_are_identity(tmp_path):
    proto = ZOO / "mobilenet_v2" / "mobilenet_v2_deploy.prototxt"
    net = caffe_io.load(proto)
    new, rep = init_weights(net, seed=0)
    caffe_io.save(new, weights=tmp_path / "m.caffemodel")
    cv2 = pytest.importorskip("cv2")
    cv = cv2.dnn.readNetFromCaffe(str(proto), str(tmp_path / "m.caffemodel"))
    cv.setInput(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
    out = cv.forward()
    assert np.isfinite(out).all() and out.std() > 0
    bns = [lay for lay in new.layers if lay.type == "BatchNorm"]
    assert bns and all(lay.name in rep.data["filled"] for lay in bns)
    for lay in bns:
        mean, var, factor = (p.data for p in lay.params)
        assert not mean.any() and (var == 1).all() and factor.tolist() == [1.0]
    assert missing_weights(new) == []


def test_init_keeps_existing_weights_unless_all_layers(tmp_path):
    net = caffe_io.load(GOLDEN / "lenet" / "net.prototxt", GOLDEN / "lenet" / "weights.caffemodel")
    new, rep = init_weights(net)
    assert rep.data["filled"] == [] and "nothing drawn" in rep.notes[0]
    assert all(p.data is q.data for lay, other in zip(net.layers, new.layers, strict=True)
               for p, q in zip(lay.params, other.params, strict=True))


def test_init_without_shapes_is_one_clear_error(tmp_path, capsys):
    p = tmp_path / "noshape.prototxt"
    p.write_text('layer { name: "x" type: "Input" top: "x" }\n'
                 'layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" '
                 "inner_product_param { num_output: 2 } }\n")
    with pytest.raises(NetError, match="init: .*fc"):
        init_weights(caffe_io.load(p))
    rc, _, err = _run(capsys, "init", p, "-o", tmp_path / "w.caffemodel")
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "w.caffemodel").exists()
    rc, _, err = _run(capsys, "init", p, "-o", tmp_path / "w.prototxt")
    assert rc == 2 and "W.caffemodel" in err


# -- --fill-missing ---------------------------------------------------------------------------
@pytest.fixture()
def partial(tmp_path: Path) -> tuple[Path, Path]:
    """TINY with weights for every layer except 'c'."""
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    net, _ = init_weights(caffe_io.load(p), seed=0)
    for par in net.layer("c").params:
        par.data = None
    w = tmp_path / "partial.caffemodel"
    caffe_io.save(net, weights=w)
    return p, w


VERB_ARGS = {
    "rename-heads": ["--num-output", "3", "--layer", "b"],
    "fc-to-conv": [],
    "insert-eltwise": ["--bottoms", "relu_a", "b"],
    "insert-gate": ["--at", "relu_a"],
}


@pytest.mark.parametrize("verb", list(VERB_ARGS))
def test_every_weights_verb_reports_and_fills_missing(verb, partial, tmp_path, capsys):
    proto, weights = partial
    if verb == "fc-to-conv":  # TINY has no InnerProduct: give it one
        text = proto.read_text() + ('layer { name: "ip" type: "InnerProduct" bottom: "s0" '
                                    'top: "ip" inner_product_param { num_output: 2 } }\n')
        proto = tmp_path / "ip.prototxt"
        proto.write_text(text)
        net, _ = init_weights(caffe_io.load(proto, weights), seed=1)
        for par in net.layer("c").params:
            par.data = None
        weights = tmp_path / "ip.caffemodel"
        caffe_io.save(net, weights=weights)
    out, out_w = tmp_path / "o.prototxt", tmp_path / "o.caffemodel"
    base = [verb, proto, "-o", out, "--weights", weights, "--out-weights", out_w,
            *VERB_ARGS[verb]]
    rc, text, _ = _run(capsys, *base, "--json")
    rep = json.loads(text)
    assert rc == 0 and rep["data"]["missing_weights"] == ["c"]
    assert any(e["layer"] == "c" and "no weights in" in e["why"] for e in rep["left"])
    assert not caffe_io.load(out, out_w).layer("c").has_weights
    rc, text, _ = _run(capsys, *base, "--fill-missing", "--in-place", "--seed", "4", "--json")
    rep = json.loads(text)
    assert rc == 0 and rep["data"]["filled_missing"] is True
    assert any(c["layer"] == "c" and c["what"].startswith("--fill-missing") for c in rep["changed"])
    back = caffe_io.load(out, out_w)
    assert back.layer("c").params[0].data.shape == (4, 4, 1, 1)
    assert np.any(back.layer("c").params[0].data)
    src = caffe_io.load(proto, weights)
    assert np.array_equal(back.layer("m").params[0].data, src.layer("m").params[0].data)
    assert_passes_check(out, out_w)


def test_fill_missing_needs_weights(partial, tmp_path, capsys):
    proto, _ = partial
    rc, _, err = _run(capsys, "insert-gate", proto, "-o", tmp_path / "o.prototxt", "--at",
                      "relu_a", "--fill-missing")
    assert rc == 2 and "--fill-missing needs --weights" in err


def test_googlenet_train_val_with_deploy_weights_fill_missing(tmp_path, capsys):
    # issue 7 item 3: the golden GoogLeNet caffemodel is deploy-only, so the aux heads'
    # loss1/conv, loss1/fc, loss2/conv, loss2/fc have no weights; before, the report said
    # "keep their weights" and nothing could fill them
    out, out_w = tmp_path / "g3.prototxt", tmp_path / "g3.caffemodel"
    argv = ["rename-heads", GOOGLENET / "train_val.prototxt", "--num-output", "3", "--weights",
            GOLDEN / "googlenet" / "weights.caffemodel", "-o", out, "--out-weights", out_w]
    rc, text, _ = _run(capsys, *argv)
    aux = ["loss1/conv", "loss1/fc", "loss2/conv", "loss2/fc"]
    assert rc == 0 and f"{len(aux)} learnable layer(s) have no weights" in text
    for name in aux:
        assert f"left     {name}: no weights in" in text
    rc, text, _ = _run(capsys, *argv, "--fill-missing", "--in-place")
    assert rc == 0
    net = caffe_io.load(out, out_w)
    assert missing_weights(net) == []
    assert net.layer("loss1/fc").params[0].data.shape == (1024, 2048)
    assert_passes_check(out, out_w)


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=needs("onnx")),
                                    pytest.param("torch", marks=needs("torch"))])
def test_export_fill_missing(target, partial, tmp_path, capsys):
    # the CLI face of the Python missing='fill': exports draw the layers a caffemodel lacks
    proto, weights = partial
    out = tmp_path / ("m.onnx" if target == "onnx" else "m")
    argv = ["export", target, proto, "--weights", weights, "-o", out]
    if target == "onnx":
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and "'c'" in err and "--fill-missing" in err and not out.exists()
    rc, text, _ = _run(capsys, *argv, "--fill-missing", "--seed", "2", "--json")
    rep = json.loads(text)
    assert rc == 0 and rep["notes"][0].startswith("--fill-missing: 1 layer(s)")
    assert "(seed 2): c" in rep["notes"][0]


DATA_NET = """
layer { name: "data" type: "Data" top: "data" top: "label"
        data_param { source: "nowhere" batch_size: 2 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_input_shape_for_init_and_insert_ops(tmp_path, capsys):
    # a Data layer without crop_size: no verb can tell H and W; --input-shape says them
    p = tmp_path / "d.prototxt"
    p.write_text(DATA_NET)
    w = tmp_path / "w.caffemodel"
    rc, _, err = _run(capsys, "init", p, "-o", w)
    assert rc == 2 and "'conv'" in err and "--input-shape" in err
    rc, _, _ = _run(capsys, "init", p, "-o", w, "--input-shape", "data=2,3,8,8")
    assert rc == 0
    assert caffe_io.load(p, w).layer("fc").params[0].data.shape == (2, 4 * 6 * 6)
    out = tmp_path / "g.prototxt"
    rc, _, err = _run(capsys, "insert-gate", p, "-o", out, "--at", "conv")
    assert rc == 2 and "--input-shape" in err
    rc, _, _ = _run(capsys, "insert-gate", p, "-o", out, "--at", "conv", "--input-shape",
                    "data=2,3,8,8")
    assert rc == 0 and caffe_io.load(out).layer("fc").bottoms == ["conv_gated"]
    rc, _, _ = _run(capsys, "insert-eltwise", out, "-o", out, "--in-place", "--bottoms",
                    "conv_gated", "conv", "--input-shape", "2,3,8,8")
    assert rc == 0 and caffe_io.load(out).layer("fc").bottoms == ["conv_gated_prod"]
