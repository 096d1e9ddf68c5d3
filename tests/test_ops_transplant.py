"""transplant / transplant_file: Caffe's CopyTrainedLayersFrom semantics, checked against
protobuf's own parse of the source, the golden outputs (OpenCV 4.x as the engine) and small
inline nets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from surgery import caffe_io
from surgery._proto import caffe_pb2
from surgery.check import check
from surgery.errors import LayerNotFoundError, NetError, ShapeMismatchError
from surgery.ops import transplant, transplant_file
from surgery.ops._common import fill_new_weights

from .conftest import GOLDEN, MODELS, ZOO

NSFW = ZOO / "open_nsfw"
LENET = GOLDEN / "lenet"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def _opencv(proto: Path, model: Path, net, inputs: dict, outputs: list[str]) -> dict:
    cv2 = pytest.importorskip("cv2", reason="opencv-python-headless<5 (the test extra)")
    cv = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    if hasattr(cv, "enableWinograd"):
        cv.enableWinograd(False)
    for name, x in inputs.items():
        cv.setInput(np.ascontiguousarray(x, np.float32), name)
    layer_of = {t: lay.name for lay in net.layers for t in lay.tops}
    return dict(zip(outputs, cv.forward([layer_of[o] for o in outputs]), strict=True))


def _protobuf_blobs(path: Path) -> dict[str, list[np.ndarray]]:
    """The source as protobuf itself parses it (first layer of a name, splits skipped)."""
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString(path.read_bytes())
    out: dict[str, list[np.ndarray]] = {}
    for lp in list(msg.layer) + list(msg.layers):
        if lp.name in out or lp.name.endswith("_split"):
            continue
        blobs = []
        for b in lp.blobs:
            shape = tuple(b.shape.dim) if b.HasField("shape") else (
                b.num, b.channels, b.height, b.width)
            blobs.append(np.asarray(b.data, np.float32).reshape(shape))
        out[lp.name] = blobs
    return out


# -- golden: open_nsfw (a training caffemodel into the deploy net) ----------------------------
def test_open_nsfw_gives_the_blobs_caffe_copied():
    net = caffe_io.load(NSFW / "deploy.prototxt")
    src = NSFW / "resnet_50_1by2_nsfw.caffemodel"
    new, rep = transplant(net, src)
    ref = _protobuf_blobs(src)
    learnable = [lay.name for lay in net.layers
                 if lay.type in ("Convolution", "BatchNorm", "Scale", "InnerProduct")]
    assert sorted(rep.data["copied"]) == sorted(learnable)
    c = rep.data["counts"]
    assert c["copied"] == len(learnable) == 160
    assert (c["filled"], c["reinitialised"], c["skipped"], c["unused"]) == (0, 0, 0, 0)
    assert c["splits_ignored"] == 16
    total = 0
    for name in learnable:
        got = new.layer(name).blobs
        assert len(got) == len(ref[name])
        for g, r in zip(got, ref[name], strict=True):
            assert g.shape == r.shape and g.dtype == np.float32
            np.testing.assert_array_equal(g, r)
            assert not g.flags.writeable and not g.flags.owndata  # a view of the mapped file
            total += g.nbytes
    assert rep.data["bytes"]["copied"] == total
    assert all(lay.params == [] or lay.params[0].data is None for lay in net.layers)  # input kept


def test_open_nsfw_opencv_matches_golden(tmp_path):
    gold = GOLDEN / "open_nsfw_real"
    meta = json.loads((gold / "meta.json").read_text())
    out = tmp_path / "nsfw.caffemodel"
    rep = transplant_file(NSFW / "deploy.prototxt", NSFW / "resnet_50_1by2_nsfw.caffemodel", out)
    assert rep.data["bytes_written"] == out.stat().st_size
    net = caffe_io.load(NSFW / "deploy.prototxt", out)
    assert [p for p in check(net) if p.severity == "error"] == []
    got = _opencv(NSFW / "deploy.prototxt", out, net, dict(np.load(gold / "input.npz")),
                  meta["outputs"])
    want = np.load(gold / "outputs.npz")
    for name in meta["outputs"]:
        assert _rel(got[name], want[name]) <= meta["tolerance"]


def test_v1_legacy_blobs_compare_on_trailing_axes(tmp_path):
    gold = GOLDEN / "lenet_v1trained"
    meta = json.loads((gold / "meta.json").read_text())
    src = (gold / meta["weights"]).resolve()
    net = caffe_io.load(gold / "net.prototxt")
    new, rep = transplant(net, src)
    assert rep.data["copied"] == ["conv1", "conv2", "ip1", "ip2"]
    assert [b.shape for b in new.layer("ip1").blobs] == [(500, 800), (500,)]
    assert [b.shape for b in new.layer("conv1").blobs] == [(20, 1, 5, 5), (20,)]
    ref = _protobuf_blobs(src)
    np.testing.assert_array_equal(new.layer("ip1").blobs[0], ref["ip1"][0].reshape(500, 800))
    model = tmp_path / "w.caffemodel"
    caffe_io.save(new, weights=model)
    got = _opencv(gold / "net.prototxt", model, new, dict(np.load(gold / "input.npz")),
                  meta["outputs"])
    want = np.load(gold / "outputs.npz")
    for name in meta["outputs"]:
        assert _rel(got[name], want[name]) <= meta["tolerance"]


# -- mismatches, maps, fillers ----------------------------------------------------------------
@pytest.fixture()
def lenet7():
    """models/lenet with a 7-class head of the same name: Caffe would refuse the copy."""
    net = caffe_io.load(MODELS / "lenet.prototxt")
    net.layer("ip2").attrs["num_output"] = 7
    return net


def test_shape_mismatch_is_an_error_naming_layer_and_shapes(lenet7):
    with pytest.raises(ShapeMismatchError) as exc:
        transplant(lenet7, LENET / "weights.caffemodel")
    msg = str(exc.value)
    assert "'ip2'" in msg and "10x500" in msg and "7x500" in msg
    assert "--map" in msg and "--on-mismatch reinit" in msg and "Rename" in msg


def test_blob_count_mismatch(lenet7):
    lenet7.layer("ip2").attrs["num_output"] = 10
    lenet7.layer("ip2").attrs["bias_term"] = False
    with pytest.raises(ShapeMismatchError, match=r"'ip2' \(2 blob\(s\).*needs 1"):
        transplant(lenet7, LENET / "weights.caffemodel")


def test_reinit_is_seeded_and_leaves_the_rest(lenet7):
    src = caffe_io.read_weights(LENET / "weights.caffemodel")
    new, rep = transplant(lenet7, src, on_mismatch="reinit", seed=5)
    assert rep.data["reinitialised"] == ["ip2"] and rep.seed == 5
    assert rep.data["counts"]["copied"] == 3
    w, b = new.layer("ip2").blobs
    assert w.shape == (7, 500) and np.any(w) and not np.any(b)  # xavier, constant 0
    again, _ = transplant(lenet7, src, on_mismatch="reinit", seed=5)
    np.testing.assert_array_equal(again.layer("ip2").blobs[0], w)
    other, _ = transplant(lenet7, src, on_mismatch="reinit", seed=6)
    assert not np.array_equal(other.layer("ip2").blobs[0], w)
    by_name = src.by_name()
    for name in ("conv1", "conv2", "ip1"):
        for got, rec in zip(new.layer(name).blobs, by_name[name].blobs, strict=True):
            assert np.shares_memory(got, rec.data)


def test_skip_keeps_existing_weights_or_fills(lenet7):
    new, rep = transplant(lenet7, LENET / "weights.caffemodel", on_mismatch="skip")
    assert rep.data["skipped"] == ["ip2"] and rep.data["counts"]["skipped"] == 1
    assert new.layer("ip2").blobs[0].shape == (7, 500)
    # starting from weights the net already has: a skipped layer keeps them (same arrays)
    start, _ = transplant(lenet7, LENET / "weights.caffemodel", on_mismatch="reinit", seed=1)
    again, rep = transplant(start, LENET / "weights.caffemodel", on_mismatch="skip")
    assert again.layer("ip2").blobs[0] is start.layer("ip2").blobs[0]


def test_map_renamed_head(tmp_path):
    net = caffe_io.load(MODELS / "lenet.prototxt")
    net.rename_layer("ip2", "ip2_ft")
    new, rep = transplant(net, LENET / "weights.caffemodel")
    assert rep.data["unused"] == ["ip2"] and rep.data["filled"] == ["ip2_ft"]
    assert any(e["layer"] == "ip2" and "unused" in e["why"] for e in rep.left)
    assert rep.data["bytes"]["unused"] == (10 * 500 + 10) * 4
    mapped, rep = transplant(net, LENET / "weights.caffemodel", map={"ip2": "ip2_ft"})
    assert rep.data["counts"]["unused"] == 0 and "ip2_ft" in rep.data["copied"]
    ref = _protobuf_blobs(LENET / "weights.caffemodel")
    np.testing.assert_array_equal(mapped.layer("ip2_ft").blobs[0], ref["ip2"][0])
    with pytest.raises(LayerNotFoundError, match="did you mean 'ip2'"):
        transplant(net, LENET / "weights.caffemodel", map={"ip3": "ip2_ft"})
    with pytest.raises(LayerNotFoundError, match="did you mean 'ip2_ft'"):
        transplant(net, LENET / "weights.caffemodel", map={"ip2": "ip2_fx"})
    with pytest.raises(NetError, match="on_mismatch"):
        transplant(net, LENET / "weights.caffemodel", on_mismatch="ignore")


def test_new_layer_with_default_zero_filler_warns(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text(
        (MODELS / "lenet.prototxt").read_text()
        + 'layer { name: "extra" type: "InnerProduct" bottom: "prob" top: "extra" '
        "inner_product_param { num_output: 3 } }\n"
    )
    new, rep = transplant(caffe_io.load(p), LENET / "weights.caffemodel", seed=2)
    assert rep.data["filled"] == ["extra"] and rep.seed == 2
    assert not np.any(new.layer("extra").blobs[0])
    assert any(n.startswith("warning: extra") and "constant 0" in n for n in rep.notes)


def test_train_val_twins_and_round_trip(tmp_path):
    net = caffe_io.load(MODELS / "tiny_googlenet_train_val.prototxt")
    learnable = [lay.name for lay in net.layers if lay.type in ("Convolution", "InnerProduct")]
    filled = net.copy()
    fill_new_weights(filled, learnable, np.random.default_rng(0))
    src = tmp_path / "src.caffemodel"
    caffe_io.save(filled, weights=src)
    out = tmp_path / "out.caffemodel"
    rep = transplant_file(net, src, out)
    assert rep.data["counts"]["copied"] == len(learnable)
    back = caffe_io.load(MODELS / "tiny_googlenet_train_val.prototxt", out)
    for name in learnable:
        for a, b in zip(back.layer(name).blobs, filled.layer(name).blobs, strict=True):
            np.testing.assert_array_equal(a, b)
    # the output may replace the source (atomic rename; the mapped arrays stay valid)
    same = tmp_path / "same.caffemodel"
    shutil.copyfile(src, same)
    transplant_file(net, same, same)
    assert same.read_bytes() == out.read_bytes()
