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
                                        ("dim: 1 " * 40, "32")])
def test_input_dims_refused(tmp_path, dims, word):
    p = tmp_path / "n.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data" '
                 f"input_param {{ shape {{ {dims} }} }} }}\n")
    try:  # too many axes is refused at load already, the rest by check
        problems = " ".join(str(x) for x in check(caffe_io.load(p)))
    except ParseError as exc:
        problems = str(exc)
    assert word in problems


def test_verify_without_learnable_layers(tmp_path, capsys):
    p = _write(tmp_path, 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                         "pooling_param { pool: MAX kernel_size: 2 } }\n")
    assert main(["verify", str(p)]) == 0, capsys.readouterr()


def test_verify_in_place_relus_on_the_input(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
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


# -- item 6: the weights reader stays within a small multiple of the file size ----------------
_MEASURE = r"""
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from surgery import _wire
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
wf = _wire.read_caffemodel(sys.argv[1])
a = wf.layers[0].blobs[0].data
assert a.size == int(sys.argv[3]) and float(a[-1]) == float(a.size - 1), (a.size, a[-1])
print(hwm() - before)
"""


def _encodings(n: int) -> dict[str, bytes]:
    import numpy as np

    def ld(field: int, payload: bytes) -> bytes:
        return _tag(field, 2) + _vint(len(payload)) + payload

    def records(tag: int, vals: np.ndarray, head: bytes = b"") -> bytes:
        raw = vals.view(np.uint8).reshape(len(vals), -1)
        hdr = np.frombuffer(bytes([tag]) + head, np.uint8)
        return np.concatenate([np.broadcast_to(hdr, (len(vals), len(hdr))), raw], 1).tobytes()

    f32, f64 = np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float64)
    blobs = {
        "packed float": ld(5, f32.tobytes()),
        "unpacked float": records(0x2D, f32),
        "unpacked double": records(0x41, f64),
        "packed float, one per run": records(0x2A, f32, b"\x04"),
    }
    shape = ld(7, ld(1, _vint(n)))
    return {k: ld(100, ld(1, b"fc") + ld(2, b"InnerProduct") + ld(7, shape + b))
            for k, b in blobs.items()}


def _vint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _vint(field << 3 | wire)


def test_reader_memory_is_a_small_multiple_of_the_file(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    n = 3_000_000  # 12 MB of floats: 15 MB unpacked, 27 MB as unpacked doubles
    for what, content in _encodings(n).items():
        p = tmp_path / "w.caffemodel"
        p.write_bytes(content)
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(p), str(ROOT), str(n)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        grew = int(out.stdout.split()[-1])
        assert grew < 3 * len(content), f"{what}: {grew:,} bytes for a {len(content):,}-byte file"


def test_millions_of_dims_refused_before_parsing(tmp_path, monkeypatch):
    """A shape of 1M dims is refused by a scan of the bytes, not after minutes of parsing."""
    from google.protobuf import text_format

    p = tmp_path / "dims.prototxt"
    p.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { '
                 + "dim: 1 " * 1_000_000 + "} } }\n")
    called = []
    monkeypatch.setattr(text_format, "Parse", lambda *a, **k: called.append(1))
    with pytest.raises(ParseError, match="kMaxBlobAxes"):
        caffe_io.load(p)
    assert not called


def test_deep_prototxt_refused_before_parsing(tmp_path):
    p = tmp_path / "deep.prototxt"
    p.write_text("layer { " * 150 + "}" * 150)
    with pytest.raises(ParseError, match="nested deeper than 100"):
        caffe_io.load(p)
