"""Trained PyTorch weights back to Caffe: to_caffemodel and ``surgery import-torch``.

The end-to-end check trains one step in torch on the mobilenet_v1 golden (BatchNorm + Scale,
its own weights), writes the caffemodel back and runs it through OpenCV (as surgery verify's
opencv backend does) and our numpy reference: both must give the torch module's eval outputs
within 1e-5 relative, while the original weights are far off (the step matters)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import surgery  # noqa: E402
from surgery.cli import main  # noqa: E402
from surgery.errors import NetError  # noqa: E402
from surgery.export import (  # noqa: E402
    reference,
    save_torch,
    to_caffemodel,
    to_torch,
    weights_from_torch,
)
from surgery.net import NetState, Param  # noqa: E402

from .conftest import GOLDEN, ROOT  # noqa: E402

MOBILENET = GOLDEN / "mobilenet_v1"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


def _numpy_forward(net: surgery.Net, inputs: dict[str, np.ndarray], blob: str) -> np.ndarray:
    """The numpy reference (surgery.export.reference), layer by layer in TEST."""
    flow = surgery.resolve(net, NetState("TEST"))
    env: dict[int, np.ndarray] = {}
    for node in flow.nodes:
        if node.layer.type == "Input":
            for v in node.outputs:
                env[id(v)] = inputs[v.name]
            continue
        outs = reference.forward(node.layer, [env[id(v)] for v in node.inputs])
        for v, o in zip(node.outputs, outs, strict=True):
            env[id(v)] = o
    return env[id(flow.latest(blob))]


def _opencv_forward(prototxt: Path, weights: Path, inputs: dict[str, np.ndarray],
                    blob: str) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    cvnet = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    if hasattr(cvnet, "enableWinograd"):
        cvnet.enableWinograd(False)
    cvnet.enableFusion(False)
    cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, x in inputs.items():
        cvnet.setInput(np.ascontiguousarray(x), name)
    return np.asarray(cvnet.forward(blob))


def test_one_torch_step_on_mobilenet_back_to_caffe(tmp_path: Path) -> None:
    net = surgery.load(MOBILENET / "net.prototxt", MOBILENET / "weights.caffemodel")
    for lay in net.layers:  # the golden pins them; a train_val net would not
        if lay.type == "BatchNorm":
            lay.attrs.pop("use_global_stats", None)
    (tmp_path / "net.prototxt").write_text(surgery.caffe_io.net_to_text(net))
    # a 64x64 crop of the golden input (global pooling takes any size): keeps the test fast
    inputs = {"data": np.load(MOBILENET / "input.npz")["data"][:, :, 80:144, 80:144].copy()}
    model = to_torch(net, input_shapes={"data": inputs["data"].shape})
    for m in model.modules():  # a faster moving average than Caffe's 0.999: visible stats
        if type(m).__name__ == "CaffeBatchNorm":
            m.momentum = 0.3
    model.train()  # batch statistics, moving averages updated, as Caffe's TRAIN
    g = torch.Generator().manual_seed(0)
    crop = torch.from_numpy(inputs["data"]).repeat(2, 1, 1, 1)
    x = crop + 10 * torch.randn(crop.shape, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=2e-3)
    loss = -model(x).reshape(2, -1)[:, 3].log().mean()
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(inputs["data"])).numpy()
        # the same module in float64: its exact values, free of float32 rounding (which
        # reaches 1.3e-5 at prob between Caffe and torch on this 28-convolution net)
        exact = copy.deepcopy(model).double()(torch.from_numpy(inputs["data"]).double()).numpy()

    path = tmp_path / "trained.caffemodel"
    report = to_caffemodel(model, net, path)
    assert report.data["counts"] == {"written": 82, "kept": 0, "left_out": 0}
    back = surgery.load(tmp_path / "net.prototxt", path)
    bn = back.layer("conv1/bn")
    mod = model.get_submodule("conv1_bn")
    # the golden's factor 8, advanced by the one TRAIN step as Caffe does: 8 * maf + 1
    factor = float(bn.params[2].data[0])
    assert factor == pytest.approx(8.0 * 0.7 + 1.0, rel=1e-6) == mod.caffe_factor
    np.testing.assert_allclose(bn.params[0].data / factor, mod.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(bn.params[1].data / factor, mod.running_var.numpy(), rtol=1e-6)
    assert not np.allclose(bn.params[0].data, net.layer("conv1/bn").params[0].data, rtol=1e-3)
    np.testing.assert_array_equal(back.layer("conv1/scale").params[1].data,
                                  model.get_parameter("conv1_scale.bias").detach().numpy())

    cv = _opencv_forward(tmp_path / "net.prototxt", path, inputs, "prob")
    ref = _numpy_forward(back, inputs, "prob")
    # each float32 implementation of the written caffemodel within 1e-5 of the module's exact
    # outputs (measured: OpenCV 9.0e-6, numpy reference 3.6e-6); float32 torch against float32
    # OpenCV adds two roundings (measured 1.3e-5; float32 torch alone is 2.2e-5 from exact)
    assert _rel(cv, exact) <= 1e-5
    assert _rel(ref, exact) <= 1e-5
    assert _rel(cv, want) <= 2e-5
    old = _opencv_forward(tmp_path / "net.prototxt", MOBILENET / "weights.caffemodel", inputs,
                          "prob")
    assert _rel(old, want) > 0.1  # the step changed the outputs


TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip_a" type: "InnerProduct" bottom: "conv1" top: "ip_a"
  param { name: "shared_w" } param { name: "shared_b" }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "conv1" top: "ip_b"
  param { name: "shared_w" } param { name: "shared_b" }
  inner_product_param { num_output: 5 } }
layer { name: "ip_t" type: "InnerProduct" bottom: "ip_a" top: "ip_t"
  inner_product_param { num_output: 3 transpose: true weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "ip_a" bottom: "ip_b" top: "sum" }
"""


