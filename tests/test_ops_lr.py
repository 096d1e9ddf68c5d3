"""surgery.ops.lr: freeze, unfreeze and set_lr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.caffe_io import load, save
from surgery.check import check
from surgery.errors import LayerNotFoundError, SurgeryError
from surgery.ops import freeze, set_lr, unfreeze
from surgery.ops._common import fill_missing_weights

from .conftest import MODELS, ZOO

GOOGLENET_TV = ZOO / "bvlc_googlenet" / "train_val.prototxt"

INLINE = """
name: "bn"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv"
        param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 2 } }
"""


def errors(net: surgery.Net) -> list[str]:
    return [str(p) for p in check(net) if p.severity == "error"]


@pytest.fixture()
def inline(tmp_path: Path) -> surgery.Net:
    (tmp_path / "bn.prototxt").write_text(INLINE)
    return load(tmp_path / "bn.prototxt")


@pytest.fixture(scope="module")
def googlenet() -> surgery.Net:
    return load(GOOGLENET_TV)


def roundtrip(net: surgery.Net, tmp: Path) -> surgery.Net:
    save(net, tmp / "out.prototxt")
    back = load(tmp / "out.prototxt")
    assert errors(back) == []
    return back


def test_freeze_until_keeps_auxiliary_heads_trainable(
    googlenet: surgery.Net, tmp_path: Path
) -> None:
    out, rep = freeze(googlenet, until="inception_4e/output")
    m = rep.data["multipliers"]
    for name in ("conv1/7x7_s2", "conv2/3x3", "inception_3a/1x1", "inception_4e/pool_proj"):
        assert m[name]["lr_mult"] == [0, 0] and m[name]["decay_mult"] == [0, 0], name
        assert m[name]["frozen"]
    for name in (
        "loss1/conv",
        "loss1/fc",
        "loss1/classifier",
        "loss2/classifier",
        "inception_5a/1x1",
        "loss3/classifier",
    ):
        assert not m[name]["frozen"], name
    assert m["loss3/classifier"]["lr_mult"] == [1, 2]  # as written, untouched
    # every learnable layer is listed
    assert len(m) == 64
    # the input keeps its multipliers
    assert googlenet.layer("conv1/7x7_s2").params[0].lr_mult == 1
    back = roundtrip(out, tmp_path)
    assert [p.lr_mult for p in back.layer("conv1/7x7_s2").params] == [0, 0]


def test_freeze_layers_and_except(googlenet: surgery.Net) -> None:
    out, rep = freeze(googlenet, layers=["inception_3*"], except_=["inception_3b/*"])
    m = rep.data["multipliers"]
    assert m["inception_3a/1x1"]["frozen"] and not m["inception_3b/1x1"]["frozen"]
    assert not m["conv1/7x7_s2"]["frozen"]
    changed = {c["layer"] for c in rep.changed}
    assert changed == {n for n in m if n.startswith("inception_3a/")}


def test_freeze_adds_one_param_per_blob_and_skips_batchnorm(inline: surgery.Net) -> None:
    out, rep = freeze(inline, layers=["*"])
    conv = out.layer("conv")
    assert len(conv.params) == 1  # bias_term: false -> one blob
    assert (conv.params[0].lr_mult, conv.params[0].decay_mult) == (0, 0)
    assert len(out.layer("scale").params) == 2  # scale + bias
    assert len(out.layer("fc").params) == 2
    assert any(e["layer"] == "bn" and "BatchNorm" in e["why"] for e in rep.left)
    assert [p.lr_mult for p in out.layer("bn").params] == [0, 0, 0]
    assert errors(out) == []
    # unfreeze skips BatchNorm too (Caffe requires 0)
    back, rep2 = unfreeze(out, layers=["*"])
    assert [p.lr_mult for p in back.layer("bn").params] == [0, 0, 0]
    assert [(p.lr_mult, p.decay_mult) for p in back.layer("fc").params] == [(1, 1), (1, 1)]
    assert errors(back) == []


def test_weights_are_shared_not_copied() -> None:
    net = load(MODELS / "lenet.prototxt")
    fill_missing_weights(net, np.random.default_rng(0))
    out, _ = freeze(net, until="ip1")
    for a, b in zip(net.layers, out.layers, strict=True):
        for p, q in zip(a.params, b.params, strict=True):
            assert p.data is q.data
    assert [p.lr_mult for p in out.layer("ip2").params] == [1, 2]
    assert [p.lr_mult for p in out.layer("ip1").params] == [0, 0]


def test_unfreeze_keeps_learning_blobs(tmp_path: Path) -> None:
    net = load(MODELS / "lenet.prototxt")
    frozen, _ = freeze(net, layers=["conv1"])
    out, rep = unfreeze(frozen, layers=["conv*"])
    assert [(p.lr_mult, p.decay_mult) for p in out.layer("conv1").params] == [(1, 1), (1, 1)]
    # conv2 was not frozen: its bias keeps lr_mult 2
    assert [p.lr_mult for p in out.layer("conv2").params] == [1, 2]
    assert any(e["layer"] == "conv2" and "already trainable" in e["why"] for e in rep.left)
    roundtrip(out, tmp_path)


def test_shared_params_stay_consistent() -> None:
    net = load(ZOO / "caffe_siamese" / "mnist_siamese_train_test.prototxt")
    out, rep = freeze(net, layers=["conv1"])  # conv1_p shares conv1_w / conv1_b
    assert [p.lr_mult for p in out.layer("conv1_p").params] == [0, 0]
    assert [p.lr_mult for p in out.layer("conv1").params] == [0, 0]
    assert any("shared" in n for n in rep.notes)
    assert any(c["layer"] == "conv1_p" for c in rep.changed)
    assert errors(out) == []


def test_set_lr_pairs_and_single(tmp_path: Path) -> None:
    net = load(MODELS / "tiny_googlenet_train_val.prototxt")
    out, rep = set_lr(net, ["loss*/classifier"], lr_mult=(10, 20), decay_mult=(1, 0))
    for h in ("loss1/classifier", "loss2/classifier", "loss3/classifier"):
        lay = out.layer(h)
        assert [(p.lr_mult, p.decay_mult) for p in lay.params] == [(10, 1), (20, 0)]
        assert rep.data["multipliers"][h]["lr_mult"] == [10, 20]
    out2, _ = set_lr(net, "conv1/3x3_s1", lr_mult=0.5)
    assert [p.lr_mult for p in out2.layer("conv1/3x3_s1").params] == [0.5, 0.5]
    assert [p.decay_mult for p in out2.layer("conv1/3x3_s1").params] == [1, 0]  # as written
    roundtrip(out, tmp_path)


def test_report_is_json_ready(googlenet: surgery.Net) -> None:
    import json

    _, rep = freeze(googlenet, layers=["conv1/*"])
    d = json.loads(json.dumps(rep.as_dict()))
    assert d["op"] == "freeze"
    assert d["data"]["multipliers"]["conv1/7x7_s2"]["lr_mult"] == [0.0, 0.0]


def test_errors() -> None:
    net = load(MODELS / "lenet.prototxt")
    with pytest.raises(SurgeryError, match="say which layers"):
        freeze(net)
    with pytest.raises(LayerNotFoundError, match="did you mean 'ip1'"):
        freeze(net, until="ip_1")
    with pytest.raises(LayerNotFoundError, match="glob 'fc\\*' matches no layer"):
        freeze(net, layers=["fc*"])
    with pytest.raises(LayerNotFoundError, match="--except"):
        freeze(net, layers=["*"], except_=["nope*"])
    with pytest.raises(SurgeryError, match="--lr-mult"):
        set_lr(net, ["ip1"])
    with pytest.raises(SurgeryError, match="non-negative"):
        set_lr(net, ["ip1"], lr_mult=-1)
