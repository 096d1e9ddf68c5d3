"""Preprocessing carried into the exports (surgery.export.preprocess), against the real Caffe.

tests/data/preprocess_golden.npz was recorded once by tools/record_preprocess_golden.py with the
reference Caffe: for each zoo net (CaffeNet with a mean file, GoogLeNet and SqueezeNet with mean
values) the TEST ``Data`` layer's top for one image stored in an LMDB (BGR, as
``convert_imageset`` stores it), and pycaffe's ``caffe.io.Transformer`` path (set_transpose,
set_channel_swap, set_raw_scale(255), set_mean) on the 0-1 image (see tests/preprocess_cases.py).
Our ``preprocess`` must give those inputs (within 1e-5; they are in fact bit-equal), and the
exported models fed our preprocessed image must give what they give on Caffe's input.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.cli import main
from surgery.errors import DataError
from surgery.export.preprocess import PreprocessSpec, apply_spec, preprocess_spec

from .preprocess_cases import CAFFENET_MEAN, CASES, ZOO, centre, decode, image01, make_image
from .preprocess_cases import mean_image as make_mean

GOLDEN = Path(__file__).parent / "data" / "preprocess_golden.npz"
SHARED_GOLDEN = ZOO.parent / "golden"
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these small forwards run several times faster so on a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _caffe(case: str) -> tuple[np.ndarray, str]:
    with np.load(GOLDEN) as z:
        shape = tuple(int(d) for d in z[f"{case}/shape"])
        return decode(z[f"{case}/data"], shape), str(z[f"{case}/transformer_sha256"])


def _import(folder: Path):
    spec = importlib.util.spec_from_file_location(f"m_{folder.name}", folder / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _net_and_spec(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The exported net, its weights and the spec, per case:

    * caffenet: the train_val itself (spec from its TEST transform_param: the mean file at the
      path it names, relative to the working directory), cut at pool5 with seeded filler
      weights (the fully connected layers' 58M random weights would only cost time);
    * googlenet: the golden deploy net and weights, the steps given as export options;
    * squeezenet: the golden v1.1 deploy net and weights, the spec from the train_val.
    """
    rel, _, size = CASES[case]
    shapes = {"data": (1, 3, size, size)}
    if case == "caffenet":
        from surgery.data.mean import write_mean
        from surgery.ops.cut import cut
        from surgery.ops.init import init_weights

        monkeypatch.chdir(tmp_path)
        (tmp_path / CAFFENET_MEAN).parent.mkdir(parents=True)
        write_mean(tmp_path / CAFFENET_MEAN, make_mean())
        net = surgery.load(ZOO / rel)
        spec = preprocess_spec(net, input_shapes=shapes)
        net, _ = cut(net, "pool5")
        net, _ = init_weights(net, seed=7, input_shapes=shapes)
    elif case == "googlenet":
        g = SHARED_GOLDEN / "googlenet"
        net = surgery.load(g / "net.prototxt", g / "weights.caffemodel")
        spec = preprocess_spec(net, mean_values=[104, 117, 123], crop_size=224,
                               input_shapes=shapes)
    else:
        g = SHARED_GOLDEN / "squeezenet_v1_1"
        net = surgery.load(g / "net.prototxt", g / "weights.caffemodel")
        spec = preprocess_spec(surgery.load(ZOO / rel), input_shapes=shapes)
    return net, spec, shapes


