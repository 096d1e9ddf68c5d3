"""surgery cut: truncate a net after a value (issue 7 item 9's `cut`), checked on the zoo and
numerically against the Caffe golden blobs through OpenCV 4.x."""

from __future__ import annotations

import numpy as np
import pytest

from surgery import caffe_io
from surgery.cli import main
from surgery.errors import LayerNotFoundError, NetError
from surgery.ops import cut

from .conftest import GOLDEN, ZOO
from .test_verbs_check import assert_passes_check

LENET = GOLDEN / "lenet"


def test_cut_googlenet_train_val_at_pool5_drops_heads_and_aux(tmp_path):
    net = caffe_io.load(ZOO / "bvlc_googlenet" / "train_val.prototxt")
    new, rep = cut(net, "pool5/7x7_s1")
    names = {lay.name for lay in new.layers}
    assert not any(n.startswith(("loss1/", "loss2/", "loss3/")) for n in names)
    assert "pool5/drop_7x7_s1" not in names  # in place after pool5's own output
    assert len(new.layers_named("data")) == 2  # TRAIN and TEST data layers kept
    assert rep.data["at"] == "pool5/7x7_s1" and rep.data["phases"] == ["TRAIN", "TEST"]
    assert len(rep.data["dropped"]) == 25
    # untouched layers share their definition and are in file order
    assert [lay.name for lay in new.layers] == [lay.name for lay in net.layers
                                                if lay.name in names]
    out = tmp_path / "cut.prototxt"
    caffe_io.save(new, out)
    assert_passes_check(out)


@pytest.mark.parametrize(("at", "golden_blob", "relu"), [
    ("ip1", "ip1", False),    # layer name: ip1's own output, before relu1 (in place)
    ("relu1", "ip1", True),   # the value after the in-place ReLU
    ("pool2", "pool2", False),
])
def test_cut_lenet_outputs_equal_caffe(at, golden_blob, relu, tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    out, out_w = tmp_path / "c.prototxt", tmp_path / "c.caffemodel"
    rc = main(["cut", str(LENET / "net.prototxt"), "--at", at, "-o", str(out), "--weights",
               str(LENET / "weights.caffemodel"), "--out-weights", str(out_w)])
    capsys.readouterr()
    assert rc == 0
    net = caffe_io.load(out, out_w)
    assert ("relu1" in {lay.name for lay in net.layers}) == relu
    cv = cv2.dnn.readNetFromCaffe(str(out), str(out_w))
    cv.setInput(np.load(LENET / "input.npz")["data"])
    got = cv.forward()
    want = np.load(LENET / "outputs.npz")[golden_blob]
    if golden_blob == "ip1" and not relu:
        # the golden ip1 is Caffe's blob after relu1 (in place): our pre-ReLU output, rectified
        got = np.maximum(got, 0)
        assert (cv.forward() < 0).any()  # really the value before the ReLU
    # OpenCV vs Caffe (float32, another summation order): 1e-5 relative to the blob's range
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_cut_errors(capsys, tmp_path):
    net = caffe_io.load(LENET / "net.prototxt")
    with pytest.raises(LayerNotFoundError, match="did you mean 'pool2'"):
        cut(net, "pool3")
    with pytest.raises(NetError, match="has 1 top"):
        cut(net, "pool2:1")
    rc = main(["cut", str(LENET / "net.prototxt"), "--at", "nope", "-o",
               str(tmp_path / "x.prototxt")])
    assert rc == 2 and not (tmp_path / "x.prototxt").exists()


def test_cut_and_init_as_recipe_steps():
    from surgery.ops import apply_recipe

    net = caffe_io.load(LENET / "net.prototxt")
    recipe = {"step": [{"op": "cut", "at": "relu1"}, {"op": "init"}], "seed": 3}
    new, rep = apply_recipe(recipe, net, write=False)
    assert [lay.name for lay in new.layers][-1] == "relu1"
    assert all(lay.has_weights for lay in new.layers if lay.type in ("Convolution",
                                                                     "InnerProduct"))
    assert rep.seed == 3
