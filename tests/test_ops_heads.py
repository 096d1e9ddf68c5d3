"""surgery.ops.heads: find_heads and rename_heads on the zoo's GoogLeNet and the bundled nets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.caffe_io import load, save
from surgery.check import check
from surgery.errors import LayerNotFoundError, NetError, SurgeryError
from surgery.ops import find_heads, rename_heads
from surgery.ops._common import fill_missing_weights

from .conftest import GOLDEN, MODELS, ZOO

GOOGLENET = ZOO / "bvlc_googlenet"
HEADS3 = ["loss1/classifier", "loss2/classifier", "loss3/classifier"]


def errors(net: surgery.Net) -> list[str]:
    return [str(p) for p in check(net) if p.severity == "error"]


def with_random_weights(net: surgery.Net, seed: int = 0) -> surgery.Net:
    """A copy of ``net`` with every learnable layer filled from its fillers."""
    out = net.copy()
    fill_missing_weights(out, np.random.default_rng(seed))
    return out


@pytest.fixture(scope="module")
def googlenet_tv() -> surgery.Net:
    return with_random_weights(load(GOOGLENET / "train_val.prototxt"), seed=1)


INLINE_NO_FILLERS = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "score" type: "Convolution" bottom: "conv" top: "score"
        convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 6 weight_filler { type: "constant" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture()
def inline_net(tmp_path: Path) -> surgery.Net:
    p = tmp_path / "tiny.prototxt"
    p.write_text(INLINE_NO_FILLERS)
    return load(p)


# -- find_heads ---------------------------------------------------------------------------------
def test_find_heads_googlenet_train_val_has_three() -> None:
    assert find_heads(load(GOOGLENET / "train_val.prototxt")) == HEADS3


def test_find_heads_googlenet_deploy_has_one() -> None:
    assert find_heads(load(GOOGLENET / "deploy.prototxt")) == ["loss3/classifier"]


@pytest.mark.parametrize(
    ("path", "heads"),
    [
        (MODELS / "lenet.prototxt", ["ip2"]),
        (MODELS / "tiny_googlenet_train_val.prototxt", HEADS3),
        (ZOO / "bvlc_reference_caffenet" / "train_val.prototxt", ["fc8"]),
    ],
)
def test_find_heads_bundled_and_zoo(path: Path, heads: list[str]) -> None:
    assert find_heads(load(path)) == heads


def test_find_heads_net_output_counts(inline_net: surgery.Net) -> None:
    # 'score' is a dangling net output, 'fc' feeds a Softmax; 'conv' passes through learnable ones
    assert find_heads(inline_net) == ["score", "fc"]


# -- rename_heads on GoogLeNet train_val -------------------------------------------------------
def test_googlenet_train_val_seven_classes(googlenet_tv: surgery.Net, tmp_path: Path) -> None:
    src = googlenet_tv
    before = {lay.name: [p.data for p in lay.params] for lay in src.layers}
    order = [lay.name for lay in src.layers]
    out, rep = rename_heads(src, 7)
    new = [h + "_ft" for h in HEADS3]
    assert rep.data["renamed"] == dict(zip(HEADS3, new, strict=True))
    assert rep.seed == surgery.fillers.DEFAULT_SEED
    names = [lay.name for lay in out.layers]
    assert all(h not in names for h in HEADS3) and all(n in names for n in new)
    for lay in out.layers:
        if lay.name in new:
            assert lay.attrs["num_output"] == 7
            assert lay.params[0].data.shape == (7, 1024)
            assert lay.params[1].data.shape == (7,)
            assert np.any(lay.params[0].data != 0)
            assert not lay.params[0].data.flags.writeable
        elif lay.has_weights:  # every other blob: the same array objects
            assert all(p.data is b for p, b in zip(lay.params, before[lay.name], strict=True))
    # only the heads changed, structurally
    changed_layers = {c["layer"] for c in rep.changed}
    assert changed_layers == set(HEADS3)
    # the input is untouched
    assert [lay.name for lay in src.layers] == order
    assert src.layer("loss1/classifier").attrs["num_output"] == 1000
    assert src.layer("loss1/classifier").params[0].data.shape == (1000, 1024)
    # top blobs keep their names; the losses still read them
    assert out.layer("loss1/classifier_ft").tops == ["loss1/classifier"]
    # saved and loaded back: valid, same weights
    save(out, tmp_path / "ft.prototxt", tmp_path / "ft.caffemodel")
    back = load(tmp_path / "ft.prototxt", tmp_path / "ft.caffemodel")
    assert errors(back) == []
    for lay in back.layers:
        ref = out.layers_named(lay.name)[0]
        for p, q in zip(lay.params, ref.params, strict=True):
            if q.data is not None:
                assert np.array_equal(p.data, q.data)


def test_googlenet_train_val_no_weights_writes_fillers_and_lr() -> None:
    out, rep = rename_heads(load(GOOGLENET / "train_val.prototxt"), 7, lr_mult=(10, 20))
    for h in HEADS3:
        lay = out.layer(h + "_ft")
        assert lay.attrs["num_output"] == 7
        assert [p.lr_mult for p in lay.params] == [10, 20]
        assert [p.decay_mult for p in lay.params] == [1, 0]  # as written in the zoo file
        assert not lay.has_weights
    assert rep.seed is None  # nothing drawn
    assert errors(out) == []


def test_googlenet_deploy_with_golden_weights(tmp_path: Path) -> None:
    net = load(GOOGLENET / "deploy.prototxt", GOLDEN / "googlenet" / "weights.caffemodel")
    out, rep = rename_heads(net, 7, seed=3)
    assert rep.data["heads"] == ["loss3/classifier"]
    head = out.layer("loss3/classifier_ft")
    assert head.params[0].data.shape == (7, 1024)
    for a, b in zip(net.layers, out.layers, strict=True):
        if a.name != "loss3/classifier":
            assert all(p.data is q.data for p, q in zip(a.params, b.params, strict=True))
    save(out, tmp_path / "d.prototxt", tmp_path / "d.caffemodel")
    back = load(tmp_path / "d.prototxt", tmp_path / "d.caffemodel")
    assert errors(back) == []
    assert np.array_equal(back.layer("loss3/classifier_ft").params[0].data, head.params[0].data)


def test_seeded_and_reproducible() -> None:
    net = with_random_weights(load(MODELS / "lenet.prototxt"))
    a, _ = rename_heads(net, 3, seed=5)
    b, _ = rename_heads(net, 3, seed=5)
    c, _ = rename_heads(net, 3, rng=np.random.default_rng(6))
    wa, wb, wc = (n.layer("ip2_ft").params[0].data for n in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)
    assert wa.shape == (3, 500)


def test_twins_renamed_together_and_share_new_blobs(tmp_path: Path) -> None:
    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" include { phase: TRAIN }
        inner_product_param { num_output: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" include { phase: TEST }
        inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
    (tmp_path / "t.prototxt").write_text(text)
    net = with_random_weights(load(tmp_path / "t.prototxt"))
    out, _ = rename_heads(net, 2)
    twins = out.layers_named("fc_ft")
    assert len(twins) == 2 and not out.layers_named("fc")
    assert twins[0].params[0].data is twins[1].params[0].data
    assert twins[0].params[0].data.shape == (2, 4)


def test_fillers_added_when_missing(inline_net: surgery.Net) -> None:
    out, rep = rename_heads(inline_net, 9)
    conv, fc = out.layer("score_ft"), out.layer("fc_ft")
    assert conv.attrs["weight_filler"] == {"type": "xavier"}
    assert conv.attrs["bias_filler"] == {"type": "constant", "value": 0.0}
    # an explicit all-zero constant filler would stop learning: replaced, and said so
    assert fc.attrs["weight_filler"] == {"type": "gaussian", "std": 0.01}
    assert any("replaced an all-zero" in c["what"] for c in rep.changed)


def test_rename_tops_follows_readers(tmp_path: Path) -> None:
    net = load(MODELS / "tiny_googlenet_train_val.prototxt")
    out, rep = rename_heads(net, 4, rename_tops=True)
    for h in HEADS3:
        assert out.layer(h + "_ft").tops == [h + "_ft"]
        readers = [lay for lay in out.layers if h + "_ft" in lay.bottoms]
        assert len(readers) >= 2  # the loss and the accuracy
        assert not [lay for lay in out.layers if h in lay.bottoms]
    assert errors(out) == []


def test_explicit_layers_and_rename_map() -> None:
    net = load(MODELS / "tiny_googlenet_train_val.prototxt")
    out, rep = rename_heads(net, 4, layers=["loss3/*"])
    assert rep.data["renamed"] == {"loss3/classifier": "loss3/classifier_ft"}
    assert out.layer("loss1/classifier").attrs["num_output"] == 10
    out, rep = rename_heads(net, 4, rename={"loss3/classifier": "new_head"})
    assert out.layer("new_head").attrs["num_output"] == 4
    assert rep.data["heads"] == ["loss3/classifier"]


@pytest.mark.parametrize("bad", [0, -3, "abc", 2.5, True])
def test_bad_num_output(bad: object) -> None:
    with pytest.raises(SurgeryError, match="num_output"):
        rename_heads(load(MODELS / "lenet.prototxt"), bad)  # type: ignore[arg-type]


def test_missing_layer_did_you_mean() -> None:
    with pytest.raises(LayerNotFoundError, match=r"did you mean 'ip2'"):
        rename_heads(load(MODELS / "lenet.prototxt"), 3, layers=["ip3"])


def test_glob_matching_nothing() -> None:
    with pytest.raises(LayerNotFoundError, match="'fc\\*' matches no InnerProduct or Conv"):
        rename_heads(load(MODELS / "lenet.prototxt"), 3, layers=["fc*"])


def test_not_a_head_type() -> None:
    with pytest.raises(NetError, match="not a head"):
        rename_heads(load(MODELS / "lenet.prototxt"), 3, layers=["relu1"])


def test_new_name_taken() -> None:
    with pytest.raises(NetError, match="already exists"):
        rename_heads(load(MODELS / "lenet.prototxt"), 3, rename={"ip2": "ip1"})


def test_empty_suffix_refused() -> None:
    with pytest.raises(SurgeryError, match="keep its name"):
        rename_heads(load(MODELS / "lenet.prototxt"), 3, suffix="")


_UNKNOWN_SHAPE_HEAD = """
name: "py_head"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "py" type: "Python" bottom: "data" top: "feat"
        python_param { module: "m" layer: "L" } }
