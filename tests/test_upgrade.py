"""Tests for surgery.upgrade: Caffe's legacy net upgrades.

Golden pairs come from BVLC's src/caffe/test/test_upgrade_proto.cpp (extracted into
shared/zoo/legacy_upgrade_tests); which function each pair exercises follows that file:
PaddingLayerUpgradeTest -> UpgradeV0PaddingLayers, NetUpgradeTest.TestAllParams -> UpgradeV0Net,
NetUpgradeTest.{TestSimple,TestImageNet} -> UpgradeV0Net (v0 -> v1) then UpgradeV1Net (v1 -> v2).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from google.protobuf.message import Message

from surgery import upgrade
from surgery._proto import caffe_pb2
from surgery.upgrade import (
    V1_TYPE_TO_V2,
    fold_v0_padding,
    needs_upgrade,
    upgrade_batchnorm,
    upgrade_data_transform,
    upgrade_input,
    upgrade_net,
    upgrade_v0_to_v1,
    upgrade_v1_to_v2,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ZOO = SHARED / "zoo"
GOLDEN = ZOO / "legacy_upgrade_tests"

needs_zoo = pytest.mark.skipif(not ZOO.is_dir(), reason=f"{ZOO} not present")


def _parse(text: str) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    text_format.Parse(text, net)
    return net


def _golden(name: str) -> caffe_pb2.NetParameter:
    return _parse((GOLDEN / f"{name}.prototxt").read_text())


def _copy(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    return out


def _assert_same(actual: Message, expected: Message) -> None:
    if actual == expected:
        return
    diff = difflib.unified_diff(
        text_format.MessageToString(expected).splitlines(),
        text_format.MessageToString(actual).splitlines(),
        "expected",
        "actual",
        lineterm="",
    )
    pytest.fail("messages differ:\n" + "\n".join(diff))


# --------------------------------------------------------------------------- goldens


@needs_zoo
@pytest.mark.parametrize("test", ["TestSimple", "TestImageNet"])
def test_golden_v0_to_v1(test: str) -> None:
    net = _golden(f"NetUpgradeTest.{test}.v0_proto")
    notes = upgrade_v0_to_v1(net, test)
    _assert_same(net, _golden(f"NetUpgradeTest.{test}.expected_v1_proto"))
    assert notes and all(n.startswith("V0 -> V1") for n in notes)


@needs_zoo
@pytest.mark.parametrize("test", ["TestSimple", "TestImageNet"])
def test_golden_v1_to_v2(test: str) -> None:
    net = _golden(f"NetUpgradeTest.{test}.expected_v1_proto")
    notes = upgrade_v1_to_v2(net, test)
    _assert_same(net, _golden(f"NetUpgradeTest.{test}.expected_v2_proto"))
    assert len(notes) == 1 and "blobs_lr/weight_decay -> param" in notes[0]


@needs_zoo
@pytest.mark.parametrize("test", ["TestSimple", "TestImageNet"])
def test_golden_full_upgrade(test: str) -> None:
    net = _golden(f"NetUpgradeTest.{test}.v0_proto")
    notes = upgrade_net(net, test)
    _assert_same(net, _golden(f"NetUpgradeTest.{test}.expected_v2_proto"))
    assert any(n.startswith("V0 -> V1: folded") for n in notes)
    assert any(n.startswith("V1 -> V2") for n in notes)


@needs_zoo
def test_golden_all_params_v0_to_v1() -> None:
    net = _golden("NetUpgradeTest.TestAllParams.input_proto")
    upgrade_v0_to_v1(net, "TestAllParams")
    _assert_same(net, _golden("NetUpgradeTest.TestAllParams.expected_output_proto"))


@needs_zoo
def test_golden_all_params_full_upgrade_makes_input_layer() -> None:
    net = _golden("NetUpgradeTest.TestAllParams.input_proto")
    notes = upgrade_net(net, "TestAllParams")
    assert not net.input and not net.input_dim and not net.layers
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["input_data"])
    assert list(first.input_param.shape[0].dim) == [64, 3, 32, 32]
    assert any("Input layer 'input'" in n for n in notes)
    assert all(layer.type for layer in net.layer)


@needs_zoo
@pytest.mark.parametrize("test", ["TestSimple", "TestImageNet", "TestTwoTops"])
def test_golden_padding_folding(test: str) -> None:
    net = _golden(f"PaddingLayerUpgradeTest.{test}.input_proto")
    notes = fold_v0_padding(net, test)
    expected = _golden(f"PaddingLayerUpgradeTest.{test}.expected_output_proto")
    _assert_same(net, expected)
    assert len(notes) == 1 and notes[0].startswith("V0 -> V1: folded")
    # Caffe's test also checks idempotence.
    assert fold_v0_padding(net, test) == []
    _assert_same(net, expected)


# --------------------------------------------------------------------------- zoo corpus

_LEGACY_TEXT = re.compile(r"^\s*(layers\s*\{|input_dim\s*:)", re.MULTILINE)


def _zoo_nets() -> list[Path]:
    if not ZOO.is_dir():
        return []
    return sorted(
        p
        for p in ZOO.rglob("*.prototxt")
        if GOLDEN not in p.parents and "solver" not in p.name and "labelmap" not in p.name
    )


def _is_legacy(path: Path) -> bool:
    top = path.relative_to(ZOO).parts[0]
    if top.startswith(("legacy_v0_", "legacy_v1_")):
        return True
    return bool(_LEGACY_TEXT.search(path.read_text(errors="replace")))


def _zoo_id(path: Path) -> str:
    return str(path.relative_to(ZOO))


def _parse_zoo(path: Path, legacy: bool) -> caffe_pb2.NetParameter:
    try:
        return _parse(path.read_text(errors="replace"))
    except text_format.ParseError as error:
        message = f"{_zoo_id(path)} does not parse with caffe_pb2 (proto lacks a field?): {error}"
        if legacy:
            pytest.fail(message)
        pytest.skip(message)


def _assert_current(net: caffe_pb2.NetParameter, where: str) -> None:
    assert not net.layers, where
    assert not net.input and not net.input_dim and not net.input_shape, where
    untyped = [layer.name for layer in net.layer if not layer.type]
    assert not untyped, f"{where}: layers without a string type: {untyped}"
    assert not needs_upgrade(net), where


_LEGACY_FILES = [p for p in _zoo_nets() if _is_legacy(p)]
_CURRENT_FILES = [p for p in _zoo_nets() if not _is_legacy(p)]


@needs_zoo
def test_zoo_has_legacy_files() -> None:
    assert len(_LEGACY_FILES) >= 30


@pytest.mark.parametrize("path", _LEGACY_FILES, ids=_zoo_id)
def test_zoo_legacy_upgrades(path: Path) -> None:
    net = _parse_zoo(path, legacy=True)
    assert needs_upgrade(net)
    notes = upgrade_net(net, str(path))
    assert notes
    _assert_current(net, _zoo_id(path))
    # Upgrading twice changes nothing.
    again = _copy(net)
    assert upgrade_net(again, str(path)) == []
    _assert_same(again, net)


@pytest.mark.parametrize("path", _CURRENT_FILES, ids=_zoo_id)
def test_zoo_current_nets(path: Path) -> None:
    net = _parse_zoo(path, legacy=False)
    before = _copy(net)
    legacy = needs_upgrade(net)
    notes = upgrade_net(net, str(path))
    _assert_current(net, _zoo_id(path))
    if not legacy:
        assert notes == []
        _assert_same(net, before)
    else:
        # V2 files only meet the input and BatchNorm upgrades.
        assert notes
        assert all(n.startswith(("input", "BatchNorm")) for n in notes), notes


@needs_zoo
def test_zoo_solver_with_inline_v1_net() -> None:
    path = ZOO / "caffe_mnist" / "lenet_consolidated_solver.prototxt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    solver = caffe_pb2.SolverParameter()
    text_format.Parse(path.read_text(), solver)
    nets = [solver.train_net_param, *solver.test_net_param, solver.net_param]
    upgraded = [n for n in nets if len(n.layers)]
    assert upgraded
    for net in upgraded:
        assert upgrade_net(net, str(path))
        _assert_current(net, str(path))


# --------------------------------------------------------------------------- no-op and mixing

_V2_NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
"""


