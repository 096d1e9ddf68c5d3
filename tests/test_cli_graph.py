"""The insert-eltwise, insert-gate and transplant verbs through ``surgery.cli.main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from surgery import caffe_io
from surgery.check import check
from surgery.cli import main

from .conftest import GOLDEN, MODELS, ROOT, ZOO
from .test_ops_insert import TINY

LENET_W = GOLDEN / "lenet" / "weights.caffemodel"


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    return p


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _valid(proto: Path, weights: Path | None = None):
    net = caffe_io.load(proto, weights)
    assert [p for p in check(net) if p.severity == "error"] == []
    return net


def _one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("surgery ")
    for w in words:
        assert w in err, err


# -- insert-eltwise ---------------------------------------------------------------------------
def test_insert_eltwise(tiny, tmp_path, capsys):
    out = tmp_path / "out.prototxt"
    rc, text, _ = _run(capsys, "insert-eltwise", tiny, "-o", out, "--bottoms", "relu_a", "m",
                       "--name", "att")
    assert rc == 0 and "new Tile on 'm'" in text and f"wrote {out}" in text
    net = _valid(out)
    assert net.layer("att").bottoms == ["a", "att_tile"] and net.layer("c").bottoms == ["att"]
    rc, text, _ = _run(capsys, "insert-eltwise", tiny, "-o", out, "--bottoms", "relu_a", "b",
                       "--operation", "sum", "--coeff", "1,-1", "--json", "--in-place")
    rep = json.loads(text)
    assert rep["op"] == "insert_eltwise" and rep["data"]["rewired"] == ["c", "d"]
    assert _valid(out).layer("a_sum").attrs == {"operation": "SUM", "coeff": [1.0, -1.0]}


@pytest.mark.parametrize(
    ("bottoms", "extra", "words"),
    [
        (("relu_aa", "b"), (), ("no layer or blob named 'relu_aa'", "did you mean 'relu_a'")),
        (("relu_a", "data"), (), ("1x4x8x8", "1x3x8x8", "different shapes")),
        (("a", "relu_a"), (), ("cycle", "relu_a")),
        (("relu_a", "b"), ("--coeff", "1,2"), ("coeff is only allowed",)),
        (("relu_a", "b"), ("--coeff", "x"), ("--coeff must be",)),
    ],
)
def test_insert_eltwise_errors(tiny, tmp_path, capsys, bottoms, extra, words):
    out = tmp_path / "out.prototxt"
    rc, _, err = _run(capsys, "insert-eltwise", tiny, "-o", out, "--bottoms", *bottoms, *extra)
    _one_line_error(rc, err, *words)
    assert not out.exists()


def test_never_overwrites_the_input(tiny, capsys):
    before = tiny.read_text()
    rc, _, err = _run(capsys, "insert-eltwise", tiny, "-o", tiny, "--bottoms", "relu_a", "b")
    _one_line_error(rc, err, "would overwrite the input", "--in-place")
    assert tiny.read_text() == before


# -- insert-gate ------------------------------------------------------------------------------
def test_insert_gate_with_weights(tmp_path, capsys):
    out, out_w = tmp_path / "g.prototxt", tmp_path / "g.caffemodel"
    proto = GOLDEN / "lenet" / "net.prototxt"
    rc, text, _ = _run(capsys, "insert-gate", proto, "-o", out, "--at", "conv2",
                       "--weights", LENET_W, "--out-weights", out_w, "--seed", "11", "--json")
    assert rc == 0
    rep = json.loads(text)
    assert rep["seed"] == 11 and rep["data"]["layers"] == [
        "conv2_gate", "conv2_gate_sigmoid", "conv2_gate_tile", "conv2_gated"]
    net = _valid(out, out_w)
    src = caffe_io.load(proto, LENET_W)
    for lay in src.layers:
        for a, b in zip(lay.blobs, net.layer(lay.name).blobs, strict=True):
            np.testing.assert_array_equal(a, b)
    assert net.layer("conv2_gate").blobs[0].shape == (1, 50, 1, 1)
    assert net.layer("pool2").bottoms == ["conv2_gated"]


def test_insert_gate_identity_prototxt_only(tmp_path, capsys):
    out = tmp_path / "g.prototxt"
    rc, text, _ = _run(capsys, "insert-gate", MODELS / "lenet.prototxt", "-o", out, "--at",
                       "relu1", "--channels", "same", "--activation", "none", "--init",
                       "identity")
    assert rc == 0 and "identity gate" in text
    gate = _valid(out).layer("relu1_gate")
    assert gate.attrs["bias_filler"] == {"type": "constant", "value": 1.0}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--at", "conv3"), ("no layer or blob named 'conv3'", "did you mean")),
        (("--at", "conv1", "--weights", str(LENET_W)), ("--weights needs --out-weights",)),
        (("--at", "conv1", "--out-weights", "x.caffemodel"), ("--out-weights needs --weights",)),
    ],
)
def test_insert_gate_errors(tmp_path, capsys, argv, words):
    out = tmp_path / "g.prototxt"
    rc, _, err = _run(capsys, "insert-gate", MODELS / "lenet.prototxt", "-o", out, *argv)
    _one_line_error(rc, err, *words)
    assert not out.exists()


# -- transplant -------------------------------------------------------------------------------
def test_transplant_with_map_and_report(tmp_path, capsys):
    proto = tmp_path / "ft.prototxt"
    proto.write_text((MODELS / "lenet.prototxt").read_text().replace('"ip2"', '"ip2_ft"', 1))
    out, report = tmp_path / "ft.caffemodel", tmp_path / "r.json"
    rc, text, _ = _run(capsys, "transplant", proto, "--from", LENET_W, "-o", out)
    assert rc == 0 and "1 filled from fillers, 1 unused" in text and "ip2" in text
    rc, text, _ = _run(capsys, "transplant", proto, "--from", LENET_W, "-o", out, "--in-place",
                       "--map", "ip2=ip2_ft", "--report", report, "--json")
    assert rc == 0
    printed, written = json.loads(text), json.loads(report.read_text())
    assert printed["data"]["counts"] == written["data"]["counts"]
    assert written["data"]["counts"]["copied"] == 4 and written["data"]["counts"]["unused"] == 0
    assert written["data"]["bytes"]["copied"] == 1_724_320  # LeNet's 431,080 float32 values
    net = _valid(proto, out)
    src = caffe_io.load(MODELS / "lenet.prototxt", LENET_W)
    np.testing.assert_array_equal(net.layer("ip2_ft").blobs[0], src.layer("ip2").blobs[0])


def test_transplant_mismatch(tmp_path, capsys):
    proto = tmp_path / "n7.prototxt"
    proto.write_text((MODELS / "lenet.prototxt").read_text().replace("num_output: 10",
                                                                      "num_output: 7"))
    out = tmp_path / "out.caffemodel"
    rc, _, err = _run(capsys, "transplant", proto, "--from", LENET_W, "-o", out)
    _one_line_error(rc, err, "'ip2'", "10x500", "7x500", "--map", "--on-mismatch reinit")
    assert not out.exists()
    rc, text, _ = _run(capsys, "transplant", proto, "--from", LENET_W, "-o", out,
                       "--on-mismatch", "reinit", "--seed", "3")
    assert rc == 0 and "1 re-initialised" in text and "seed     3" in text
    assert _valid(proto, out).layer("ip2").blobs[0].shape == (7, 500)


def test_transplant_bad_map_and_outputs(tmp_path, capsys):
    out = tmp_path / "out.caffemodel"
    net = MODELS / "lenet.prototxt"
    rc, _, err = _run(capsys, "transplant", net, "--from", LENET_W, "-o", out, "--map", "ip2")
    _one_line_error(rc, err, "--map takes SRC_LAYER=DST_LAYER")
    rc, _, err = _run(capsys, "transplant", net, "--from", LENET_W, "-o", out, "--map",
                      "ip3=ip2")
    _one_line_error(rc, err, "has no layer 'ip3'", "did you mean 'ip2'")
    rc, _, err = _run(capsys, "transplant", net, "--from", LENET_W, "-o", LENET_W)
    _one_line_error(rc, err, "would overwrite the input")
    rc, _, err = _run(capsys, "transplant", net, "--from", tmp_path / "none.caffemodel", "-o",
                      out)
    _one_line_error(rc, err, "none.caffemodel")
    assert not out.exists()


def test_transplant_open_nsfw_cli(tmp_path, capsys):
    out = tmp_path / "nsfw.caffemodel"
    rc, text, _ = _run(capsys, "transplant", ZOO / "open_nsfw" / "deploy.prototxt", "--from",
                       ZOO / "open_nsfw" / "resnet_50_1by2_nsfw.caffemodel", "-o", out)
    assert rc == 0 and "160 copied" in text and "ignored 16 split layer(s)" in text


def test_verbs_import_no_torch_or_onnx():
    code = (
        "import sys; from surgery.cli import build_parser; build_parser(); "
        "import surgery.cli.graph, surgery.ops.insert, surgery.ops.transplant; "
        "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'cv2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_docs_commands_run(tmp_path, monkeypatch):
    """The README's graph-surgery bash examples run, in order, as written (outputs under tmp)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Graph surgery")
    end = readme.find("\n## ", start + 1)
    text = readme[start : end if end > 0 else None]
    cmds = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.splitlines() if line.startswith("surgery ")]
    assert len(cmds) >= 4
    monkeypatch.chdir(ROOT)
    for cmd in cmds:
        argv = [a.replace("/tmp/", f"{tmp_path}/") for a in shlex.split(cmd)[1:]]
        assert main(argv) == 0, cmd