def _tiny(tmp_path: Path) -> surgery.Net:
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    net = surgery.load(p)
    rng = np.random.default_rng(0)
    from surgery.fillers import fill, layer_fillers

    shapes = {"conv1": [(4, 3, 3, 3), (4,)], "sc1": [(4,), (4,)], "prelu1": [(4,)],
              "ip_a": [(5, 144), (5,)], "ip_b": [(5, 144), (5,)], "ip_t": [(5, 3), (3,)]}
    for name, blob_shapes in shapes.items():
        lay = net.layer(name)
        while len(lay.params) < len(blob_shapes):
            lay.params.append(Param())
        fillers = layer_fillers(lay)
        for i, s in enumerate(blob_shapes):
            data = fill(fillers[i] if i < len(fillers) else None, s, rng)
            lay.params[i].data = np.asarray(data + rng.normal(0, 0.1, s), np.float32)
    net.layer("ip_b").params[0].data = net.layer("ip_a").params[0].data
    net.layer("ip_b").params[1].data = net.layer("ip_a").params[1].data
    bn = net.layer("bn1")
    bn.params = [Param(np.asarray(v, np.float32), lr_mult=0.0) for v in
                 (rng.normal(0, 1, 4) * 4, rng.uniform(1, 2, 4) * 4, [4.0])]
    return net


def test_round_trip_is_exact_and_covers_every_blob_kind(tmp_path: Path) -> None:
    """Scale, PReLU, transposed InnerProduct, shared blobs and BatchNorm come back bit for
    bit (a power-of-two factor divides and multiplies exactly)."""
    net = _tiny(tmp_path)
    model = to_torch(net)
    back, report = weights_from_torch(model, net)
    for lay in net.layers:
        for i, p in enumerate(lay.params):
            got = back.layer(lay.name).params[i].data
            np.testing.assert_array_equal(got, p.data, err_msg=f"{lay.name} blob {i}")
            assert got.dtype == np.float32 and got.shape == p.data.shape
    assert report.data["counts"]["written"] == 7
    # bn_factor=1 writes the statistics themselves
    back1, _ = weights_from_torch(model, net, bn_factor=1.0)
    np.testing.assert_array_equal(back1.layer("bn1").params[0].data,
                                  net.layer("bn1").params[0].data / 4)
    assert back1.layer("bn1").params[2].data.tolist() == [1.0]


def test_state_dict_errors_name_every_blob(tmp_path: Path) -> None:
    net = _tiny(tmp_path)
    model = to_torch(net)
    state = dict(model.state_dict())
    del state["conv1.bias"]
    state["prelu1.weight"] = torch.zeros(7)
    with pytest.raises(NetError, match=r"2 blob\(s\).*'conv1' blob 1.*'prelu1' blob 0"):
        weights_from_torch(state, net, caffe_names=model.caffe_names)
    # prefixes from torch.compile / DDP are ignored
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    back, _ = weights_from_torch(wrapped, net, caffe_names=model.caffe_names)
    np.testing.assert_array_equal(back.layer("conv1").params[0].data,
                                  net.layer("conv1").params[0].data)