def test_v2_net_is_a_no_op() -> None:
    net = _parse(_V2_NET)
    before = _copy(net)
    assert not needs_upgrade(net)
    assert upgrade_net(net, "tiny.prototxt") == []
    _assert_same(net, before)
    for step in (
        upgrade_v0_to_v1,
        upgrade_data_transform,
        upgrade_v1_to_v2,
        upgrade_input,
        upgrade_batchnorm,
    ):
        assert step(net, "tiny.prototxt") == []
    _assert_same(net, before)


def test_mixing_layer_and_layers_is_refused() -> None:
    net = _parse(
        """
        layer { name: "a" type: "ReLU" bottom: "x" top: "x" }
        layers { name: "b" type: RELU bottom: "x" top: "x" }
        """
    )
    with pytest.raises(ValueError, match=r"mixed\.prototxt.*mixes 'layer' and 'layers'"):
        upgrade_net(net, "mixed.prototxt")
    for step in (upgrade_v0_to_v1, upgrade_v1_to_v2, upgrade_input):
        with pytest.raises(ValueError, match="mixes 'layer' and 'layers'"):
            step(net, "mixed.prototxt")


# --------------------------------------------------------------------------- V1 -> V2

_V1_NET = """
name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 227 input_dim: 227
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 }
}
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers {
  name: "fc" type: INNER_PRODUCT bottom: "conv1" top: "fc"
  param: "shared_w" blob_share_mode: PERMISSIVE blobs_lr: 0.5
  inner_product_param { num_output: 10 }
  include { phase: TRAIN }
}
layers {
  name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss"
  loss_weight: 0.3
}
"""


