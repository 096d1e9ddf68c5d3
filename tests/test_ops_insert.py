"""insert_eltwise / insert_gate: structure on tiny inline nets, the zoo and models/, and numbers
on the golden nets (OpenCV 4.x as the independent engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from surgery import caffe_io
from surgery.check import check
from surgery.dataflow import resolve
from surgery.errors import LayerNotFoundError, NetError, ShapeMismatchError
from surgery.net import NetState
from surgery.ops import insert_eltwise, insert_gate
from surgery.ops.insert import IDENTITY_SIGMOID_BIAS

from .conftest import GOLDEN, MODELS, ZOO

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "relu_a" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "data" top: "b"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "m" type: "Convolution" bottom: "data" top: "m"
        convolution_param { num_output: 1 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "c" type: "Convolution" bottom: "a" top: "c"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "d" type: "Eltwise" bottom: "a" bottom: "c" top: "d" }
layer { name: "s" type: "Slice" bottom: "d" top: "s0" top: "s1" slice_param { axis: 1 } }
"""


@pytest.fixture()
def tiny(tmp_path: Path):
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    return caffe_io.load(p)


def _wiring(net):
    return [(lay.name, lay.type, list(lay.bottoms), list(lay.tops)) for lay in net.layers]


def _roundtrip(net, tmp_path: Path, weights: bool = False):
    """Save and load back; the result passes check."""
    proto = tmp_path / "out.prototxt"
    model = tmp_path / "out.caffemodel" if weights else None
    caffe_io.save(net, proto, model)
    back = caffe_io.load(proto, model)
    assert [p for p in check(back) if p.severity == "error"] == []
    assert _wiring(back) == _wiring(net)
    return back


# -- insert_eltwise: structure ----------------------------------------------------------------
def test_eltwise_rewires_only_later_readers(tiny, tmp_path):
    before = _wiring(tiny)
    new, rep = insert_eltwise(tiny, ("relu_a", "b"), "sum", coeff=[1, 0.5])
    assert _wiring(tiny) == before  # input untouched
    names = [lay.name for lay in new.layers]
    assert names.index("a_sum") == names.index("b") + 1  # rule 1: after the later producer
    elt = new.layer("a_sum")
    assert elt.bottoms == ["a", "b"] and elt.tops == ["a_sum"]
    assert elt.attrs == {"operation": "SUM", "coeff": [1.0, 0.5]}
    assert new.layer("c").bottoms == ["a_sum"]
    assert new.layer("d").bottoms == ["a_sum", "c"]
    assert rep.data["rewired"] == ["c", "d"]
    assert rep.data["tile"] is None
    _roundtrip(new, tmp_path)


def test_eltwise_keeps_readers_that_feed_b(tiny):
    # B = c reads A: c stays on A (no cycle), d (after the Eltwise) reads the product
    new, rep = insert_eltwise(tiny, ("relu_a", "c"), "prod")
    assert new.layer("c").bottoms == ["a"]
    assert new.layer("d").bottoms == ["a_prod", "c"]
    assert any(e["layer"] == "c" for e in rep.left)


def test_layer_name_means_own_output_before_inplace(tiny):
    # 'a' is conv a's own output; relu_a overwrites it before b exists: b moves up so the
    # product exists before relu_a, and relu_a continues on the product
    new, rep = insert_eltwise(tiny, ("a", "b"))
    assert [lay.name for lay in new.layers][:5] == ["data", "a", "b", "a_prod", "relu_a"]
    assert new.layer("relu_a").bottoms == ["a_prod"] and new.layer("relu_a").tops == ["a_prod"]
    assert rep.data["moved"] == ["b"] and rep.data["rewired"] == ["relu_a", "c", "d"]
    # without rewiring nothing moves, and relu_a overwrites 'a' before b exists: clear error
    with pytest.raises(NetError, match="overwritten in place by layer 'relu_a'.*Name 'relu_a'"):
        insert_eltwise(tiny, ("a", "b"), rewire=False)


def test_cycle_is_an_error(tiny):
    # A = a (before relu_a), B = relu_a's output: relu_a reads A and produces B
    with pytest.raises(NetError, match="cycle"):
        insert_eltwise(tiny, ("a", "relu_a"))