def test_transplant_report_may_not_replace_the_output(tmp_path, capsys):
    # Regression: --report equal to -o was treated as an input, so --in-place let the JSON
    # report overwrite the caffemodel just written.
    out = tmp_path / "out.caffemodel"
    rc, _, err = _run(capsys, "transplant", MODELS / "lenet.prototxt", "--from", LENET_W,
                      "-o", out, "--report", out, "--in-place")
    _one_line_error(rc, err, "-o and --report name the same file")
    assert not out.exists()


def test_transplant_from_several_sources_later_overrides(tmp_path, capsys):
    """`--from a,b` is `caffe train -weights a,b`: layers in b override a, others keep a."""
    import numpy as np

    from surgery import caffe_io
    from surgery.ops import transplant

    from .conftest import GOLDEN

    g = GOLDEN / "lenet"
    net = caffe_io.load(g / "net.prototxt", g / "weights.caffemodel")
    # b: only ip2, with different values
    only_ip2 = caffe_io.load(g / "net.prototxt")
    only_ip2.layers = [lay for lay in only_ip2.layers if lay.name == "ip2"]
    only_ip2.layers[0].params[0].data = np.full((10, 500), 0.5, np.float32)
    only_ip2.layers[0].params[1].data = np.full(10, 0.25, np.float32)
    b = tmp_path / "b.caffemodel"
    caffe_io.save(only_ip2, weights=b)
    out = tmp_path / "out.caffemodel"
    rc = main(["transplant", str(g / "net.prototxt"), "--from",
               f"{g / 'weights.caffemodel'},{b}", "-o", str(out)])
    assert rc == 0
    got = caffe_io.load(g / "net.prototxt", out)
    assert np.array_equal(got.layer("ip2").params[0].data, only_ip2.layers[0].params[0].data)
    assert np.array_equal(got.layer("conv1").params[0].data, net.layer("conv1").params[0].data)
    assert "from " in capsys.readouterr().out
    assert transplant  # the library op is the function, not the module


