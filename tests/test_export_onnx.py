"""The ONNX export: goldens blob by blob, ONNX-specific lowerings, fold-bn, external data, errors.

Every golden net is exported with every blob exposed and run on onnxruntime (CPU); each blob
Caffe stored (``outputs.npz``, Caffe's inserted ``*_split_*`` copies included) and the 64 probed
positions of every larger blob (``probes.json``) must match within ``meta['tolerance']``.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import surgery  # noqa: E402
from surgery.dataflow import resolve  # noqa: E402
from surgery.errors import NetError, SurgeryError, UnsupportedLayerError  # noqa: E402
from surgery.export import onnx as onnx_export  # noqa: E402
from surgery.export import reference  # noqa: E402
from surgery.export.onnx import run_onnx, save_onnx, to_onnx  # noqa: E402
from surgery.layers import param_field_for  # noqa: E402
from surgery.net import Layer, Net, NetState, Param  # noqa: E402
from surgery.shapes import infer  # noqa: E402

from .conftest import GOLDEN  # noqa: E402

GOLDENS = sorted(p.name for p in GOLDEN.iterdir() if (p / "meta.json").is_file())


def _golden(name: str) -> tuple[Net, dict[str, np.ndarray], dict[str, Any]]:
    d = GOLDEN / name
    meta = json.loads((d / "meta.json").read_text())
    net = surgery.load(d / "net.prototxt", d / meta["weights"])
    with np.load(d / "input.npz") as z:
        feed = {k: z[k] for k in z.files}
    return net, feed, meta


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).reshape(np.shape(b))
    scale = float(np.max(np.abs(b))) if np.size(b) else 0.0
    return float(np.max(np.abs(a - b))) / max(scale, 1e-30) if np.size(b) else 0.0


def _caffe_name_to_tensor(net: Net) -> dict[str, str]:
    """Caffe's stored blob names -> our tensor names (split copies -> the version they copy)."""
    flow = resolve(net, NetState("TEST"))
    out: dict[str, str] = {}
    for node in flow.nodes:
        for v in node.outputs:
            last = flow.latest(v.name) is v
            tensor = v.name if last else f"{v.name}@{node.layer.name}"
            out[v.name] = v.name
            for i in range(16):
                out[f"{v.name}_{node.layer.name}_{v.top_index}_split_{i}"] = tensor
    return out


# -- goldens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GOLDENS)
def test_golden_every_blob(name: str) -> None:
    net, feed, meta = _golden(name)
    d = GOLDEN / name
    model = to_onnx(net, input_shapes={k: v.shape for k, v in feed.items()}, expose_blobs=True)
    onnx.checker.check_model(model, full_check=True)
    got = {**feed, **run_onnx(model, feed, device="cpu")}  # split copies of inputs included
    names = _caffe_name_to_tensor(net)
    tol = float(meta["tolerance"])
    det = {b for b in meta["outputs"] if "detection" in b}
    compared = 0
    with np.load(d / "outputs.npz") as z:
        for blob in z.files:
            if blob in feed or blob in det:
                continue
            tensor = names[blob]
            assert tensor in got, f"{name}: blob {blob!r} ({tensor}) is not in the export"
            assert got[tensor].size == z[blob].size, (blob, got[tensor].shape, z[blob].shape)
            err = rel_err(got[tensor], z[blob])
            assert err <= tol, f"{name}: {blob} rel err {err:.3g} > {tol}"
            compared += 1
    probes = json.loads((d / "probes.json").read_text())
    for blob, probe in probes.items():
        if blob in feed or blob in det:
            continue
        flat = got[names[blob]].reshape(-1)
        assert flat.size == int(np.prod(probe["shape"])), blob
        err = rel_err(flat[np.asarray(probe["index"])], np.asarray(probe["value"]))
        assert err <= tol, f"{name}: probe {blob} rel err {err:.3g} > {tol}"
    assert compared > 0
    for out in meta["outputs"]:  # every net output is a graph output under its Caffe name
        if out not in det:
            assert out in {o.name for o in model.graph.output}