def test_v1_blobs_lr_and_weight_decay_become_param() -> None:
    net = _parse(_V1_NET)
    assert needs_upgrade(net)
    notes = upgrade_net(net, "v1.prototxt")
    assert [layer.type for layer in net.layer] == [
        "Input",
        "Convolution",
        "ReLU",
        "InnerProduct",
        "SoftmaxWithLoss",
    ]
    conv = net.layer[1]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert all(p.HasField("lr_mult") and p.HasField("decay_mult") for p in conv.param)
    assert conv.convolution_param.num_output == 96
    assert list(conv.convolution_param.kernel_size) == [11]
    assert not net.layer[2].param
    fc = net.layer[3]
    assert len(fc.param) == 1
    assert fc.param[0].name == "shared_w"
    assert fc.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE
    assert fc.param[0].lr_mult == 0.5 and not fc.param[0].HasField("decay_mult")
    assert fc.include[0].phase == caffe_pb2.TRAIN
    assert list(net.layer[4].loss_weight) == pytest.approx([0.3])
    assert notes[0] == (
        "V1 -> V2: 'layers' converted to 'layer' (4 layers; blobs_lr/weight_decay -> param; "
        "param names/blob_share_mode -> param)"
    )


def test_v1_unknown_type_names_layer_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(upgrade.V1_TYPE_TO_V2, "RELU")
    net = _parse(_V1_NET)
    with pytest.raises(ValueError, match=r"v1\.prototxt: V1 layer 'relu1' has type RELU"):
        upgrade_net(net, "v1.prototxt")


def test_v1_type_table_covers_the_enum() -> None:
    enum_names = set(caffe_pb2.V1LayerParameter.LayerType.keys())
    assert set(V1_TYPE_TO_V2) == enum_names
    assert V1_TYPE_TO_V2["SOFTMAX_LOSS"] == "SoftmaxWithLoss"
    assert V1_TYPE_TO_V2["TANH"] == "TanH"
    assert V1_TYPE_TO_V2["IM2COL"] == "Im2col"


def test_v1_to_v2_keeps_net_fields_and_inputs() -> None:
    net = _parse(_V1_NET + "force_backward: true state { phase: TRAIN }")
    upgrade_v1_to_v2(net, "v1.prototxt")
    assert net.force_backward and net.state.phase == caffe_pb2.TRAIN
    assert list(net.input) == ["data"] and len(net.input_dim) == 4


# --------------------------------------------------------------------------- V0 -> V1

_V0_NET = """
name: "v0"
input: "data"
input_dim: 10 input_dim: 3 input_dim: 32 input_dim: 32
layers {
  layer { name: "pad1" type: "padding" pad: 2 }
  bottom: "data" top: "pad1"
}
layers {
  layer {
    name: "conv1" type: "conv" num_output: 8 kernelsize: 5 stride: 1 group: 1
    blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  }
  bottom: "pad1" top: "conv1"
}
layers {
  layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
  bottom: "conv1" top: "pool1"
}
layers {
  layer { name: "fc" type: "innerproduct" num_output: 10 biasterm: false }
  bottom: "pool1" top: "fc"
}
"""