def test_cli_import_torch(tmp_path: Path) -> None:
    """export torch -> change the weights in torch -> import-torch -> the caffemodel computes
    what the changed module computes; no torch import on this path."""
    from safetensors.torch import save_model

    net = _tiny(tmp_path)
    surgery.save(net, tmp_path / "tiny.prototxt", tmp_path / "tiny.caffemodel")
    out = tmp_path / "exp"
    assert main(["export", "torch", str(tmp_path / "tiny.prototxt"), "--weights",
                 str(tmp_path / "tiny.caffemodel"), "-o", str(out)]) == 0
    assert (out / "net.prototxt").is_file()
    model = to_torch(net)
    with torch.no_grad():
        model.get_parameter("ip_a.weight").mul_(2.0)  # shared with ip_b
        model.get_buffer("bn1.running_mean").add_(1.0)
    save_model(model, str(tmp_path / "trained.safetensors"))
    w = tmp_path / "back.caffemodel"
    code = (
        "import sys; from surgery.cli import main; "
        f"rc = main(['import-torch', {str(out)!r}, '--state-dict', "
        f"{str(tmp_path / 'trained.safetensors')!r}, '-o', {str(w)!r}, '--json']); "
        "bad = [m for m in ('torch', 'onnx', 'cv2') if m in sys.modules]; "
        "print('IMPORTED', bad); sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "IMPORTED []" in res.stdout
    rep = json.loads(res.stdout[: res.stdout.index("IMPORTED")])
    assert rep["data"]["counts"]["written"] == 7
    back = surgery.load(tmp_path / "tiny.prototxt", w)
    for name in ("ip_a", "ip_b"):
        np.testing.assert_array_equal(back.layer(name).params[0].data,
                                      net.layer("ip_a").params[0].data * 2)
    np.testing.assert_allclose(back.layer("bn1").params[0].data,
                               net.layer("bn1").params[0].data + 4.0, rtol=1e-6)  # factor 4
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x))["sum"].numpy()
    got = _numpy_forward(back, {"data": x}, "sum")
    assert _rel(got, want) <= 1e-5


def test_cli_import_torch_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _tiny(tmp_path)
    save_torch(net, tmp_path / "exp")
    w = tmp_path / "w.caffemodel"
    assert main(["import-torch", str(tmp_path / "nope"), "-o", str(w)]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    from safetensors.numpy import save_file

    save_file({"conv1.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(bad))
    assert main(["import-torch", str(tmp_path / "exp"), "--state-dict", str(bad),
                 "-o", str(w)]) == 2
    err = capsys.readouterr().err
    assert "cannot be written back" in err and "conv1.bias" in err
    assert main(["import-torch", str(tmp_path / "exp"), "-o",
                 str(tmp_path / "exp" / "weights.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "would overwrite the input" in err and "--in-place" not in err
    (tmp_path / "exp" / "net.prototxt").unlink()
    assert main(["import-torch", str(tmp_path / "exp"), "-o", str(w)]) == 2
    assert "--net" in capsys.readouterr().err
    assert not w.exists()
    # a torch checkpoint is read with weights_only=True
    pt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": to_torch(net).state_dict(), "epoch": 3}, pt)
    assert main(["import-torch", str(tmp_path / "exp"), "--net", str(tmp_path / "tiny.prototxt"),
                 "--state-dict", str(pt), "-o", str(w)]) == 0
    assert w.exists()


def test_caffe_reads_the_written_caffemodel_as_torch_computes(tmp_path: Path) -> None:
    """The real Caffe ran a caffemodel to_caffemodel wrote (BatchNorm factor 999.98, Scale,
    PReLU, a grouped convolution): its outputs, recorded once by
    tools/record_import_torch_caffe.py into tests/data/import_torch_caffe.npz, equal the torch
    module holding the same tensors, and OpenCV / our numpy reference on the caffemodel written
    now, within 1e-5."""
    data = ROOT / "tests" / "data"
    rec = dict(np.load(data / "import_torch_caffe.npz"))
    state = {k[len("state/"):]: v for k, v in rec.items() if k.startswith("state/")}
    net = surgery.load(data / "import_torch_net.prototxt")
    model = to_torch(net, keep_blobs=True, missing="fill")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(rec["input"]))
    for blob in ("ip", "prob"):
        assert _rel(out[blob].numpy(), rec[f"caffe_{blob}"]) <= 1e-5, blob
    path = tmp_path / "w.caffemodel"
    to_caffemodel(state, net, path, caffe_names=model.caffe_names, bn_factor=999.98)
    back = surgery.load(data / "import_torch_net.prototxt", path)
    assert back.layer("bn1").params[2].data.tolist() == [np.float32(999.98)]
    inputs = {"data": rec["input"]}
    for blob in ("ip", "prob"):
        cv = _opencv_forward(data / "import_torch_net.prototxt", path, inputs, blob)
        assert _rel(cv, rec[f"caffe_{blob}"]) <= 1e-5, blob
        assert _rel(_numpy_forward(back, inputs, blob), rec[f"caffe_{blob}"]) <= 1e-5, blob


def test_written_net_does_not_alias_the_live_module() -> None:
    """The returned net's arrays are copies: training on does not change them."""
    net = surgery.load(ROOT / "tests" / "data" / "import_torch_net.prototxt")
    model = to_torch(net, missing="fill")
    back, _ = weights_from_torch(model, net)
    before = back.layer("conv1").params[0].data.copy()
    with torch.no_grad():
        model.get_parameter("conv1.weight").add_(1.0)
    np.testing.assert_array_equal(back.layer("conv1").params[0].data, before)
    assert not back.layer("conv1").params[0].data.flags.writeable