layer { name: "fc" type: "InnerProduct" bottom: "feat" top: "out"
        param { lr_mult: 1 } param { lr_mult: 2 } inner_product_param { num_output: 4 } }
"""


def test_fill_refuses_a_layer_whose_input_shape_is_unknown(tmp_path: Path) -> None:
    # Regression: param_shapes returned [] (no blobs) for a layer whose bottoms' shapes are
    # unknown, so filling it silently dropped its param { } specs and gave it no weights.
    proto = tmp_path / "net.prototxt"
    proto.write_text(_UNKNOWN_SHAPE_HEAD)
    net = load(proto)
    with pytest.raises(NetError, match="cannot infer its learnable blob shapes"):
        fill_missing_weights(net, np.random.default_rng(0))
    assert [p.lr_mult for p in net.layer("fc").params] == [1, 2]


# -- issue 7 items 2 and 7 ------------------------------------------------------------------------
def test_top_k_above_the_class_count_is_lowered_and_reported() -> None:
    net = load(GOOGLENET / "train_val.prototxt")
    new, rep = rename_heads(net, 3)
    for i in (1, 2, 3):
        assert new.layer(f"loss{i}/top-5").attrs["top_k"] == 3
        assert new.layer(f"loss{i}/top-1").attrs.get("top_k", 1) == 1
    lowered = [c for c in rep.changed if "top_k 5 -> 3" in c["what"]]
    assert [c["layer"] for c in lowered] == ["loss1/top-5", "loss2/top-5", "loss3/top-5"]
    new5, rep5 = rename_heads(net, 5)  # top_k 5 with 5 classes is fine: left as written
    assert new5.layer("loss3/top-5").attrs["top_k"] == 5
    assert not any("top_k" in c["what"] for c in rep5.changed)


def test_new_head_without_param_spec_gets_customary_multipliers(inline_net) -> None:
    new, rep = rename_heads(inline_net, 3, layers=["fc"])
    fc = new.layer("fc_ft")
    assert [(p.lr_mult, p.decay_mult) for p in fc.params] == [(1.0, 1.0), (2.0, 0.0)]
    assert "bias lr_mult 2 decay_mult 0" in rep.changed[0]["what"]
    new, _ = rename_heads(inline_net, 3, layers=["fc"], lr_mult=(10, 20))
    assert [(p.lr_mult, p.decay_mult) for p in new.layer("fc_ft").params] == [
        (10.0, 1.0), (20.0, 0.0)]
    # a head that writes its own param entries keeps them (GoogLeNet's heads: 1/1, 2/0 already)
    g, rep = rename_heads(load(GOOGLENET / "train_val.prototxt"), 3)
    assert not any("customary" in c["what"] for c in rep.changed)