def test_v0_net_full_upgrade() -> None:
    net = _parse(_V0_NET)
    notes = upgrade_net(net, "v0.prototxt")
    assert notes[0] == ("V0 -> V1: folded 1 padding layer (pad1) into the next convolution/pooling")
    assert [(layer.name, layer.type) for layer in net.layer] == [
        ("input", "Input"),
        ("conv1", "Convolution"),
        ("pool1", "Pooling"),
        ("fc", "InnerProduct"),
    ]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"]
    assert list(conv.convolution_param.pad) == [2]
    assert list(conv.convolution_param.kernel_size) == [5]
    assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert net.layer[3].inner_product_param.bias_term is False
    assert list(net.layer[0].input_param.shape[0].dim) == [10, 3, 32, 32]


def test_v0_padding_into_non_conv_is_an_error() -> None:
    net = _parse(
        """
        input: "data"
        layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "p" }
        layers { layer { name: "relu1" type: "relu" } bottom: "p" top: "r" }
        """
    )
    with pytest.raises(ValueError, match=r"bad\.prototxt: V0 padding layer 'pad1' feeds .*'relu1'"):
        upgrade_net(net, "bad.prototxt")


def test_v0_unknown_bottom_is_an_error() -> None:
    net = _parse('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "c" }')
    with pytest.raises(ValueError, match=r"x\.prototxt: V0 layer 'c' reads bottom 'nowhere'"):
        upgrade_net(net, "x.prototxt")


def test_v0_unknown_type_is_an_error() -> None:
    net = _parse('layers { layer { name: "w" type: "warp" } }')
    with pytest.raises(ValueError, match=r"x\.prototxt: V0 layer 'w' has unknown type 'warp'"):
        upgrade_net(net, "x.prototxt")


def test_v0_field_for_wrong_type_is_an_error() -> None:
    net = _parse('layers { layer { name: "r" type: "relu" num_output: 3 } }')
    with pytest.raises(ValueError, match=r"x\.prototxt: V0 layer 'r' of type 'relu' sets"):
        upgrade_net(net, "x.prototxt")


def test_v0_transform_fields_go_to_transform_param() -> None:
    net = _parse(
        """
        layers { layer { name: "d" type: "data" source: "db" batchsize: 4 scale: 0.5
                         meanfile: "m.binaryproto" cropsize: 7 mirror: true } top: "data" }
        """
    )
    upgrade_net(net, "x.prototxt")
    layer = net.layer[0]
    assert (layer.type, layer.data_param.source, layer.data_param.batch_size) == ("Data", "db", 4)
    tp = layer.transform_param
    assert (tp.scale, tp.mean_file, tp.crop_size, tp.mirror) == (0.5, "m.binaryproto", 7, True)


# --------------------------------------------------------------------------- data transform


def test_data_transform_upgrade() -> None:
    net = _parse(
        """
        layers { name: "d" type: DATA top: "data"
                 data_param { source: "db" scale: 0.25 mean_file: "m" crop_size: 3 mirror: true } }
        layers { name: "i" type: IMAGE_DATA top: "img" image_data_param { source: "l" } }
        """
    )
    notes = upgrade_data_transform(net, "x.prototxt")
    assert notes == [
        "data transformation fields (scale/mean_file/crop_size/mirror) -> transform_param in 'd'"
    ]
    layer = net.layers[0]
    assert text_format.MessageToString(layer.data_param, as_one_line=True) == 'source: "db"'
    tp = layer.transform_param
    assert (tp.scale, tp.mean_file, tp.crop_size, tp.mirror) == (0.25, "m", 3, True)
    assert not net.layers[1].HasField("transform_param")
    assert upgrade_data_transform(net, "x.prototxt") == []


# --------------------------------------------------------------------------- input


def test_input_dim_becomes_first_input_layer() -> None:
    net = _parse(
        """
        input: "data" input_dim: 1 input_dim: 3 input_dim: 227 input_dim: 227
        layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }
        """
    )
    notes = upgrade_input(net, "x.prototxt")
    expected = _parse(
        """
        layer { name: "input" type: "Input" top: "data"
                input_param { shape { dim: 1 dim: 3 dim: 227 dim: 227 } } }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "data" }
        """
    )
    _assert_same(net, expected)
    assert notes == ["input/input_dim -> Input layer 'input' placed first (data 1x3x227x227)"]