@pytest.mark.parametrize("case", list(CASES))
def test_preprocess_equals_caffe_torch_and_onnx(case, tmp_path, monkeypatch):
    from surgery.export.onnx import run_onnx, to_onnx
    from surgery.export.torch import save_torch

    rel, (h, w), size = CASES[case]
    caffe_data, transformer_sha = _caffe(case)
    img = make_image(h, w)
    net, spec, shapes = _net_and_spec(case, tmp_path, monkeypatch)
    assert spec.crop_size == size and spec.swap
    assert (spec.mean_image is not None) == (case == "caffenet")

    # the library's numpy steps
    assert np.abs(apply_spec(spec, img) - caffe_data).max() <= TOL

    # export torch: preprocess.json + preprocess() in model.py
    out = tmp_path / "torch"
    save_torch(net, out, "test", shapes, preprocess=spec)
    pre = json.loads((out / "preprocess.json").read_text())
    assert PreprocessSpec.from_json(pre) == spec
    mod = _import(out)
    x = mod.preprocess(img).numpy()  # one HWC uint8 image
    assert x.shape == caffe_data.shape and x.dtype == np.float32
    assert np.abs(x - caffe_data).max() <= TOL
    assert np.array_equal(x, caffe_data)  # in fact Caffe's bits
    # the same image as 0-1 floats: pycaffe's Transformer path (which got it centre-cropped,
    # and a mean image cropped likewise), bit for bit
    x01 = mod.preprocess(image01(img)).numpy()
    assert hashlib.sha256(x01.tobytes()).hexdigest() == transformer_sha
    # batches: NHWC and NCHW (told apart by the channel axis), two images
    batch = np.stack([img, img])
    assert np.array_equal(mod.preprocess(batch).numpy()[1], caffe_data[0])
    assert np.array_equal(mod.preprocess(batch.transpose(0, 3, 1, 2)).numpy()[0], caffe_data[0])

    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    model.eval()
    import torch

    with torch.no_grad():
        ours = model(mod.preprocess(img))
        theirs = model(torch.from_numpy(caffe_data))
    ours = ours if isinstance(ours, dict) else {"out": ours}
    theirs = theirs if isinstance(theirs, dict) else {"out": theirs}
    for k in theirs:
        assert torch.equal(ours[k], theirs[k])

    # export onnx --preprocess rgb255: uint8 NHWC images in, the same net input and outputs
    model_onnx = to_onnx(net, input_shapes=shapes, preprocess=spec, pixels="rgb255")
    assert [i.name for i in model_onnx.graph.input] == ["image"]
    props = {p.key: p.value for p in model_onnx.metadata_props}
    meta = json.loads(props["caffe_surgery.preprocess"])
    assert meta["pixels"] == "rgb255" and meta["input"] == "data"
    assert "input 'image'" in model_onnx.doc_string
    import onnx

    onnx.checker.check_model(model_onnx, full_check=True)
    model_onnx.graph.output.append(onnx.helper.make_tensor_value_info(
        "data", onnx.TensorProto.FLOAT, list(caffe_data.shape)))  # expose the net input
    got = run_onnx(model_onnx, {"image": img[None]}, device="cpu")
    assert np.abs(got["data"] - caffe_data).max() <= TOL
    for k, ref in theirs.items():
        name = k if k != "out" else next(n for n in got if n != "data")
        ref = ref.numpy()
        err = np.abs(got[name] - ref).max() / max(np.abs(ref).max(), 1e-12)
        assert err <= 1e-4, (name, err)  # onnxruntime vs torch: float32 rounding only


def test_onnx_rgb01_and_free_image_size(tmp_path):
    """rgb01 input, and with mean values and a crop the image size is free (offsets computed
    in the graph): two sizes give Caffe's centre crops."""
    from surgery.export.onnx import run_onnx, to_onnx

    rel, _, size = CASES["squeezenet"]
    g = SHARED_GOLDEN / "squeezenet_v1_1"
    net = surgery.load(g / "net.prototxt", g / "weights.caffemodel")
    spec = preprocess_spec(surgery.load(ZOO / rel))
    m = to_onnx(net, input_shapes={"data": (1, 3, size, size)}, preprocess=spec,
                pixels="rgb01")
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, "H", "W", 3]
    import onnx

    m.graph.output.append(onnx.helper.make_tensor_value_info(
        "data", onnx.TensorProto.FLOAT, [1, 3, size, size]))
    caffe_data, sha = _caffe("squeezenet")
    got = run_onnx(m, {"image": image01(centre(make_image(241, 301), size))[None]}, "cpu")
    assert hashlib.sha256(got["data"].tobytes()).hexdigest() == sha
    for hw in [(241, 301), (260, 229)]:
        img = make_image(*hw)
        got = run_onnx(m, {"image": image01(img)[None]}, "cpu")["data"]
        assert np.abs(got - apply_spec(spec, image01(img))).max() <= TOL


