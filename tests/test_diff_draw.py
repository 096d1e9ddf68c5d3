"""``surgery diff`` and ``surgery draw``: the changes an op reports are exactly what diff finds,
and draw shows them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.cli import main
from surgery.diff import diff_nets
from surgery.draw import to_dot
from surgery.net import Layer, Net, Param
from surgery.ops import freeze, insert_gate, rename_heads, set_lr

from .conftest import GOLDEN, MODELS, ROOT, ZOO

GOOGLENET_TV = ZOO / "bvlc_googlenet/train_val.prototxt"
LENET = GOLDEN / "lenet"


def _reported_layers(report: surgery.ops.Report) -> set[str]:
    return {c["layer"] for c in report.changed if c.get("layer")}


@pytest.fixture(scope="module")
def lenet() -> Net:
    return surgery.load(LENET / "net.prototxt", LENET / "weights.caffemodel")


def test_identical_nets_are_the_same(lenet: Net) -> None:
    d = diff_nets(lenet, lenet.copy())
    assert d.same and d.text().endswith("same")


def test_diff_of_rename_heads_is_what_the_op_reports() -> None:
    net = surgery.load(GOOGLENET_TV)
    new, report = rename_heads(net, num_output=3, seed=0)
    d = diff_nets(net, new)
    renamed = {(c.name, c.new_name) for c in d.changed if c.renamed}
    assert renamed == {(f"loss{i}/classifier", f"loss{i}/classifier_ft") for i in (1, 2, 3)}
    assert not d.added and not d.removed
    # every layer the op says it changed, and nothing else (old and new names of the heads)
    touched_old = {c.name for c in d.changed}
    assert touched_old == _reported_layers(report) | (
        touched_old - {c.name for c in d.changed if c.renamed}
    )
    assert _reported_layers(report) <= d.layers_touched()
    heads = [c for c in d.changed if c.renamed]
    assert all(
        {"field": "inner_product_param.num_output", "a": 1000, "b": 3}.items()
        <= ch.items()
        for c in heads for ch in c.changes if ch["what"] == "param"
    )


def test_diff_of_freeze_lists_exactly_the_frozen_layers(lenet: Net) -> None:
    new, report = freeze(lenet, layers=["conv*"])
    d = diff_nets(lenet, new)
    assert {c.name for c in d.changed} == _reported_layers(report) == {"conv1", "conv2"}
    kinds = {ch["what"] for c in d.changed for ch in c.changes}
    assert kinds == {"lr_mult", "decay_mult"}
    conv1 = next(c for c in d.changed if c.name == "conv1")
    assert {"field": "blob1.lr_mult", "a": 2.0, "b": 0.0}.items() <= conv1.changes[2].items()


def test_diff_of_insert_gate_lists_new_layers_and_the_rewired_consumer(lenet: Net) -> None:
    new, report = insert_gate(lenet, at="conv1", seed=0)
    d = diff_nets(lenet, new)
    assert {a["name"] for a in d.added} | {c.name for c in d.changed} == _reported_layers(report)
    pool1 = next(c for c in d.changed if c.name == "pool1")
    assert pool1.changes == [
        {"what": "bottoms", "field": "bottoms", "a": ["conv1"], "b": ["conv1_gated"]}
    ]
    # untouched layers share their arrays: no weight rows for them
    assert not any(ch["what"] == "weights" for c in d.changed for ch in c.changes)


def test_weights_relative_change_per_blob(lenet: Net) -> None:
    new = lenet.copy()
    ip = next(lay for lay in new.layers if lay.name == "ip2")
    w = ip.params[0].data
    ip.params[0] = Param(data=np.asarray(w * 1.5, dtype=np.float32))
    d = diff_nets(lenet, new)
    (c,) = d.changed
    (ch,) = c.changes
    assert c.name == "ip2" and ch["field"] == "blob0"
    assert ch["rel"] == pytest.approx(0.5, rel=1e-6)


def test_retyped_and_param_and_field_changes() -> None:
    a = Net("n", [Layer("in", "Input", [], ["data"], attrs={"shape": [{"dim": [1, 3, 8, 8]}]},
                        param_field="input_param"),
                  Layer("r", "ReLU", ["data"], ["y"]),
                  Layer("l", "EuclideanLoss", ["y", "data"], ["loss"])])
    b = a.copy()
    b.layers[1].type = "Sigmoid"
    b.layers[0].attrs = {"shape": [{"dim": [2, 3, 8, 8]}]}
    b.layers[2].extra["loss_weight"] = [0.5]
    b.extra["force_backward"] = True
    d = diff_nets(a, b)
    by = {c.name: c for c in d.changed}
    assert by["r"].changes[0] == {"what": "type", "field": "type", "a": "ReLU", "b": "Sigmoid"}
    assert by["in"].changes[0]["field"] == "input_param.shape"
    assert by["l"].changes == [{"what": "field", "field": "loss_weight", "a": None, "b": [0.5]}]
    assert d.net_fields == [{"what": "field", "field": "force_backward", "a": None, "b": True}]


def test_removed_and_added_layers_are_not_paired_across_types() -> None:
    a = Net("n", [Layer("in", "Input", [], ["data"]), Layer("r", "ReLU", ["data"], ["y"])])
    b = Net("n", [Layer("in", "Input", [], ["data"]), Layer("s", "Sigmoid", ["data"], ["y"])])
    d = diff_nets(a, b)
    assert [x["name"] for x in d.removed] == ["r"] and [x["name"] for x in d.added] == ["s"]


def test_cli_diff_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = str(LENET / "net.prototxt")
    assert main(["diff", net, net]) == 0
    out = tmp_path / "frozen.prototxt"
    assert main(["freeze", net, "--layers", "ip*", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["diff", net, str(out), "--json"]) == 1
    import json

    rep = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in rep["changed"]} == {"ip1", "ip2"} and not rep["same"]
    assert main(["diff", net, str(tmp_path / "missing.prototxt")]) == 2
    assert "missing.prototxt" in capsys.readouterr().err


def test_cli_diff_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net, w = str(LENET / "net.prototxt"), str(LENET / "weights.caffemodel")
    out, out_w = tmp_path / "g.prototxt", tmp_path / "g.caffemodel"
    assert main(["insert-gate", net, "--at", "conv1", "--weights", w, "--out-weights",
                 str(out_w), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["diff", net, str(out), "--weights", w, str(out_w)]) == 1
    text = capsys.readouterr().out
    assert "+ conv1_gate " in text and "weights not compared" not in text
    assert "relative change" not in text  # the old layers' weights were copied unchanged


# -- draw -------------------------------------------------------------------------------------
def _nodes(dot: str) -> dict[str, str]:
    return dict(re.findall(r"^  (n\d+|r\d+) \[(.*)\];$", dot, flags=re.M))


def test_draw_highlights_the_three_googlenet_heads() -> None:
    net = surgery.load(GOOGLENET_TV)
    new, _ = rename_heads(net, num_output=3, seed=0)
    dot = to_dot(new, "TRAIN", diff=diff_nets(net, new))
    nodes = _nodes(dot)
    flow_layers = [lay for lay in new.layers if lay.is_included(surgery.NetState("TRAIN"))]
    assert len(nodes) == len(flow_layers)
    heads = [a for a in nodes.values() if "penwidth=3" in a]
    assert len(heads) == 3
    for i in (1, 2, 3):
        (h,) = [a for a in heads if f"loss{i}/classifier_ft" in a]
        assert f"renamed from loss{i}/classifier" in h and "#FF8C00" in h
        assert "-> 32x3" in h  # output shape: batch 32 from the data layer, 3 classes
    # parameter counts from inferred shapes (no weights loaded): 1024 inputs x 3 + 3
    assert "3,075 params" in next(h for h in heads if "loss3/classifier_ft" in h)


def test_draw_marks_frozen_and_new_and_removed_layers(lenet: Net) -> None:
    frozen, _ = freeze(lenet, layers=["conv1"])
    gated, _ = insert_gate(frozen, at="conv2", seed=0)
    dot = to_dot(gated, diff=diff_nets(lenet, gated))
    nodes = _nodes(dot)
    conv1 = next(a for a in nodes.values() if a.startswith('label="conv1\\n'))
    assert "frozen" in conv1 and "dashed" in conv1
    gate = next(a for a in nodes.values() if a.startswith('label="conv2_gate\\n'))
    assert "[added]" in gate and "#00A000" in gate
    removed = to_dot(lenet, diff=diff_nets(gated, lenet))
    assert sum("[removed]" in a for a in _nodes(removed).values()) == 4


def test_draw_escapes_hostile_layer_names() -> None:
    evil = 'a"b\\c\nd}{ -> x'
    net = Net("n", [Layer("in", "Input", [], ["data"], attrs={"shape": [{"dim": [1, 2, 4, 4]}]},
                          param_field="input_param"),
                    Layer(evil, "ReLU", ["data"], [evil])])
    dot = to_dot(net)
    assert "\n" not in dot.split("n1 [", 1)[1].split("];", 1)[0]
    assert 'a\\"b\\\\c\\\\x0ad' in dot
    if shutil.which("dot"):
        res = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True)
        assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_cli_draw_svg_and_png(tmp_path: Path) -> None:
    net = str(MODELS / "tiny_googlenet_train_val.prototxt")
    svg, png = tmp_path / "n.svg", tmp_path / "n.png"
    assert main(["draw", net, "--phase", "train", "-o", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "loss3/classifier" in svg.read_text()
    assert main(["draw", net, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_draw_without_graphviz_writes_nothing(tmp_path: Path) -> None:
    """SVG without ``dot``: one line naming how to install it, exit 2, nothing written; DOT
    output needs nothing."""
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    net = str(LENET / "net.prototxt")
    res = subprocess.run([sys.executable, "-m", "surgery", "draw", net, "-o",
                          str(tmp_path / "n.svg")], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert res.returncode == 2 and "graphviz" in res.stderr and len(res.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    res = subprocess.run([sys.executable, "-m", "surgery", "draw", net, "-o",
                          str(tmp_path / "n.dot")], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert res.returncode == 0 and (tmp_path / "n.dot").read_text().startswith("digraph")


def test_draw_without_inferable_shapes_still_draws() -> None:
    net = Net("n", [Layer("d", "Data", [], ["data", "label"]),
                    Layer("r", "ReLU", ["data"], ["data"])])
    dot = to_dot(net)
    assert "(Data)" in dot and "(ReLU)" in dot


def test_views_import_no_torch_or_onnx() -> None:
    code = ("import sys, surgery.cli, surgery.cli.views, surgery.diff, surgery.draw; "
            "surgery.cli.build_parser(); "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'cv2') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_set_lr_diff_reports_multipliers_only(lenet: Net) -> None:
    new, report = set_lr(lenet, ["ip2"], lr_mult=(10, 20))
    d = diff_nets(lenet, new)
    assert {c.name for c in d.changed} == _reported_layers(report) == {"ip2"}
