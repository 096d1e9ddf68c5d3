"""Feature extraction (issue 7, item 9): ``to_torch(outputs=...)``, ``export torch --outputs``
and ``surgery extract``, compared with the blobs Caffe stored in ../shared/golden."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.cli import main
from surgery.errors import NetError

from .conftest import GOLDEN, import_generated

torch = pytest.importorskip("torch")

LENET = GOLDEN / "lenet"
NET, WEIGHTS = str(LENET / "net.prototxt"), str(LENET / "weights.caffemodel")


def _golden(name: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(GOLDEN / name / "input.npz") as z:
        x = z["data"]
    with np.load(GOLDEN / name / "outputs.npz") as z:
        return x, {k: z[k] for k in z.files}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_to_torch_outputs_always_a_dict_with_caffe_values() -> None:
    from surgery.export.torch import to_torch

    x, want = _golden("lenet")
    net = surgery.load(NET, WEIGHTS)
    gm = to_torch(net, input_shapes={"data": x.shape}, outputs=["ip1"])
    with torch.no_grad():
        out = gm(torch.from_numpy(x))
    assert isinstance(out, dict) and list(out) == ["ip1"]  # one output: still a dict
    # lenet's relu1 is in place on ip1: Caffe's ip1 blob holds the value after the ReLU
    assert want["ip1"].min() == 0.0
    assert _rel(out["ip1"].numpy(), want["ip1"]) < 1e-5
    assert not hasattr(gm, "ip2"), "layers after the requested blob are not exported"
    gm = to_torch(net, input_shapes={"data": x.shape}, outputs=["ip1@ip1", "pool2", "ip1"])
    with torch.no_grad():
        out = gm(torch.from_numpy(x))
    assert list(out) == ["ip1@ip1", "pool2", "ip1"]
    before = out["ip1@ip1"].numpy()
    assert before.min() < 0 and _rel(np.maximum(before, 0), want["ip1"]) < 1e-5
    assert _rel(out["pool2"].numpy(), want["pool2"]) < 1e-5
    # the default is unchanged: one output, one tensor
    assert isinstance(to_torch(net, input_shapes={"data": x.shape})(torch.from_numpy(x)),
                      torch.Tensor)
    with pytest.raises(NetError, match="did you mean.*ip1"):
        to_torch(net, outputs=["ip11"])


def test_export_torch_outputs_model_py(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    x, want = _golden("lenet")
    out = tmp_path / "m"
    assert main(["export", "torch", NET, "--weights", WEIGHTS, "-o", str(out),
                 "--outputs", "pool2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["outputs"] == ["pool2"]
    mod = import_generated(out / "model.py", "lenet_pool2")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    got = model(torch.from_numpy(x))
    assert list(got) == ["pool2"] and _rel(got["pool2"].detach().numpy(), want["pool2"]) < 1e-5
    assert main(["export", "torch", NET, "--weights", WEIGHTS, "-o", str(tmp_path / "bad"),
                 "--outputs", "nope"]) == 2
    assert "no blob named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_extract_batches_and_pads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, want = _golden("lenet")
    five = np.concatenate([x, x, x[:1]])  # 5 samples, --batch 2: a padded last batch
    np.save(tmp_path / "x.npy", five)
    feats = tmp_path / "feats.npz"
    assert main(["extract", NET, "--weights", WEIGHTS, "--blobs", "pool2,ip1", "--input",
                 str(tmp_path / "x.npy"), "--batch", "2", "-o", str(feats), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 5 and rep["blobs"]["ip1"] == [5, 500]
    with np.load(feats) as z:
        assert z.files == ["pool2", "ip1"]
        for blob in ("pool2", "ip1"):
            tiled = np.concatenate([want[blob], want[blob], want[blob][:1]])
            assert _rel(z[blob], tiled) < 1e-5, blob


def test_extract_googlenet_pool5(tmp_path: Path) -> None:
    g = GOLDEN / "googlenet"
    x, want = _golden("googlenet")
    feats = tmp_path / "feats.npz"
    assert main(["extract", str(g / "net.prototxt"), "--weights", str(g / "weights.caffemodel"),
                 "--blobs", "pool5/7x7_s1", "--input", str(g / "input.npz"), "-o",
                 str(feats)]) == 0
    with np.load(feats) as z:
        got = z["pool5/7x7_s1"]
    assert got.shape == (2, 1024, 1, 1) and _rel(got, want["pool5/7x7_s1"]) < 1e-4


@pytest.mark.parametrize("what", ["folder", "blob", "batch", "axes"])
def test_extract_bad_input(what: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    x, _ = _golden("lenet")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "imgs").mkdir()
    argv = {"folder": ["--input", str(tmp_path / "imgs"), "--blobs", "ip1"],
            "blob": ["--input", str(tmp_path / "x.npy"), "--blobs", "ip1,fc7"],
            "batch": ["--input", str(tmp_path / "x.npy"), "--blobs", "ip1", "--batch", "0"],
            "axes": ["--input", str(tmp_path / "x.npy"), "--blobs", "ip1",
                     "--input-shape", "data=1,28,28"]}[what]
    out = tmp_path / "f.npz"
    assert main(["extract", NET, "--weights", WEIGHTS, "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert {"folder": "no Data or ImageData layer", "blob": "fc7", "batch": "--batch",
            "axes": "axes"}[what] in err
    assert not out.exists()


_IMAGE_TV = """
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 8 mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 }
  image_data_param { source: "val.txt" batch_size: 2 new_height: 10 new_width: 12 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_extract_image_folder_with_the_nets_preprocessing(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    from surgery.ops._common import fill_missing_weights

    proto = tmp_path / "tv.prototxt"
    proto.write_text(_IMAGE_TV)
    net = surgery.load(proto)
    fill_missing_weights(net, np.random.default_rng(0))
    weights = tmp_path / "w.caffemodel"
    surgery.save(net, weights=weights)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, (h, w) in {"b.png": (10, 12), "a.png": (20, 15), "c.jpg": (7, 9)}.items():
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (folder / "notes.txt").write_text("not an image")
    # Caffe's ImageData + DataTransformer in TEST, by hand: resize to 12x10 (w x h), centre
    # crop 8x8 (offsets 1, 2), subtract the BGR means, times the scale; files in name order
    want = []
    for name in ("a.png", "b.png", "c.jpg"):
        img = cv2.resize(cv2.imread(str(folder / name)), (12, 10)).astype(np.float32)
        crop = img[1:9, 2:10] - np.float32([104, 117, 123])
        want.append((crop * np.float32(0.5)).transpose(2, 0, 1))
    np.save(tmp_path / "x.npy", np.stack(want))
    a, b = tmp_path / "from_folder.npz", tmp_path / "from_npy.npz"
    assert main(["extract", str(proto), "--weights", str(weights), "--blobs", "fc,data",
                 "--input", str(folder), "-o", str(a)]) == 0
    assert main(["extract", str(proto), "--weights", str(weights), "--blobs", "fc",
                 "--input", str(tmp_path / "x.npy"), "-o", str(b)]) == 0
    with np.load(a) as za, np.load(b) as zb:
        assert za["data"].shape == (3, 3, 8, 8)
        np.testing.assert_array_equal(za["data"], np.stack(want))
        np.testing.assert_array_equal(za["fc"], zb["fc"])