@pytest.mark.parametrize("name", ["face_res10", "mobilenet_ssd"])
def test_ssd_exposes_detection_output_bottoms(name: str) -> None:
    net, feed, meta = _golden(name)
    model = to_onnx(net)
    outputs = [o.name for o in model.graph.output]
    assert sorted(outputs) == ["mbox_conf_flatten", "mbox_loc", "mbox_priorbox"]
    assert "DetectionOutput" in model.doc_string
    got = run_onnx(model, feed, device="cpu")
    probes = json.loads((GOLDEN / name / "probes.json").read_text())
    with np.load(GOLDEN / name / "outputs.npz") as z:
        for blob in outputs:
            probe = probes[blob]
            assert list(got[blob].shape) == probe["shape"], blob
            picked = got[blob].reshape(-1)[np.asarray(probe["index"])]
            err = rel_err(picked, np.asarray(probe["value"]))
            if blob in z.files:
                err = max(err, rel_err(got[blob], z[blob]))
            # the priors are a constant computed at export: exact
            assert err <= (0.0 if blob == "mbox_priorbox" else meta["tolerance"]), (blob, err)


def test_model_format_names_and_initializers() -> None:
    net, _, _ = _golden("mobilenet_v1")
    model = to_onnx(net, opset=17)
    assert model.opset_import[0].version == 17
    assert model.ir_version == 8
    inits = {t.name for t in model.graph.initializer}
    assert {"conv1.0", "conv2_1/dw.0"} <= inits
    produced = {o for n in model.graph.node for o in n.output}
    # conv1 is rewritten in place by conv1/bn, conv1/scale, relu1: the last keeps the name
    assert "conv1" in produced
    assert {"conv1@conv1", "conv1@conv1/bn", "conv1@conv1/scale"} <= produced
    assert [o.name for o in model.graph.output] == ["prob"]


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_opsets_run(opset: int) -> None:
    net, feed, meta = _golden("cifar10_full")  # LRN, AVE pooling, Softmax
    got = run_onnx(to_onnx(net, opset=opset), feed)
    want = np.load(GOLDEN / "cifar10_full" / "outputs.npz")["prob"]
    assert rel_err(got["prob"], want) <= meta["tolerance"]


def test_opset_out_of_range() -> None:
    net, _, _ = _golden("lenet")
    with pytest.raises(SurgeryError, match="opset 11"):
        to_onnx(net, opset=11)


def test_dynamic_batch() -> None:
    net, feed, _ = _golden("squeezenet_v1_1")
    shapes = {"data": feed["data"].shape}
    model = to_onnx(net, dynamic_batch=True, input_shapes=shapes)
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.concatenate([feed["data"], feed["data"][:1]])
    got = run_onnx(model, {"data": x})["prob"]
    ref = run_onnx(to_onnx(net, input_shapes=shapes), feed)["prob"]
    assert got.shape[0] == 3
    np.testing.assert_allclose(got[:2], ref, rtol=1e-5, atol=1e-6)


def test_dynamic_batch_ssd_reshape() -> None:
    net, feed, _ = _golden("mobilenet_ssd")
    model = to_onnx(net, dynamic_batch=True)
    x = np.concatenate([feed["data"], feed["data"]])
    got = run_onnx(model, {"data": x})
    ref = run_onnx(to_onnx(net), feed)
    assert got["mbox_conf_flatten"].shape[0] == 2
    assert got["mbox_priorbox"].shape[0] == 1
    dims = {o.name: o.type.tensor_type.shape.dim[0] for o in model.graph.output}
    assert dims["mbox_loc"].dim_param == "N" and dims["mbox_priorbox"].dim_value == 1
    np.testing.assert_allclose(got["mbox_conf_flatten"][1:], ref["mbox_conf_flatten"],
                               rtol=1e-5, atol=1e-6)