def test_input_shape_with_two_inputs() -> None:
    net = _parse(
        """
        input: "data" input_shape { dim: 1 dim: 3 dim: 600 dim: 600 }
        input: "im_info" input_shape { dim: 1 dim: 3 }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }
        """
    )
    notes = upgrade_net(net, "x.prototxt")
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data", "im_info"])
    assert [list(s.dim) for s in first.input_param.shape] == [[1, 3, 600, 600], [1, 3]]
    assert not net.input and not net.input_shape
    assert notes == [
        "input/input_shape -> Input layer 'input' placed first (data 1x3x600x600, im_info 1x3)"
    ]


def test_input_without_shape_is_just_removed() -> None:
    net = _parse('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    notes = upgrade_input(net, "x.caffemodel")
    assert not net.input and len(net.layer) == 1
    assert notes and "without shape removed" in notes[0]


def test_input_dim_count_mismatch_is_an_error() -> None:
    net = _parse('input: "a" input: "b" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8')
    with pytest.raises(ValueError, match=r"x\.prototxt: 2 inputs \(a, b\) need 8 input_dim"):
        upgrade_input(net, "x.prototxt")


# --------------------------------------------------------------------------- BatchNorm


def test_batchnorm_three_params_forced_to_zero() -> None:
    net = _parse(
        """
        layer { name: "bn1" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 0 } param { lr_mult: 1 name: "v" } param { } }
        layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "x" param { lr_mult: 1 } }
        layer { name: "bn3" type: "BatchNorm" bottom: "x" top: "x"
                param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
                param { lr_mult: 0 decay_mult: 0 } }
        """
    )
    assert needs_upgrade(net)
    notes = upgrade_net(net, "x.prototxt")
    bn1, bn2, bn3 = net.layer
    assert [(p.lr_mult, p.decay_mult) for p in bn1.param] == [(0, 0)] * 3
    assert all(p.HasField("lr_mult") and p.HasField("decay_mult") for p in bn1.param)
    assert bn1.param[1].name == "v"
    # Only the three-param form is upgraded (BVLC master); bn2 is for the net check to reject.
    assert [(p.lr_mult, p.HasField("decay_mult")) for p in bn2.param] == [(1, False)]
    assert len(bn3.param) == 3
    assert len(notes) == 1 and notes[0].startswith("BatchNorm 'bn1': param lr_mult")
    assert not needs_upgrade(net)
    assert upgrade_net(net, "x.prototxt") == []


# A V1 net whose TEST data exist only under a stage, as Caffe's mnist_autoencoder.prototxt
# (test-on-train / test-on-test, picked by the solver's test_state): valid for Caffe.
_STAGED_V1 = """name: "staged"
layers { name: "data" type: DATA top: "data" include { phase: TRAIN }
  data_param { source: "train_lmdb" batch_size: 2 backend: LMDB } }
layers { name: "data" type: DATA top: "data" include { phase: TEST stage: "test-on-train" }
  data_param { source: "train_lmdb" batch_size: 2 backend: LMDB } }
layers { name: "data" type: DATA top: "data" include { phase: TEST stage: "test-on-test" }
  data_param { source: "test_lmdb" batch_size: 2 backend: LMDB } }
layers { name: "flat" type: FLATTEN bottom: "%s" top: "flat" }
"""


def test_upgrade_of_a_stage_gated_test_net(tmp_path: Path, capsys) -> None:
    """`surgery upgrade` refused mnist_autoencoder ("unknown bottom blob 'data' in the TEST
    net") once it checked its output: check now instantiates a phase gated by stage rules once
    per stage set, as the solver does; a net broken in those states is still refused."""
    from surgery.check import check, default_states
    from surgery.cli import main
    from surgery.net import NetState

    src = tmp_path / "staged.prototxt"
    src.write_text(_STAGED_V1 % "data")
    out = tmp_path / "v2.prototxt"
    assert main(["upgrade", str(src), "-o", str(out)]) == 0
    import surgery

    net = surgery.load(out)
    assert default_states(net) == (
        NetState("TEST", stages=("test-on-train",)),
        NetState("TEST", stages=("test-on-test",)),
        NetState("TRAIN"),
    )
    assert [p for p in check(net) if p.severity == "error"] == []
    capsys.readouterr()
    assert main(["info", str(out)]) == 0  # info resolves TEST with the first stage set
    assert "TEST net with stage(s) test-on-train" in capsys.readouterr().out
    src.write_text(_STAGED_V1 % "nowhere")
    bad = tmp_path / "bad.prototxt"
    assert main(["upgrade", str(src), "-o", str(bad)]) == 2
    assert "unknown bottom blob 'nowhere'" in capsys.readouterr().err and not bad.exists()