def test_blob_name_means_last_version(tiny):
    # 'd' is also a layer; 's0' is only a blob: its last version, from layer s
    new, _ = insert_eltwise(tiny, ("s0", "s1"), "max")
    assert new.layer("s0_max").bottoms == ["s0", "s1"]
    assert new.layer("s0_max").attrs == {"operation": "MAX"}


def test_layer_top_index(tiny):
    new, _ = insert_eltwise(tiny, ("s:1", "s:0"), "sum")
    assert new.layer("s1_sum").bottoms == ["s1", "s0"]
    with pytest.raises(NetError, match="has 2 top"):
        insert_eltwise(tiny, ("s:0", "s:2"))


def test_one_channel_against_c_gets_a_tile(tiny, tmp_path):
    new, rep = insert_eltwise(tiny, ("relu_a", "m"), "prod")
    tile = new.layer("a_prod_tile")
    assert tile.type == "Tile" and tile.bottoms == ["m"] and tile.attrs == {"axis": 1, "tiles": 4}
    assert new.layer("a_prod").bottoms == ["a", "a_prod_tile"]
    assert rep.data["tile"] == "a_prod_tile"
    assert any("Tile" in c["what"] and "1x4x8x8 x 1x1x8x8" in c["what"] for c in rep.changed)
    _roundtrip(new, tmp_path)
    # the 1-channel bottom first: tiled too, and the product still takes over the readers of
    # the C-channel bottom (issue 7 item 1: the feature map, not the mask)
    new2, rep2 = insert_eltwise(tiny, ("m", "relu_a"))
    assert new2.layer("m_prod").bottoms == ["m_prod_tile", "a"]
    assert new2.layer("c").bottoms == ["m_prod"] and new2.layer("d").bottoms == ["m_prod", "c"]
    assert rep2.data["feature"] == "relu_a" and rep2.data["rewired"] == ["c", "d"]


def test_issue_example_mask_times_features(tmp_path):
    # the 1x1x256x256 x 1x32x256x256 case from the issue
    p = tmp_path / "att.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 256 dim: 256 } } }
layer { name: "feat" type: "Convolution" bottom: "data" top: "feat"
        convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "mask" type: "Convolution" bottom: "data" top: "mask"
        convolution_param { num_output: 1 kernel_size: 3 pad: 1 } }
layer { name: "head" type: "Convolution" bottom: "feat" top: "head"
        convolution_param { num_output: 8 kernel_size: 1 } }