def test_insert_eltwise_hed_with_weights_feeds_pool1(tmp_path, capsys):
    # issue 7 item 1 through the CLI: the report names the rewired consumer; weights carried
    out, out_w = tmp_path / "hed.prototxt", tmp_path / "hed.caffemodel"
    proto, weights = ZOO / "hed" / "deploy.prototxt", GOLDEN / "hed" / "weights.caffemodel"
    rc, text, _ = _run(capsys, "insert-eltwise", proto, "-o", out, "--bottoms", "relu1_2",
                       "score-dsn1", "--weights", weights, "--out-weights", out_w)
    assert rc == 0
    assert "pool1: rewired bottom 0: 'conv1_2' -> 'conv1_2_prod'" in text
    net = _valid(out, out_w)
    assert net.layer("pool1").bottoms == ["conv1_2_prod"]
    assert net.layer("conv1_2").blobs[0].shape == (64, 64, 3, 3)
    rc, text, _ = _run(capsys, "insert-eltwise", proto, "-o", out, "--in-place", "--bottoms",
                       "relu1_2", "score-dsn1", "--no-rewire")
    assert rc == 0 and "net output" in text
    assert _valid(out).layer("pool1").bottoms == ["conv1_2"]


def test_insert_feed_option(tiny, tmp_path, capsys):
    out = tmp_path / "out.prototxt"
    rc, text, _ = _run(capsys, "insert-eltwise", tiny, "-o", out, "--bottoms", "relu_a", "b",
                       "--feed", "d", "--json")
    assert rc == 0 and json.loads(text)["data"]["rewired"] == ["d"]
    assert _valid(out).layer("c").bottoms == ["a"]
    rc, _, err = _run(capsys, "insert-gate", tiny, "-o", out, "--in-place", "--at", "relu_a",
                      "--feed", "zz")
    _one_line_error(rc, err, "--feed zz", "not a reader")
    rc, text, _ = _run(capsys, "insert-gate", tiny, "-o", out, "--in-place", "--at", "relu_a",
                       "--feed", "c")
    net = _valid(out)
    assert rc == 0 and net.layer("c").bottoms == ["relu_a_gated"]
    assert net.layer("d").bottoms == ["a", "c"]