# -- small nets: options, errors, layouts, the CLI ---------------------------------------------
DEPLOY = """name: "tiny"
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
"""

TRAIN_VAL = """name: "tv"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 6 mirror: true mean_value: 1 mean_value: 2 mean_value: 3 }
  data_param { source: "x" batch_size: 4 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 6 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5 }
  data_param { source: "y" batch_size: 2 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "silence" type: "Silence" bottom: "label" }
"""


def _write(tmp_path: Path, text: str, name: str = "net.prototxt") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_spec_from_test_layer_and_reference(tmp_path):
    net = surgery.load(_write(tmp_path, TRAIN_VAL))
    spec = preprocess_spec(net)
    assert spec.origin == "transform_param of layer 'data' (TEST)"
    assert spec.mean_values == (10.0, 20.0, 30.0) and spec.scale == 0.5 and spec.crop_size == 6
    img = np.arange(9 * 8 * 3, dtype=np.uint8).reshape(9, 8, 3)
    # an independent computation: Caffe's TEST transform on the BGR image
    bgr = img[..., ::-1].transpose(2, 0, 1).astype(np.float32)
    h0, w0 = (9 - 6) // 2, (8 - 6) // 2
    want = (bgr[:, h0:h0 + 6, w0:w0 + 6] - np.float32([10, 20, 30])[:, None, None]) * 0.5
    assert np.array_equal(apply_spec(spec, img)[0], want)
    rgb = preprocess_spec(net, input_order="rgb")  # a net trained on RGB: no swap
    assert not rgb.swap
    want_rgb = (img.transpose(2, 0, 1)[:, h0:h0 + 6, w0:w0 + 6].astype(np.float32)
                - np.float32([10, 20, 30])[:, None, None]) * 0.5
    assert np.array_equal(apply_spec(rgb, img)[0], want_rgb)


def test_deploy_needs_options(tmp_path):
    net = surgery.load(_write(tmp_path, DEPLOY))
    assert preprocess_spec(net) is None
    spec = preprocess_spec(net, mean_values=[5])
    assert spec.input == "data" and spec.channels == 3 and spec.mean_values == (5.0,)
    with pytest.raises(DataError, match="2 mean values for 3 channels"):
        preprocess_spec(net, mean_values=[1, 2])


def test_mean_image_size_errors_and_crop_inferred(tmp_path):
    from surgery.data.mean import write_mean

    net = surgery.load(_write(tmp_path, DEPLOY))
    mean = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8) / 4
    write_mean(tmp_path / "m.binaryproto", mean)
    spec = preprocess_spec(net, mean_file=str(tmp_path / "m.binaryproto"))
    assert spec.crop_size == 6 and "crop_size 6" in spec.origin  # the input's size
    img = np.full((8, 8, 3), 9, np.uint8)
    got = apply_spec(spec, img)[0]
    assert np.array_equal(got, 9 - mean[:, 1:7, 1:7])
    with pytest.raises(DataError, match="resize them to 8x8"):
        apply_spec(spec, np.zeros((9, 8, 3), np.uint8))


