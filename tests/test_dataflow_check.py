"""Caffe's Net::Init rules (phase filtering, in-place, producers) and check()'s findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery import caffe_io
from surgery.check import assert_valid, check
from surgery.dataflow import implicit_splits, resolve
from surgery.errors import NetError
from surgery.net import NetState, Rule

HEAD = (
    'layer { name: "in" type: "Input" top: "x" '
    "input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n"
)


def _net(tmp_path: Path, body: str, head: str = HEAD):
    p = tmp_path / "n.prototxt"
    p.write_text(head + body)
    return caffe_io.load(p)


@pytest.mark.parametrize(
    ("rule", "state", "included"),
    [
        (Rule(phase="TRAIN"), NetState("TRAIN"), True),
        (Rule(phase="TRAIN"), NetState("TEST"), False),
        (Rule(min_level=1), NetState("TEST", level=0), False),
        (Rule(min_level=1), NetState("TEST", level=1), True),
        (Rule(max_level=0), NetState("TEST", level=1), False),
        (Rule(stage=["deploy"]), NetState("TEST"), False),
        (Rule(stage=["deploy"]), NetState("TEST", stages=("deploy",)), True),
        (Rule(stage=["a", "b"]), NetState("TEST", stages=("a",)), False),
        (Rule(not_stage=["deploy"]), NetState("TEST", stages=("deploy",)), False),
        (Rule(not_stage=["deploy"]), NetState("TEST"), True),
    ],
)
def test_state_rules(rule: Rule, state: NetState, included: bool) -> None:
    assert rule.matches(state) is included


def test_include_exclude_filtering(tmp_path: Path) -> None:
    net = _net(
        tmp_path,
        'layer { name: "a" type: "ReLU" bottom: "x" top: "a" include { phase: TRAIN } }\n'
        'layer { name: "a" type: "Sigmoid" bottom: "x" top: "a" include { phase: TEST } }\n'
        'layer { name: "b" type: "TanH" bottom: "a" top: "b" exclude { phase: TEST } }\n'
        'layer { name: "c" type: "AbsVal" bottom: "a" top: "c" '
        'include { phase: TEST stage: "s" } }\n',
    )
    train = [n.layer.type for n in resolve(net, NetState("TRAIN"))]
    test = [n.layer.type for n in resolve(net, NetState("TEST"))]
    staged = [n.layer.type for n in resolve(net, NetState("TEST", stages=("s",)))]
    assert train == ["Input", "ReLU", "TanH"]
    assert test == ["Input", "Sigmoid"]
    assert staged == ["Input", "Sigmoid", "AbsVal"]


def test_inplace_chain_versions_and_outputs(tmp_path: Path) -> None:
    net = _net(
        tmp_path,
        'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" '
        "convolution_param { num_output: 4 kernel_size: 1 } }\n"
        'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }\n'
        'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }\n'
        'layer { name: "p" type: "Pooling" bottom: "c" top: "p" '
        "pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n",
    )
    flow = resolve(net)
    conv, bn, relu, pool = flow.nodes[1:]
    assert [v.version for v in (conv.outputs[0], bn.outputs[0], relu.outputs[0])] == [0, 1, 2]
    assert bn.inplace == [True] and conv.inplace == [False]
    assert pool.inputs[0] is relu.outputs[0]  # a bottom reads the most recent producer
    assert flow.latest("c") is relu.outputs[0]
    assert [v.name for v in flow.outputs] == ["p"]
    assert [n.layer.name for n in flow.ancestors(pool)] == ["in", "conv", "bn", "relu", "p"]


def test_top_produced_twice_is_refused(tmp_path: Path) -> None:
    net = _net(
        tmp_path,
        'layer { name: "a" type: "ReLU" bottom: "x" top: "y" }\n'
        'layer { name: "b" type: "ReLU" bottom: "x" top: "y" }\n',
    )
    with pytest.raises(NetError, match="produced by multiple sources"):
        resolve(net)
    assert any("multiple sources" in p.message for p in check(net))


def test_inplace_needs_the_same_index(tmp_path: Path) -> None:
    """Caffe's AppendTop: a top is in-place only when it equals the bottom at its index."""
    net = _net(
        tmp_path,
        'layer { name: "s" type: "Slice" bottom: "x" top: "y" top: "z" }\n'
        'layer { name: "e" type: "Eltwise" bottom: "y" bottom: "z" top: "z" }\n',
    )
    with pytest.raises(NetError, match="multiple sources"):
        resolve(net)


def test_unknown_bottom_with_suggestion(tmp_path: Path) -> None:
    net = _net(tmp_path, 'layer { name: "a" type: "ReLU" bottom: "xx" top: "y" }\n')
    with pytest.raises(NetError, match=r"unknown bottom blob 'xx'.*did you mean 'x'"):
        resolve(net)


def test_check_finds_what_caffe_refuses(tmp_path: Path) -> None:
    net = _net(
        tmp_path,
        'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" '
        "param { lr_mult: 1 } param { lr_mult: 2 } param { lr_mult: 3 } "
        "convolution_param { num_output: 4 kernel_size: 1 } }\n"
        'layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" param { lr_mult: 1 } }\n'
        'layer { name: "r" type: "ReLU" bottom: "c" top: "r" include { phase: TEST } '
        "exclude { phase: TRAIN } }\n",
    )
    msgs = [str(p) for p in check(net)]
    assert any("include and exclude" in m for m in msgs)
    with pytest.raises(NetError):
        assert_valid(net)
    net.layers.pop()  # without the include+exclude layer, the other findings show
    msgs = [str(p) for p in check(net)]
    assert any("BatchNorm param 0 has lr_mult 1" in m for m in msgs)
    assert any("3 param entries but Convolution has 2 learnable blob(s)" in m for m in msgs)


def test_valid_nets_have_no_problems() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in ("lenet.prototxt", "tiny_googlenet_train_val.prototxt"):
        assert check(caffe_io.load(root / "models" / name)) == []


def test_implicit_splits_are_named_as_caffe_names_them(tmp_path: Path) -> None:
    net = _net(
        tmp_path,
        'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" '
        "convolution_param { num_output: 4 kernel_size: 1 } }\n"
        'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }\n'
        'layer { name: "a" type: "Sigmoid" bottom: "c" top: "a" }\n'
        'layer { name: "b" type: "TanH" bottom: "c" top: "b" }\n',
    )
    (split,) = implicit_splits(resolve(net))
    assert split.name == "c_relu_0_split"
    assert split.tops == ("c_relu_0_split_0", "c_relu_0_split_1")
