"""Property-based fuzzing of the two readers (issue 8): random mutations of real zoo files.

* The wire reader (``surgery._wire`` through ``caffe_io.read_weights`` and ``load``) on mutated
  caffemodels: it raises nothing but :class:`~surgery.errors.SurgeryError`; a file it accepts
  is written back with ``write_caffemodel`` and read again to the same layers and arrays.
* The text reader (``caffe_io.load``) on mutated prototxt: nothing but ``SurgeryError``; a
  definition it accepts goes through ``check`` without an exception and round-trips (written
  with ``net_to_text`` and read back to the same text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery import _wire, caffe_io
from surgery.check import check
from surgery.errors import SurgeryError

from .conftest import GOLDEN, ZOO

WEIGHTS = [GOLDEN / "lenet" / "weights.caffemodel",  # V2
           ZOO / "v1_trained_lenet" / "lenet_iter_10000.caffemodel",  # legacy V1
           GOLDEN / "cifar10_quick_v0" / "weights.caffemodel"]
#: The definition each weights file belongs to.
NETS = [GOLDEN / "lenet" / "net.prototxt", GOLDEN / "lenet_v1trained" / "net.prototxt",
        GOLDEN / "cifar10_quick_v0" / "net.prototxt"]
TEXTS = [GOLDEN / "lenet" / "net.prototxt",
         ZOO / "bvlc_alexnet" / "deploy.prototxt",
         ZOO / "bvlc_alexnet" / "train_val.prototxt",
         GOLDEN / "cifar10_quick_v0" / "net.prototxt"]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

#: Characters a mutation inserts into text: the ones protobuf's tokenizer cares about.
_TEXT_CHARS = '{}:"\n #\\0123456789-.eE_abcxyzLAYER\t\x00\xff'


@st.composite
def _mutation(draw: st.DrawFn, size: int, alphabet: bytes | None = None
              ) -> list[tuple[str, int, int, bytes]]:
    """A few edits: (kind, position, length, bytes) applied in order."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "duplicate", "truncate"]))
        pos = draw(st.integers(0, max(size - 1, 0)))
        length = draw(st.integers(1, 64))
        if alphabet is None:
            data = draw(st.binary(min_size=1, max_size=16))
        else:
            data = bytes(draw(st.lists(st.sampled_from(list(alphabet)), min_size=1,
                                       max_size=16)))
        edits.append((kind, pos, length, data))
    return edits


def _apply(raw: bytes, edits: list[tuple[str, int, int, bytes]]) -> bytes:
    b = bytearray(raw)
    for kind, pos, length, data in edits:
        pos = min(pos, len(b))
        if kind == "flip" and pos < len(b):
            b[pos] ^= data[0] or 0x80
        elif kind == "delete":
            del b[pos:pos + length]
        elif kind == "insert":
            b[pos:pos] = data
        elif kind == "duplicate":
            b[pos:pos] = b[pos:pos + length]
        elif kind == "truncate":
            del b[pos:]
    return bytes(b)


@pytest.fixture(scope="module")
def weight_files() -> list[bytes]:
    return [p.read_bytes() for p in WEIGHTS]


@pytest.fixture(scope="module")
def text_files() -> list[bytes]:
    return [p.read_bytes() for p in TEXTS]


@FUZZ
@given(which=st.integers(0, len(WEIGHTS) - 1), data=st.data())
def test_wire_reader_fails_cleanly_or_round_trips(weight_files, tmp_path, which, data):
    raw = weight_files[which]
    edits = data.draw(_mutation(len(raw)))
    path = tmp_path / "m.caffemodel"
    path.write_bytes(_apply(raw, edits))
    try:
        wf = caffe_io.read_weights(path)
    except SurgeryError:
        return
    # Accepted: every blob is a finite-size array matching its shape, and it round-trips.
    again = tmp_path / "again.caffemodel"
    _wire.write_caffemodel(again, wf.net_header,
                           [(rec.header, [b.data.astype(np.float32) for b in rec.blobs])
                            for rec in wf.layers], format="V1" if wf.format == "V1" else "V2")
    back = caffe_io.read_weights(again)
    assert [r.name for r in back.layers] == [r.name for r in wf.layers]
    for r1, r2 in zip(wf.layers, back.layers, strict=True):
        assert len(r1.blobs) == len(r2.blobs)
        for b1, b2 in zip(r1.blobs, r2.blobs, strict=True):
            assert b1.data.size == b2.data.size
            np.testing.assert_array_equal(b1.data.astype(np.float32).ravel(),
                                          b2.data.ravel())
    # and the net it belongs to loads it or refuses it with one of our errors
    try:
        caffe_io.load(NETS[which], path)
    except SurgeryError:
        pass


@FUZZ
@given(which=st.integers(0, len(TEXTS) - 1), data=st.data())
def test_text_reader_fails_cleanly_or_round_trips(text_files, tmp_path, which, data):
    raw = text_files[which]
    edits = data.draw(_mutation(len(raw), _TEXT_CHARS.encode("latin-1")))
    path = tmp_path / "m.prototxt"
    path.write_bytes(_apply(raw, edits))
    try:
        net = caffe_io.load(path)
    except SurgeryError:
        return
    check(net)  # problems are reported, never raised
    text = caffe_io.net_to_text(net)
    again = tmp_path / "again.prototxt"
    again.write_text(text)
    assert caffe_io.net_to_text(caffe_io.load(again)) == text


def test_mutations_are_not_all_refused(text_files, tmp_path):
    """The property tests above would pass vacuously if every mutant were refused: a
    comment-only edit must still load."""
    path = tmp_path / "m.prototxt"
    path.write_bytes(text_files[0] + b"\n# a comment\n")
    assert len(caffe_io.load(path).layers) > 0


def test_fuzz_inputs_exist():
    for p in WEIGHTS + NETS + TEXTS:
        assert Path(p).is_file(), p