def test_generated_preprocess_layouts_and_errors(tmp_path):
    from surgery.export.torch import save_torch

    text = DEPLOY.replace('top: "data"', 'top: "in\\"put\'\\n"').replace(
        'bottom: "data"', 'bottom: "in\\"put\'\\n"')
    net = surgery.load(_write(tmp_path, text))
    spec = preprocess_spec(net, mean_values=[1, 2, 3], scale=2.0, crop_size=4,
                           input_shapes={'in"put\'\n': (1, 3, 4, 4)})
    save_torch(net, tmp_path / "out", "test", {'in"put\'\n': (1, 3, 4, 4)}, missing="fill",
               preprocess=spec)
    mod = _import(tmp_path / "out")
    img = np.random.default_rng(0).integers(0, 256, (2, 7, 5, 3), dtype=np.uint8)
    want = apply_spec(spec, img)
    assert np.array_equal(mod.preprocess(img).numpy(), want)
    assert np.array_equal(mod.preprocess(img.transpose(0, 3, 1, 2)).numpy(), want)
    f01 = img.astype(np.float32) / np.float32(255)
    assert np.array_equal(mod.preprocess(f01).numpy(), apply_spec(spec, f01))
    assert np.array_equal(mod.preprocess(img.astype(np.float32), pixel_range=255).numpy(), want)
    with pytest.raises(ValueError, match="cannot tell NHWC from NCHW"):
        mod.preprocess(np.zeros((1, 3, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="are 5x3 .HxW., smaller than crop_size 4"):
        mod.preprocess(np.zeros((1, 3, 5, 3), np.uint8), layout="NCHW")  # layout taken
    with pytest.raises(ValueError, match="are 3x9 .HxW., smaller than crop_size 4"):
        mod.preprocess(np.zeros((3, 9, 3), np.uint8))


def test_cli_export_torch_and_onnx(tmp_path, capsys):
    import onnx

    tv = _write(tmp_path, TRAIN_VAL)
    out = tmp_path / "t"
    assert main(["export", "torch", str(tv), "-o", str(out), "--fill-missing"]) == 0
    assert "preprocess(images) -> 'data'" in capsys.readouterr().out
    assert json.loads((out / "preprocess.json").read_text())["scale"] == 0.5
    # without --preprocess the ONNX model is the plain one
    plain = tmp_path / "plain.onnx"
    assert main(["export", "onnx", str(tv), "-o", str(plain), "--fill-missing"]) == 0
    m = onnx.load(str(plain))
    assert [i.name for i in m.graph.input] == ["data"] and not m.metadata_props
    pre = tmp_path / "pre.onnx"
    assert main(["export", "onnx", str(tv), "-o", str(pre), "--fill-missing",
                 "--preprocess", "rgb255"]) == 0
    m2 = onnx.load(str(pre))
    assert [i.name for i in m2.graph.input] == ["image"]
    assert m2.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    capsys.readouterr()
    # a deploy net: --preprocess needs the steps; options need --preprocess
    dep = _write(tmp_path, DEPLOY, "deploy.prototxt")
    bad = tmp_path / "bad.onnx"
    assert main(["export", "onnx", str(dep), "-o", str(bad), "--fill-missing",
                 "--preprocess", "rgb01"]) == 2
    assert "--mean-value" in capsys.readouterr().err and not bad.exists()
    assert main(["export", "onnx", str(dep), "-o", str(bad), "--fill-missing",
                 "--mean-value", "1,2,3"]) == 2
    assert "--preprocess" in capsys.readouterr().err and not bad.exists()
    assert main(["export", "onnx", str(dep), "-o", str(bad), "--fill-missing",
                 "--mean-value", "1,2,3", "--input-order", "rgb", "--preprocess", "rgb01"]) == 0
    d = tmp_path / "dep"
    assert main(["export", "torch", str(dep), "-o", str(d), "--fill-missing"]) == 0
    assert "no preprocessing carried" in capsys.readouterr().out
    assert not (d / "preprocess.json").exists()
    shutil.rmtree(d)
    assert main(["export", "torch", str(dep), "-o", str(d), "--fill-missing",
                 "--mean-value", "104,117,123", "--scale", "0.017"]) == 0
    assert json.loads((d / "preprocess.json").read_text())["mean_values"] == [104, 117, 123]


def test_export_torch_goes_on_without_the_mean_file(tmp_path, capsys):
    # a zoo train_val names a mean file that is not here: the export is written without
    # preprocess(), and the report says why and how to carry it
    text = TRAIN_VAL.replace("mean_value: 10 mean_value: 20 mean_value: 30",
                             'mean_file: "nowhere/mean.binaryproto"')
    tv = _write(tmp_path, text)
    out = tmp_path / "t"
    assert main(["export", "torch", str(tv), "-o", str(out), "--fill-missing"]) == 0
    said = capsys.readouterr().out
    assert "no preprocessing carried" in said and "nowhere/mean.binaryproto" in said
    assert "--mean-file" in said and not (out / "preprocess.json").exists()