""")
    net = caffe_io.load(p)
    new, rep = insert_eltwise(net, ("feat", "mask"), "prod", name="attended")
    assert rep.data["shapes"]["TEST"] == {"a": [1, 32, 256, 256], "b": [1, 1, 256, 256]}
    assert new.layer("attended_tile").attrs == {"axis": 1, "tiles": 32}
    assert new.layer("head").bottoms == ["attended"]
    _roundtrip(new, tmp_path)


def test_shape_mismatch_shows_both_shapes(tiny):
    with pytest.raises(ShapeMismatchError, match=r"1x4x8x8.*1x3x8x8"):
        insert_eltwise(tiny, ("relu_a", "data"))


def test_bad_arguments(tiny):
    with pytest.raises(NetError, match="coeff is only allowed for operation sum"):
        insert_eltwise(tiny, ("relu_a", "b"), "prod", coeff=[1, 2])
    with pytest.raises(NetError, match="one value per bottom"):
        insert_eltwise(tiny, ("relu_a", "b"), "sum", coeff=[1, 2, 3])
    with pytest.raises(NetError, match="operation must be"):
        insert_eltwise(tiny, ("relu_a", "b"), "div")
    with pytest.raises(LayerNotFoundError, match="did you mean 'relu_a'"):
        insert_eltwise(tiny, ("relu_aa", "b"))
    with pytest.raises(NetError, match="already exists"):
        insert_eltwise(tiny, ("relu_a", "b"), name="c")


def test_eltwise_on_zoo_googlenet_train_val_all_phases(tmp_path):
    net = caffe_io.load(ZOO / "bvlc_googlenet" / "train_val.prototxt")
    new, rep = insert_eltwise(net, ("inception_4a/output", "inception_4b/output"), "sum")
    assert rep.data["phases"] == ["TRAIN", "TEST"]
    for phase in ("TRAIN", "TEST"):
        flow = resolve(new, NetState(phase))
        node = flow.node("inception_4a/output_sum")
        assert [v.producer.layer.name for v in node.inputs] == [
            "inception_4a/output", "inception_4b/output"]
    # the aux head loss1 reads 4a's output before 4b exists: 4b moves up and loss1 reads the
    # sum; 4b's branches feed the other bottom, so they keep reading 4a
    assert new.layer("loss1/ave_pool").bottoms == ["inception_4a/output_sum"]
    assert new.layer("inception_4b/1x1").bottoms == ["inception_4a/output"]
    assert rep.data["rewired"] == ["loss1/ave_pool"] and len(rep.data["moved"]) == 14
    names = [lay.name for lay in new.layers]
    assert names.index("inception_4b/output") < names.index("loss1/ave_pool")
    assert not new.layer("inception_4a/output_sum").include
    _roundtrip(new, tmp_path)


# -- insert_gate: structure -------------------------------------------------------------------
def test_gate_after_own_output_continues_inplace_relu(tiny, tmp_path):
    new, rep = insert_gate(tiny, "a")
    names = [lay.name for lay in new.layers]
    assert names[1:7] == ["a", "a_gate", "a_gate_sigmoid", "a_gate_tile", "a_gated", "relu_a"]
    gate = new.layer("a_gate")
    assert gate.type == "Convolution" and gate.bottoms == ["a"]
    assert gate.attrs["num_output"] == 1 and gate.attrs["kernel_size"] == [1]
    assert gate.attrs["weight_filler"] == {"type": "msra"}
    assert gate.attrs["bias_filler"]["type"] == "constant"
    assert new.layer("a_gate_sigmoid").tops == ["a_gate"]  # in place
    assert new.layer("a_gate_tile").attrs == {"axis": 1, "tiles": 4}
    assert new.layer("a_gated").bottoms == ["a", "a_gate_tile"]
    # relu_a stays in place, on the gated blob; its readers follow
    assert new.layer("relu_a").bottoms == ["a_gated"] and new.layer("relu_a").tops == ["a_gated"]
    assert new.layer("c").bottoms == ["a_gated"]
    assert new.layer("d").bottoms == ["a_gated", "c"]
    assert rep.data["layers"] == ["a_gate", "a_gate_sigmoid", "a_gate_tile", "a_gated"]
    _roundtrip(new, tmp_path)


def test_gate_after_inplace_layer_and_same_channels(tiny):
    new, rep = insert_gate(tiny, "relu_a", channels="same", activation="none", init="identity")
    names = [lay.name for lay in new.layers]
    assert names[1:6] == ["a", "relu_a", "relu_a_gate", "relu_a_gated", "b"]
    gate = new.layer("relu_a_gate")
    assert gate.attrs["num_output"] == 4
    assert gate.attrs["weight_filler"] == {"type": "constant", "value": 0.0}
    assert gate.attrs["bias_filler"] == {"type": "constant", "value": 1.0}
    assert new.layer("relu_a_gated").bottoms == ["a", "relu_a_gate"]
    assert new.layer("c").bottoms == ["relu_a_gated"]
    assert "relu_a_gate_sigmoid" not in names and rep.data["channels"] == 4


def test_gate_on_2d_blob_uses_inner_product(tmp_path):
    net = caffe_io.load(MODELS / "lenet.prototxt")
    new, _ = insert_gate(net, "relu1", channels="same")
    assert new.layer("relu1_gate").type == "InnerProduct"
    assert new.layer("ip2").bottoms == ["relu1_gated"]
    _roundtrip(new, tmp_path)


def test_gate_weights_random_and_identity(tiny, tmp_path):
    rng = np.random.default_rng(0)
    for lay in tiny.layers:
        if lay.type == "Convolution":
            from surgery.net import Param

            c_out, c_in = lay.attrs["num_output"], 4 if lay.name == "c" else 3
            w = rng.normal(size=(c_out, c_in, 1, 1)).astype(np.float32)
            lay.params = [Param(data=w),
                          Param(data=np.zeros(c_out, np.float32))]
    arrays = {lay.name: [p.data for p in lay.params] for lay in tiny.layers}
    new, rep = insert_gate(tiny, "b", seed=7)
    assert rep.seed == 7
    w, b = new.layer("b_gate").blobs
    assert w.shape == (1, 4, 1, 1) and b.shape == (1,) and np.any(w != 0)
    for name, blobs in arrays.items():  # untouched layers: the same array objects
        assert all(x is y for x, y in zip(new.layer(name).blobs, blobs, strict=True))
    again, _ = insert_gate(tiny, "b", seed=7)
    np.testing.assert_array_equal(again.layer("b_gate").blobs[0], w)
    other, _ = insert_gate(tiny, "b", seed=8)
    assert not np.array_equal(other.layer("b_gate").blobs[0], w)
    ident, rep = insert_gate(tiny, "b", init="identity", channels="same")
    w, b = ident.layer("b_gate").blobs
    assert w.shape == (4, 4, 1, 1) and not np.any(w)
    assert np.all(b == np.float32(IDENTITY_SIGMOID_BIAS))
    assert any("saturated" in n for n in rep.notes)
    _roundtrip(ident, tmp_path, weights=True)


def test_identity_gate_branch_is_exactly_one():
    # the channels=1 gate (Tile) cannot run in OpenCV 4.x (its Caffe Tile import needs a
    # `repeats` field Caffe does not have), so check its arithmetic in float32 here, with
    # Caffe's and OpenCV/PyTorch's sigmoid formulas, on extreme finite inputs
    x = np.concatenate([np.random.default_rng(1).normal(0, 1e3, 4096),
                        [0, -0.0, 3e38, -3e38, 1e-45]]).astype(np.float32)
    pre = np.float32(0) * x + np.float32(IDENTITY_SIGMOID_BIAS)
    for gate in (np.float32(1) / (np.float32(1) + np.exp(-pre)),
                 np.float32(0.5) * np.tanh(np.float32(0.5) * pre) + np.float32(0.5)):
        assert gate.dtype == np.float32 and np.all(gate == 1.0)
        np.testing.assert_array_equal(x * np.tile(gate[None], (3, 1)), np.tile(x[None], (3, 1)))


def test_gate_on_train_val_models(tmp_path):
    net = caffe_io.load(MODELS / "tiny_googlenet_train_val.prototxt")
    conv = next(lay.name for lay in net.layers if lay.type == "Convolution")
    new, rep = insert_gate(net, conv)
    assert set(rep.data["phases"]) == {"TRAIN", "TEST"}
    for phase in ("TRAIN", "TEST"):
        flow = resolve(new, NetState(phase))
        assert flow.node(f"{conv}_gated").inputs[0].producer.layer.name == conv
    _roundtrip(new, tmp_path)


def test_gate_errors(tiny):
    with pytest.raises(LayerNotFoundError, match="did you mean"):
        insert_gate(tiny, "relu")
    with pytest.raises(NetError, match="channels must be"):
        insert_gate(tiny, "a", channels=3)
    with pytest.raises(NetError, match="activation"):
        insert_gate(tiny, "a", activation="tanh")
    with pytest.raises(NetError, match="init"):
        insert_gate(tiny, "a", init="zeros")


# -- numbers: golden nets through OpenCV ------------------------------------------------------

def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def _opencv(net, tmp_path: Path, inputs: dict[str, np.ndarray], outputs: list[str]):
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless<5 (the test extra)")
    proto, model = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    caffe_io.save(net, proto, model)
    cv = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    if hasattr(cv, "enableWinograd"):
        cv.enableWinograd(False)
    for name, x in inputs.items():
        cv.setInput(np.ascontiguousarray(x, np.float32), name)
    layer_of = {}
    for lay in net.layers:
        for t in lay.tops:
            layer_of[t] = lay.name
    got = cv.forward([layer_of[o] for o in outputs])
    return dict(zip(outputs, got, strict=True))


GATE_CASES = [
    ("lenet", "conv1"),
    ("lenet", "ip1"),  # 2-D: InnerProduct gate, before relu1
    ("lenet", "relu1"),
    ("squeezenet_v1_1", "fire2/squeeze1x1"),
    ("squeezenet_v1_1", "fire5/concat"),
    ("squeezenet_v1_1", "fire9/relu_expand3x3"),
    ("googlenet", "inception_3b/1x1"),
    ("googlenet", "inception_4c/output"),
]


@pytest.mark.parametrize(("golden", "at"), GATE_CASES)
def test_identity_gate_keeps_golden_outputs(golden, at, tmp_path):
    d = GOLDEN / golden
    meta = json.loads((d / "meta.json").read_text())
    net = caffe_io.load(d / "net.prototxt", d / meta["weights"])
    inputs = dict(np.load(d / "input.npz"))
    want = np.load(d / "outputs.npz")
    # channels='same': OpenCV runs it (no Tile); channels=1 runs through the torch export below
    ident, _ = insert_gate(net, at, channels="same", init="identity")
    got = _opencv(ident, tmp_path, inputs, meta["outputs"])
    for name in meta["outputs"]:
        assert _rel(got[name], want[name]) <= meta["tolerance"], (golden, at, name)
    rand, _ = insert_gate(net, at, channels="same", init="random", seed=3)
    got = _opencv(rand, tmp_path, inputs, meta["outputs"])
    assert max(_rel(got[n], want[n]) for n in meta["outputs"]) > 100 * meta["tolerance"]


def test_identity_gate_channels_1_structure_on_golden(tmp_path):
    d = GOLDEN / "googlenet"
    net = caffe_io.load(d / "net.prototxt", d / "weights.caffemodel")
    new, rep = insert_gate(net, "inception_4c/output", init="identity")
    w, b = new.layer("inception_4c/output_gate").blobs
    assert w.shape == (1, 512, 1, 1) and not np.any(w) and b.tolist() == [40.0]
    assert new.layer("inception_4c/output_gate_tile").attrs == {"axis": 1, "tiles": 512}
    assert new.layer("inception_4c/output_gated").attrs == {"operation": "PROD"}
    back = _roundtrip(new, tmp_path, weights=True)
    np.testing.assert_array_equal(back.layer("inception_4c/output_gate").blobs[1], [40.0])
    for lay in net.layers:  # pretrained layers: the same arrays
        for p, q in zip(lay.params, new.layer(lay.name).params, strict=True):
            assert p.data is q.data


def test_bottoms_in_one_phase_get_an_include_rule(tmp_path):
    p = tmp_path / "ph.prototxt"
    p.write_text("""
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "t" type: "ReLU" bottom: "data" top: "t" include { phase: TEST } }
layer { name: "u" type: "Sigmoid" bottom: "t" top: "u" include { phase: TEST } }
layer { name: "v" type: "TanH" bottom: "data" top: "v" }
layer { name: "w" type: "TanH" bottom: "t" top: "w" include { phase: TEST } }
""")
    new, rep = insert_eltwise(caffe_io.load(p), ("t", "v"))
    elt = new.layer("t_prod")
    assert [r.phase for r in elt.include] == ["TEST"] and rep.data["phases"] == ["TEST"]
    assert new.layer("u").bottoms == ["t_prod"] and new.layer("w").bottoms == ["t_prod"]
    assert rep.data["moved"] == ["v"]
    _roundtrip(new, tmp_path)


TORCH_CASES = [  # (golden, at, also check that a random gate changes the outputs)
    ("lenet", "conv1", True),
    ("lenet", "ip1", True),
    ("squeezenet_v1_1", "fire3/concat", True),
    ("googlenet", "inception_4a/output", False),  # ~4 s a forward pass on 2 CPUs
]


@pytest.mark.parametrize(("golden", "at", "random_too"), TORCH_CASES)
def test_identity_gate_channels_1_through_torch(golden, at, random_too):
    # channels=1 needs Tile, which OpenCV 4.x cannot import from Caffe: the torch exporter runs it
    pytest.importorskip("torch", reason="the torch extra (surgery.export.to_torch)")
    from surgery.export import run_blobs, to_torch

    d = GOLDEN / golden
    meta = json.loads((d / "meta.json").read_text())
    net = caffe_io.load(d / "net.prototxt", d / meta["weights"])
    inputs = dict(np.load(d / "input.npz"))
    want = np.load(d / "outputs.npz")
    shapes = {k: v.shape for k, v in inputs.items()}

    def run(n):
        got = run_blobs(to_torch(n, input_shapes=shapes), inputs)
        return max(_rel(got[o], want[o]) for o in meta["outputs"])

    ident, _ = insert_gate(net, at, init="identity")
    assert ident.layer(f"{at}_gate_tile").type == "Tile"
    assert run(ident) <= meta["tolerance"]
    if random_too:
        rand, _ = insert_gate(net, at, init="random", seed=4)
        assert run(rand) > 100 * meta["tolerance"]


# -- issue 7 item 1: the product feeds the next layer ----------------------------------------
SEED_CASE = """
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "feat" type: "Convolution" bottom: "data" top: "feat"
        convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "relu_feat" type: "ReLU" bottom: "feat" top: "feat" }
