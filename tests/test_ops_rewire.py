"""surgery.ops.rewire: take over consumers through in-place chains, hoist layers, and detect
edges that changed."""

from __future__ import annotations

from surgery.dataflow import resolve
from surgery.net import Layer, Net, NetState
from surgery.ops import rewire


def _net() -> Net:
    return Net("n", [
        Layer("data", "Input", [], ["data"]),
        Layer("a", "Convolution", ["data"], ["a"]),
        Layer("relu", "ReLU", ["a"], ["a"]),  # in place: continues a
        Layer("c", "Pooling", ["a"], ["c"]),
        Layer("d", "Eltwise", ["a", "c"], ["d"]),
        Layer("late", "Convolution", ["data"], ["late"]),
    ])


def test_takeover_follows_inplace_chains():
    net = _net()
    flow = resolve(net, NetState("TEST"))
    a = flow.node("a").outputs[0]
    edits = rewire.takeover(flow, flow.consumers(a), "p")  # relu reads a in place
    done = rewire.apply_edits(net, edits)
    assert net.layer("relu").bottoms == ["p"] and net.layer("relu").tops == ["p"]
    assert net.layer("c").bottoms == ["p"] and net.layer("d").bottoms == ["p", "c"]
    assert [d["layer"] for d in done] == ["relu", "relu", "c", "d"]
    assert done[0]["what"] == "bottom 0: 'a' -> 'p'"


def test_takeover_of_one_reader_only():
    net = _net()
    flow = resolve(net, NetState("TEST"))
    relu_out = flow.node("relu").outputs[0]
    d = [(n, bi) for n, bi in flow.consumers(relu_out) if n.layer.name == "d"]
    rewire.apply_edits(net, rewire.takeover(flow, d, "p"))
    assert net.layer("c").bottoms == ["a"] and net.layer("d").bottoms == ["p", "c"]


def test_hoist_keeps_order_and_edges():
    net = _net()
    before = rewire.edges(resolve(net, NetState("TEST")))
    late, c = net.layer("late"), net.layer("c")
    rewire.hoist(net, [late], c)
    assert [lay.name for lay in net.layers] == ["data", "a", "relu", "late", "c", "d"]
    assert rewire.changed_edges(before, rewire.edges(resolve(net, NetState("TEST")))) == []


def test_changed_edges_sees_a_move_that_changes_what_a_layer_reads():
    net = _net()
    before = rewire.edges(resolve(net, NetState("TEST")))
    c = net.layer("c")
    rewire.hoist(net, [c], net.layer("relu"))  # c now reads a before the ReLU
    bad = rewire.changed_edges(before, rewire.edges(resolve(net, NetState("TEST"))))
    assert bad == [(id(c), 0)]
    assert rewire.changed_edges(before, rewire.edges(resolve(net, NetState("TEST"))),
                                allowed=[(id(c), 0)]) == []