def test_providers_cpu_and_cuda_selection() -> None:
    assert onnx_export.providers("cpu") == ["CPUExecutionProvider"]
    auto = onnx_export.providers("auto")
    assert auto[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert auto[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(SurgeryError, match="onnxruntime-gpu"):
            onnx_export.providers("cuda")


# -- fold-bn ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mobilenet_v1", "open_nsfw_real"])
def test_fold_bn_keeps_outputs(name: str) -> None:
    net, feed, meta = _golden(name)
    plain = to_onnx(net)
    folded = to_onnx(net, fold_bn=True)
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node]
    assert "BatchNormalization" not in ops
    assert len(ops) < len(plain.graph.node)
    assert "folded" in folded.doc_string
    a = run_onnx(plain, feed)["prob"]
    b = run_onnx(folded, feed)["prob"]
    assert rel_err(b, a) <= meta["tolerance"]
    want = np.load(GOLDEN / name / "outputs.npz")["prob"]
    assert rel_err(b, want) <= meta["tolerance"]
    # weights are never written into: the net's arrays are unchanged
    assert not net.layer("conv1" if name == "mobilenet_v1" else "conv_1").params[0].data.flags[
        "WRITEABLE"]


def test_fold_bn_keeps_blob_names_when_exposed() -> None:
    net, feed, meta = _golden("mobilenet_v1")
    folded = to_onnx(net, fold_bn=True, expose_blobs=True)
    got = run_onnx(folded, feed)
    with np.load(GOLDEN / "mobilenet_v1" / "outputs.npz") as z:
        for blob in ("conv1", "conv6/dw", "pool6"):
            if blob in z.files:
                assert rel_err(got[blob], z[blob]) <= meta["tolerance"], blob


# -- external data ----------------------------------------------------------------------------
def test_external_data_path(tmp_path: Path) -> None:
    net, feed, _ = _golden("lenet")
    out = tmp_path / "lenet.onnx"
    shapes = {"data": feed["data"].shape}
    save_onnx(net, out, input_shapes=shapes, external_threshold=1024)  # a mocked 2 GiB limit
    data = tmp_path / "lenet.onnx.data"
    assert out.is_file() and data.is_file()
    assert out.stat().st_size < 100_000 < data.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["prob"], {"data": feed["data"]})[0]
    ref = run_onnx(to_onnx(net, input_shapes=shapes), feed)["prob"]
    np.testing.assert_array_equal(got, ref)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_failed_save_keeps_the_existing_model_and_data(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    net, feed, _ = _golden("lenet")
    out = tmp_path / "lenet.onnx"
    data = tmp_path / "lenet.onnx.data"
    shapes = {"data": feed["data"].shape}
    save_onnx(net, out, input_shapes=shapes, external_threshold=1024)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {out.name, data.name}

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise onnx.checker.ValidationError("refused for the test")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    with pytest.raises(SurgeryError, match="checker refused"):
        save_onnx(net, out, input_shapes=shapes, external_threshold=1024)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_small_model_is_one_file(tmp_path: Path) -> None:
    net, _, _ = _golden("lenet")
    out = tmp_path / "m.onnx"
    save_onnx(net, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    model = onnx.load(str(out))
    assert {t.name for t in model.graph.initializer} >= {"conv1.0", "conv1.1", "ip2.0"}


# -- errors -----------------------------------------------------------------------------------
def _small_net(extra: list[Layer], weights: bool = True) -> Net:
    rng = np.random.default_rng(0)
    layers = [
        Layer("input", "Input", [], ["data"], attrs={"shape": [{"dim": [1, 3, 8, 8]}]},
              param_field="input_param"),
        Layer("conv1", "Convolution", ["data"], ["conv1"],
              attrs={"num_output": 4, "kernel_size": [3]}, param_field="convolution_param",
              params=[Param(rng.normal(size=(4, 3, 3, 3)).astype(np.float32) if weights
                            else None),
                      Param(np.zeros(4, np.float32) if weights else None)]),
        *extra,
    ]
    return Net("small", layers)


def test_unsupported_layers_listed_at_once() -> None:
    net = _small_net([
        Layer("odd1", "FancyOp", ["conv1"], ["odd1"]),
        Layer("relu", "ReLU", ["odd1"], ["odd1"]),
        Layer("odd2", "OtherOp", ["odd1"], ["odd2"]),
    ])
    with pytest.raises(UnsupportedLayerError) as err:
        to_onnx(net)
    msg = str(err.value)
    assert "'odd1' (FancyOp)" in msg and "'odd2' (OtherOp)" in msg


def test_unsupported_configurations_listed_at_once() -> None:
    net = _small_net([
        Layer("pool", "Pooling", ["conv1"], ["pool"], attrs={"pool": "STOCHASTIC",
                                                             "kernel_size": 2},
              param_field="pooling_param"),
        Layer("up", "Upsample", ["pool", "pool"], ["up"], attrs={"scale": 2}),
    ])
    with pytest.raises(UnsupportedLayerError) as err:
        to_onnx(net)
    assert "'pool'" in str(err.value) and "'up'" in str(err.value)


def test_missing_weights_one_clear_error() -> None:
    net = _small_net([
        Layer("ip", "InnerProduct", ["conv1"], ["ip"], attrs={"num_output": 3},
              param_field="inner_product_param", params=[Param(None), Param(None)]),
    ], weights=False)
    with pytest.raises(NetError) as err:
        to_onnx(net)
    msg = str(err.value)
    assert "'conv1'" in msg and "'ip'" in msg and "--weights" in msg


def test_no_partial_file_on_error(tmp_path: Path) -> None:
    net = _small_net([Layer("odd", "FancyOp", ["conv1"], ["odd"])])
    out = tmp_path / "x.onnx"
    with pytest.raises(UnsupportedLayerError):
        save_onnx(net, out)
    assert list(tmp_path.iterdir()) == []


def test_registering_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already"):
        onnx_export.lowering("ReLU")(lambda g, node, xs, ys: None)


def test_table_matches_torch() -> None:
    pytest.importorskip("torch")
    from surgery.export.torch import torch_supported_types

    assert onnx_export.supported_types() == torch_supported_types()


def test_test_phase_drops_loss_and_accuracy(tmp_path: Path) -> None:
    net = _small_net([
        Layer("label", "Input", [], ["label"], attrs={"shape": [{"dim": [1]}]},
              param_field="input_param"),
        Layer("ip", "InnerProduct", ["conv1"], ["ip"], attrs={"num_output": 5},
              param_field="inner_product_param",
              params=[Param(np.ones((5, 144), np.float32)), Param(np.zeros(5, np.float32))]),
        Layer("loss", "SoftmaxWithLoss", ["ip", "label"], ["loss"]),
        Layer("acc", "Accuracy", ["ip", "label"], ["acc"]),
    ])
    model = to_onnx(net)
    assert [o.name for o in model.graph.output] == ["ip"]
    assert "loss" in model.doc_string and "acc" in model.doc_string


# -- ONNX-specific lowerings vs the numpy reference ---------------------------------------------
A = (2, 3, 7, 9)
TRICKY: list[tuple[str, str, dict[str, Any], list[tuple[int, ...]]]] = [
    # pooling: ceil overhang with and without pad, the clip rule on both axes, floor crop
    ("pool_ave_overhang_nopad", "Pooling", {"pool": "AVE", "kernel_size": 3, "stride": 2},
     [(1, 2, 8, 8)]),
    ("pool_ave_pad_overhang", "Pooling", {"pool": "AVE", "kernel_size": 3, "stride": 2,
                                          "pad": 1}, [(1, 2, 8, 6)]),
    ("pool_ave_pad_h_only", "Pooling", {"pool": "AVE", "kernel_h": 3, "kernel_w": 3,
                                        "stride_h": 2, "stride_w": 2, "pad_h": 1, "pad_w": 0},
     [(1, 2, 6, 8)]),
    ("pool_max_pad_w_only_clip", "Pooling", {"pool": "MAX", "kernel_h": 2, "kernel_w": 2,
                                             "stride_h": 2, "stride_w": 2, "pad_h": 0,
                                             "pad_w": 1}, [(1, 2, 6, 6)]),
    ("pool_ave_floor_crop", "Pooling", {"pool": "AVE", "kernel_size": 3, "stride": 3,
                                        "round_mode": "FLOOR"}, [(1, 2, 8, 10)]),
    ("pool_max_ceil_mode_fork", "Pooling", {"pool": "MAX", "kernel_size": 3, "stride": 2,
                                            "ceil_mode": False}, [(1, 2, 8, 8)]),
    ("pool_ave_kernel_gt_pad_stride1", "Pooling", {"pool": "AVE", "kernel_size": 5,
                                                   "stride": 1, "pad": 2}, [(1, 2, 5, 6)]),
    # deconvolution: explicit pads reach s(i-1) + d(k-1) + 1 - 2p exactly
    ("deconv_pad_dilation", "Deconvolution", {"num_output": 2, "kernel_size": [3],
                                              "stride": [3], "pad": [2], "dilation": [2]},
     [(1, 3, 4, 5)]),
    ("deconv_hw", "Deconvolution", {"num_output": 2, "kernel_h": 4, "kernel_w": 2,
                                    "stride_h": 2, "stride_w": 1, "pad_h": 1, "pad_w": 0},
     [(1, 2, 3, 4)]),
    # LRN within channel: Caffe's AVE pooling of the squares, divisor incl. padding
    ("lrn_within_5", "LRN", {"local_size": 5, "alpha": 2.0, "beta": 0.75,
                             "norm_region": "WITHIN_CHANNEL"}, [(1, 2, 4, 7)]),
    # Eltwise coefficients, Scale/Bias axes
    ("eltwise_coeff_neg", "Eltwise", {"operation": "SUM", "coeff": [-1.0, 0.25]}, [A, A]),
    ("scale_axis0_all", "Scale", {"axis": 0, "num_axes": -1, "bias_term": True}, [A]),
    ("scale_axis2_two_bottoms", "Scale", {"axis": 2}, [A, (7,)]),
    ("scale_neg_axis", "Scale", {"axis": -2, "num_axes": 1}, [A]),
    ("bias_axis1_two_axes", "Bias", {"axis": 1, "num_axes": 2}, [A]),
    ("ip_axis3", "InnerProduct", {"num_output": 4, "axis": 3, "transpose": True}, [A]),
    ("reduction_all", "Reduction", {"operation": "SUMSQ", "axis": 0, "coeff": 2.0}, [A]),
    ("argmax_topk_maxval", "ArgMax", {"top_k": 3, "out_max_val": True}, [(2, 3, 2, 2)]),
]


def _one_layer(case_id: str, ltype: str, attrs: dict[str, Any],
               shapes: list[tuple[int, ...]]) -> tuple[Net, dict[str, np.ndarray]]:
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    names = [f"in{i}" for i in range(len(shapes))]
    layers = [Layer(f"input{i}", "Input", [], [n], attrs={"shape": [{"dim": list(s)}]},
                    param_field="input_param") for i, (n, s) in enumerate(zip(names, shapes,
                                                                                strict=True))]
    layer = Layer("under/test", ltype, names, ["out"], attrs=dict(attrs),
                  param_field=param_field_for(ltype))
    net = Net("one", [*layers, layer])
    flow = resolve(net)
    blobs = infer(flow, check_weights=False).params(flow.node(layer.name))
    layer.params = [Param(rng.normal(0, 0.5, s).astype(np.float32)) for s in blobs]
    feed = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in zip(names, shapes,
                                                                      strict=True)}
    return net, feed


@pytest.mark.parametrize("case", TRICKY, ids=[c[0] for c in TRICKY])
def test_tricky_lowering_vs_reference(case: tuple[str, str, dict[str, Any], list]) -> None:
    net, feed = _one_layer(*case)
    layer = net.layers[-1]
    want = reference.forward(layer, [feed[b] for b in layer.bottoms])[0]
    model = to_onnx(net)
    onnx.checker.check_model(model, full_check=True)
    got = run_onnx(model, feed, device="cpu")["out"]
    assert got.shape == want.shape
    assert rel_err(got, want) <= 2e-5


def test_ave_pool_divisor_correction_used_only_when_needed() -> None:
    net, _ = _one_layer("nopad", "Pooling", {"pool": "AVE", "kernel_size": 2, "stride": 2},
                        [(1, 1, 4, 4)])
    assert "ave_divisor" not in str([t.name for t in to_onnx(net).graph.initializer])
    net, _ = _one_layer("pad", "Pooling", {"pool": "AVE", "kernel_size": 3, "stride": 2,
                                           "pad": 1}, [(1, 1, 6, 6)])
    assert any("ave_divisor" in t.name for t in to_onnx(net).graph.initializer)


# -- TRAIN phase: losses ----------------------------------------------------------------------
def _loss_net(ltype: str, label_shape: tuple[int, ...], extra: dict[str, Any]) -> Net:
    return Net("loss", [
        Layer("x", "Input", [], ["x"], attrs={"shape": [{"dim": [4, 5]}]},
              param_field="input_param"),
        Layer("label", "Input", [], ["label"], attrs={"shape": [{"dim": list(label_shape)}]},
              param_field="input_param"),
        Layer("loss", ltype, ["x", "label"], ["loss"], extra=extra,
              param_field=param_field_for(ltype)),
    ])


@pytest.mark.parametrize("ltype,label,extra", [
    ("SoftmaxWithLoss", "class", {}),
    ("SoftmaxWithLoss", "class", {"loss_param": {"ignore_label": 2}}),
    ("SoftmaxWithLoss", "class", {"loss_param": {"normalization": "BATCH_SIZE"}}),
    ("EuclideanLoss", "dense", {}),
    ("SigmoidCrossEntropyLoss", "binary", {}),
])
def test_train_phase_losses_match_torch(ltype: str, label: str, extra: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    from surgery.export.torch import to_torch

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    if label == "class":
        lab = np.array([0, 2, 4, 2], np.float32)
        shape: tuple[int, ...] = (4,)
    elif label == "binary":
        lab = (rng.random((4, 5)) > 0.5).astype(np.float32)
        shape = (4, 5)
    else:
        lab = rng.normal(size=(4, 5)).astype(np.float32)
        shape = (4, 5)
    net = _loss_net(ltype, shape, extra)
    got = run_onnx(to_onnx(net, phase="TRAIN"), {"x": x, "label": lab})["loss"]
    gm = to_torch(net, "train")
    with torch.no_grad():
        out = gm(torch.from_numpy(x), torch.from_numpy(lab))
    want = (out["loss"] if isinstance(out, dict) else out).numpy()
    assert got.shape == ()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_input_rewritten_in_place_keeps_its_name() -> None:
    """ShuffleNet v2 normalises its input in place (data -> BatchNorm -> Scale): the graph
    input must still be called ``data``; the later versions are ``data@<layer>``."""
    import numpy as np

    from surgery.export.onnx import run_onnx, to_onnx
    from surgery.net import Layer, Net, Param

    rng = np.random.default_rng(0)
    c = 3
    net = Net("inplace_input", [
        Layer("data", "Input", [], ["data"], attrs={"shape": [{"dim": [1, c, 4, 4]}]},
              param_field="input_param"),
        Layer("data/bn", "BatchNorm", ["data"], ["data"], params=[
            Param(data=rng.normal(size=c).astype(np.float32)),
            Param(data=rng.uniform(0.5, 2, size=c).astype(np.float32)),
            Param(data=np.ones(1, np.float32))]),
        Layer("data/scale", "Scale", ["data"], ["data"], attrs={"bias_term": True},
              param_field="scale_param",
              params=[Param(data=rng.normal(size=c).astype(np.float32)),
                      Param(data=rng.normal(size=c).astype(np.float32))]),
        Layer("relu", "ReLU", ["data"], ["out"]),
    ])
    model = to_onnx(net, expose_blobs=True)
    assert [i.name for i in model.graph.input] == ["data"]
    outs = {o.name for o in model.graph.output}
    assert {"out", "data@data/bn", "data@data/scale"} <= outs
    x = rng.normal(size=(1, c, 4, 4)).astype(np.float32)
    got = run_onnx(model, {"data": x}, device="cpu")
    bn = net.layers[1].params
    mean, var = bn[0].data[:, None, None], bn[1].data[:, None, None]
    s, b = (p.data[:, None, None] for p in net.layers[2].params)
    want = np.maximum((x - mean) / np.sqrt(var + 1e-5) * s + b, 0)
    np.testing.assert_allclose(got["out"], want, rtol=1e-5, atol=1e-6)
