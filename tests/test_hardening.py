"""Regressions of issue 8 that are not "exit 2 on a bad file" (those are in test_bad_inputs):
escaped names in tables, verify on nets without weights or with in-place inputs, check
reporting what the exporters refuse, one-line usage errors, --max-bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from surgery import caffe_io
from surgery.check import check
from surgery.cli import main, one_line
from surgery.errors import ParseError

HEAD = ('name: "t"\nlayer { name: "data" type: "Input" top: "data" '
        "input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n")


def _write(tmp_path: Path, body: str, name: str = "n.prototxt") -> Path:
    p = tmp_path / name
    p.write_text(HEAD + body)
    return p


def test_info_escapes_hostile_names(tmp_path, capsys):
    p = _write(tmp_path, 'layer { name: "r\\033[31mred\\nrow" type: "ReLU" bottom: "data" '
                         'top: "x\\ny" }\n')
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    rows = [line for line in out.splitlines() if "ReLU" in line]
    assert len(rows) == 1 and "r\\x1b[31mred\\x0arow" in rows[0] and "x\\x0ay" in rows[0]


def test_one_line_messages():
    assert one_line("a\nb\x1b[2J\x00") == "a | b\\x1b[2J\\x00"


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["freeze", "x.prototxt", "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


@pytest.mark.parametrize("body, words", [
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param '
     "{ num_output: 2 kernel_size: 1 dilation: 0 } }", ["'c'", "dilation"]),
    ('layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param '
     "{ num_output: 2 kernel_size: 1 pad: 4000000000 } }", ["'c'", "pad"]),
    ('layer { name: "s" type: "Softmax" bottom: "data" top: "s" softmax_param { axis: 9 } }',
     ["'s'", "axis 9"]),
    ('layer { name: "d" type: "Dropout" bottom: "data" top: "d" '
     "dropout_param { dropout_ratio: 1.5 } }", ["'d'", "dropout_ratio"]),
    ('layer { name: "r" type: "ReLU" bottom: "data" top: "r" param { lr_mult: nan } }',
     ["'r'", "lr_mult nan"]),
])
def test_check_reports_what_exporters_refuse(tmp_path, body, words):
    net = caffe_io.load(_write(tmp_path, body + "\n"))
    errors = " ".join(str(p) for p in check(net) if p.severity == "error")
    for w in words:
        assert w in errors, errors


@pytest.mark.parametrize("dims, word", [("dim: 0 dim: 2", "positive"),
                                        ("dim: 3000000000 dim: 2", "INT_MAX"),
                                        ("dim: 1 " * 40, "axes")])
def test_input_dims_refused(tmp_path, dims, word):
    p = tmp_path / "n.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data" '
                 f"input_param {{ shape {{ {dims} }} }} }}\n")
    problems = " ".join(str(x) for x in check(caffe_io.load(p)))
    assert word in problems


def test_verify_without_learnable_layers(tmp_path, capsys):
    p = _write(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                         "pooling_param { pool: MAX kernel_size: 2 } }\n")
    assert main(["verify", str(p)]) == 0, capsys.readouterr()


def test_verify_in_place_relus_on_the_input(tmp_path, capsys):
    # Caffe exposes 'data' after the last in-place layer; every backend is compared on it.
    p = _write(tmp_path, 'layer { name: "r1" type: "ReLU" bottom: "data" top: "data" }\n'
                         'layer { name: "r2" type: "ReLU" bottom: "data" top: "data" '
                         "relu_param { negative_slope: 0.5 } }\n")
    assert main(["verify", str(p), "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    rows = {(r["blob"], r["backend"]) for r in rep["rows"]}
    assert ("data", "onnxruntime") in rows and ("data", "torch") in rows


def test_max_bytes_names_the_limit(tmp_path, capsys):
    import numpy as np

    from surgery.net import Param

    p = _write(tmp_path, 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                         "inner_product_param { num_output: 10 } }\n"
                         'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    net = caffe_io.load(p)
    net.layer("fc").params = [Param(np.ones((10, 32), np.float32)), Param(np.zeros(10, np.float32))]
    w = tmp_path / "w.caffemodel"
    caffe_io.save(net, None, w)
    out, outw = tmp_path / "o.prototxt", tmp_path / "o.caffemodel"
    argv = ["rename-heads", str(p), "--num-output", "1000", "--weights", str(w),
            "--out-weights", str(outw), "-o", str(out)]
    rc = main([*argv, "--max-bytes", "64K"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-bytes" in err and "65,536" in err, err
    assert not out.exists() and not outw.exists()
    assert main(argv) == 0 and outw.exists()


def test_fifo_refused_up_front(tmp_path):
    fifo = tmp_path / "f.prototxt"
    os.mkfifo(fifo)
    with pytest.raises(ParseError, match="FIFO"):
        caffe_io.load(fifo)


def test_device_refused_up_front():
    with pytest.raises(ParseError, match="device"):
        caffe_io.read_weights("/dev/zero")