layer { name: "next" type: "Convolution" bottom: "feat" top: "next"
        convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "mask" type: "Convolution" bottom: "data" top: "mask"
        convolution_param { num_output: 1 kernel_size: 3 pad: 1 } }
"""


@pytest.fixture()
def seed_case(tmp_path: Path):
    p = tmp_path / "seed.prototxt"
    p.write_text(SEED_CASE)
    return caffe_io.load(p)


def test_seed_case_map_first_feeds_the_next_convolution(seed_case, tmp_path):
    # the 1x1xHxW map named first, the 1x32xHxW map second; the mask is written after the
    # convolution that reads the features: before the fix the Eltwise went last and `next`
    # kept reading the raw features
    new, rep = insert_eltwise(seed_case, ("mask", "relu_feat"), "prod", name="att")
    assert new.layer("next").bottoms == ["att"]
    assert new.layer("att").bottoms == ["att_tile", "feat"]
    names = [lay.name for lay in new.layers]
    assert names.index("mask") < names.index("att") < names.index("next")
    assert rep.data["feature"] == "relu_feat" and rep.data["rewired"] == ["next"]
    assert rep.data["moved"] == ["mask"]
    assert any(c["layer"] == "next" and "reads the product 'att'" in c["what"]
               for c in rep.changed)
    flow = resolve(new, NetState("TEST"))
    assert [v.producer.layer.name for v in flow.node("next").inputs] == ["att"]
    _roundtrip(new, tmp_path)


def test_feed_and_no_rewire(seed_case, tiny):
    new, rep = insert_eltwise(seed_case, ("mask", "relu_feat"), name="att", rewire=False)
    assert new.layer("next").bottoms == ["feat"] and rep.data["rewired"] == []
    assert any("net output" in n for n in rep.notes)
    assert any(k["layer"] == "next" and "--no-rewire" in k["why"] for k in rep.left)
    # --feed: only the named consumers (d reads the product, c keeps a)
    new, rep = insert_eltwise(tiny, ("relu_a", "b"), "sum", feed=["d"])
    assert new.layer("c").bottoms == ["a"] and new.layer("d").bottoms == ["a_sum", "c"]
    assert rep.data["rewired"] == ["d"]
    new, _ = insert_eltwise(tiny, ("relu_a", "b"), "sum", feed="c,d")
    assert new.layer("c").bottoms == ["a_sum"] and new.layer("d").bottoms == ["a_sum", "c"]
    with pytest.raises(NetError, match=r"--feed s: not a reader of 'a'.*c, d"):
        insert_eltwise(tiny, ("relu_a", "b"), feed=["s"])
    with pytest.raises(NetError, match="feeds the other bottom"):
        insert_eltwise(tiny, ("relu_a", "c"), feed=["c"])


@pytest.mark.parametrize("proto", ["deploy.prototxt", "train_val.prototxt"])
def test_hed_side_output_times_features_feeds_pool1(proto, tmp_path):
    # issue 7 item 1: HED, --bottoms relu1_2 score-dsn1 (64 channels x a 1-channel side output
    # written after the whole trunk): score-dsn1 moves up, pool1 reads the product
    net = caffe_io.load(ZOO / "hed" / proto)
    # train_val reads a fork's data layer (ImageLabelmapData, images of any size): its shape
    # is given, else the op refuses (test_hed_train_val_unknown_shapes_refused)
    shapes = {"data": (1, 3, 64, 64)} if proto == "train_val.prototxt" else None
    new, rep = insert_eltwise(net, ("relu1_2", "score-dsn1"), "prod", input_shapes=shapes)
    assert new.layer("pool1").bottoms == ["conv1_2_prod"]
    assert new.layer("score-dsn1").bottoms == ["conv1_2"]
    assert new.layer("conv1_2_prod_tile").attrs == {"axis": 1, "tiles": 64}
    assert new.layer("conv1_2_prod").bottoms == ["conv1_2", "conv1_2_prod_tile"]
    assert rep.data["rewired"] == ["pool1"] and rep.data["moved"] == ["score-dsn1"]
    names = [lay.name for lay in new.layers]
    assert (names.index("relu1_2") < names.index("score-dsn1") < names.index("conv1_2_prod")
            < names.index("pool1"))
    for phase in rep.data["phases"]:
        flow = resolve(new, NetState(phase))
        assert flow.node("pool1").inputs[0].producer.layer.name == "conv1_2_prod"
        assert flow.node("score-dsn1").inputs[0].producer.layer.name == "relu1_2"
        # nothing else changed what it reads (HED repeats layer names: compare as multisets)
        def reads(f):
            return sorted((n.layer.name, tuple((v.producer.layer.name, v.top_index)
                                               for v in n.inputs))
                          for n in f.nodes if n.layer.name != "pool1"
                          and not n.layer.name.startswith("conv1_2_prod"))
        assert reads(flow) == reads(resolve(net, NetState(phase)))
    _roundtrip(new, tmp_path)


def test_gate_gets_customary_bias_multipliers(tiny, tmp_path):
    # issue 7 item 7: a new learnable layer gets weight 1/1, bias lr_mult 2 decay_mult 0
    new, rep = insert_gate(tiny, "relu_a")
    gate = new.layer("relu_a_gate")
    assert [(p.lr_mult, p.decay_mult) for p in gate.params] == [(1.0, 1.0), (2.0, 0.0)]
    assert any("bias lr_mult 2 decay_mult 0" in c["what"] for c in rep.changed)
    back = _roundtrip(new, tmp_path)
    assert [(p.lr_mult, p.decay_mult) for p in back.layer("relu_a_gate").params] == [
        (1.0, 1.0), (2.0, 0.0)]


def test_hed_train_val_unknown_shapes_refused(tmp_path, capsys):
    # HED's train_val reads ImageLabelmapData (a fork type, images of any size): without an
    # input shape the op cannot tell that score-dsn1 (1 channel) needs a Tile against relu1_2
    # (64): it refuses, naming the fix, instead of writing an Eltwise Caffe refuses
    from surgery.cli import main

    proto = ZOO / "hed" / "train_val.prototxt"
    net = caffe_io.load(proto)
    with pytest.raises(ShapeMismatchError, match=r"channel counts \(64 and 1\) may need a "
                       r"Tile.*--input-shape data=N,C,H,W"):
        insert_eltwise(net, ("relu1_2", "score-dsn1"), "prod")
    out = tmp_path / "hed.prototxt"
    argv = ["insert-eltwise", str(proto), "--bottoms", "relu1_2", "score-dsn1", "-o", str(out)]
    assert main(argv) == 2 and not out.exists()
    assert "--input-shape data=N,C,H,W" in capsys.readouterr().err
    # the fix: the data layer's tops take --input-shape (ImageLabelmapData is a data layer)
    assert main([*argv, "--input-shape", "data=1,3,64,64"]) == 0
    written = caffe_io.load(out)
    assert written.layer("conv1_2_prod_tile").attrs == {"axis": 1, "tiles": 64}


def test_unknown_shapes_equal_channels_go_on_unchecked(tmp_path):
    # rule 8: shapes unknown (a Data layer without crop_size), but both bottoms come from
    # convolutions of 4 outputs: no Tile can be needed, so the op goes on and says so
    text = """name: "u"
layer { name: "data" type: "Data" top: "data" data_param { source: "x" batch_size: 2 } }
layer { name: "a" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "ra" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "data" top: "b"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "c" type: "Convolution" bottom: "b" top: "c"
  convolution_param { num_output: 1 kernel_size: 1 } }
layer { name: "n" type: "Pooling" bottom: "a" top: "n" pooling_param { kernel_size: 1 } }
"""
    p = tmp_path / "u.prototxt"
    p.write_text(text)
    net = caffe_io.load(p)
    new, rep = insert_eltwise(net, ("ra", "b"), "sum")
    assert new.layer("n").bottoms == ["a_sum"] and rep.data["tile"] is None
    assert any("shapes unknown" in n for n in rep.notes)
    with pytest.raises(ShapeMismatchError, match=r"\(4 and 1\) may need a Tile"):
        insert_eltwise(net, ("ra", "c"), "prod")
