"""PyTorch export: goldens blob by blob, fine-tuning setup, generated source, module behaviour."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import surgery  # noqa: E402
from surgery.errors import NetError, UnsupportedLayerError  # noqa: E402
from surgery.export import common  # noqa: E402
from surgery.export.torch import (  # noqa: E402
    generate_source,
    param_groups,
    run_blobs,
    save_torch,
    to_torch,
)
from surgery.net import Layer, Net, Param  # noqa: E402

from .conftest import GOLDEN, ZOO, import_generated  # noqa: E402

GOLDENS = sorted(p.name for p in GOLDEN.glob("*") if (p / "meta.json").exists())

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 2 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool1" top: "pool1"
  dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  param { lr_mult: 0 } param { lr_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _golden(name: str) -> tuple[surgery.Net, dict[str, np.ndarray], dict, Path]:
    d = GOLDEN / name
    meta = json.loads((d / "meta.json").read_text())
    net = surgery.load(d / "net.prototxt", d / meta["weights"])
    inputs = dict(np.load(d / "input.npz"))
    return net, inputs, meta, d


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if not b.size:
        return 0.0
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / max(scale, 1e-30)


def _tiny(tmp_path: Path) -> surgery.Net:
    p = tmp_path / "tiny.prototxt"
    p.write_text(TINY)
    return surgery.load(p)


def _tiny_model(tmp_path: Path, phase: str = "test") -> torch.fx.GraphModule:
    return to_torch(_tiny(tmp_path), phase, missing="fill", seed=1)


# -- goldens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GOLDENS)
def test_golden_every_blob(name: str) -> None:
    """Outputs and every stored blob match Caffe within meta['tolerance']; probes for the rest
    (shape, sum within tol * sqrt(n * sumsq), sumsq, sampled values)."""
    net, inputs, meta, d = _golden(name)
    tol = float(meta["tolerance"])
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()}, keep_blobs=True)
    got = run_blobs(gm, inputs)
    flow = surgery.resolve(net)
    splits = common.split_blob_values(flow)

    def lookup(blob: str) -> np.ndarray | None:
        if blob in got:
            return got[blob]
        v = splits.get(blob)  # Caffe's automatic <blob>_<layer>_<i>_split_<j> copies
        if v is None:
            return None
        key = v.name if flow.latest(v.name) is v else f"{v.name}@{v.producer.layer.name}"
        return got.get(key)

    gold = dict(np.load(d / "outputs.npz"))
    detection = {n.layer.tops[0] for n in flow.nodes if n.layer.type == "DetectionOutput"}
    checked = 0
    for blob, want in gold.items():
        if blob in detection:
            continue
        have = lookup(blob)
        assert have is not None, f"{name}: blob {blob!r} not produced"
        assert have.shape == want.shape, (blob, have.shape, want.shape)
        err = _rel(have, want)
        assert err <= tol, f"{name}: {blob} rel err {err:.3g} > {tol}"
        checked += 1
    probes = json.loads((d / "probes.json").read_text())
    for blob, p in probes.items():
        if blob in gold or blob in detection:
            continue
        have = lookup(blob)
        assert have is not None, f"{name}: probed blob {blob!r} not produced"
        assert list(have.shape) == p["shape"], (blob, have.shape, p["shape"])
        n = have.size
        flat = have.reshape(-1).astype(np.float64)
        assert abs(flat.sum() - p["sum"]) <= tol * math.sqrt(n * p["sumsq"]) + 1e-6, blob
        assert abs((flat**2).sum() - p["sumsq"]) <= 4 * tol * p["sumsq"] + 1e-6, blob
        vals = np.asarray(p["value"])
        scale = max(float(np.max(np.abs(vals))), math.sqrt(p["sumsq"] / max(n, 1)), 1e-30)
        assert np.max(np.abs(flat[p["index"]] - vals)) <= tol * scale, blob
        checked += 1
    assert checked > 0
    # SSD: DetectionOutput's bottoms are outputs; the priors equal Caffe's exactly.
    for node in flow.nodes:
        if node.layer.type == "DetectionOutput":
            assert all(v.name in gm.output_names for v in node.inputs)
            prior = node.inputs[2].name
            if prior in gold:
                np.testing.assert_array_equal(got[prior], gold[prior])


def test_golden_outputs_only_default() -> None:
    """Without keep_blobs the module returns Caffe's outputs (one tensor for one output)."""
    net, inputs, meta, d = _golden("lenet")
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()})
    out = gm(torch.from_numpy(inputs["data"]))
    assert isinstance(out, torch.Tensor)
    assert gm.output_names == ["prob"]
    gold = np.load(d / "outputs.npz")["prob"]
    assert _rel(out.detach().numpy(), gold) <= meta["tolerance"]


def test_ssd_outputs_are_detection_bottoms() -> None:
    net, inputs, meta, _ = _golden("mobilenet_ssd")
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()})
    assert set(gm.output_names) == {"mbox_loc", "mbox_conf_flatten", "mbox_priorbox"}
    assert any("detection_out" in n for n in gm.notes)


# -- fine-tuning setup ------------------------------------------------------------------------
def test_frozen_googlenet_one_sgd_step() -> None:
    """Freeze up to inception_4a, export TRAIN: one SGD step moves exactly the unfrozen params,
    by lr * lr_mult * grad (plain SGD), and the three loss heads carry 0.3/0.3/1.0."""
    from surgery.ops import freeze

    net = surgery.load(ZOO / "bvlc_googlenet" / "train_val.prototxt")
    net, _ = freeze(net, until="inception_4a/output")
    torch.manual_seed(0)
    gm = to_torch(net, "train", {"data": (2, 3, 224, 224), "label": (2,)}, missing="fill",
                  seed=3)
    assert gm.training
    assert gm.loss_weights == pytest.approx(
        {"loss1/loss1": 0.3, "loss2/loss2": 0.3, "loss3/loss3": 1.0})
    frozen = {n for n, p in gm.named_parameters() if not p.requires_grad}
    assert "conv1_7x7_s2.weight" in frozen and "inception_4a_1x1.bias" in frozen
    assert "inception_4b_1x1.weight" not in frozen and "loss1_classifier.weight" not in frozen
    base_lr = 0.01
    groups = param_groups(gm, base_lr, weight_decay=0.0)
    assert {(g["lr_mult"], g["decay_mult"]) for g in groups} == {(1.0, 1.0), (2.0, 0.0)}
    grouped = {n for g in groups for n in g["names"]}
    assert grouped == {n for n, p in gm.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    opt = torch.optim.SGD(groups, lr=base_lr)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 50, (2, 3, 224, 224)).astype(np.float32))
    label = torch.tensor([3.0, 7.0])
    gm.eval()  # deterministic (Dropout off) for the update check; losses still computed
    out = gm(x, label)
    loss = out[gm.total_loss_key]
    expected = sum(out[k] * w for k, w in gm.loss_weights.items())
    assert torch.allclose(loss, expected)
    opt.zero_grad()
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None)
             for n, p in gm.named_parameters()}
    opt.step()
    for name, p in gm.named_parameters():
        delta = p.detach() - before[name]
        if name in frozen:
            assert torch.equal(delta, torch.zeros_like(delta)), name
            continue
        lm = gm.caffe_lr[name][0]
        g = grads[name]
        assert g is not None, name
        torch.testing.assert_close(delta, -base_lr * lm * g, rtol=1e-4, atol=1e-7)
    changed = {n for n in before if not torch.equal(before[n], gm.get_parameter(n).detach())}
    assert changed and changed.isdisjoint(frozen)


def test_param_groups_weight_decay_and_requires_grad(tmp_path: Path) -> None:
    gm = _tiny_model(tmp_path)
    assert not gm.get_parameter("fc.weight").requires_grad
    assert gm.caffe_lr["conv1.bias"] == (2.0, 0.0)
    groups = param_groups(gm, 0.1, 5e-4)
    by = {(g["lr_mult"], g["decay_mult"]): g for g in groups}
    assert by[(2.0, 0.0)]["lr"] == pytest.approx(0.2)
    assert by[(2.0, 0.0)]["weight_decay"] == 0.0
    assert by[(1.0, 1.0)]["weight_decay"] == pytest.approx(5e-4)
    assert "fc.weight" not in {n for g in groups for n in g["names"]}
    assert gm.caffe_names["conv1.weight"] == {"layer": "conv1", "blob": 0}
    assert gm.caffe_names["bn1.running_mean"]["blob"] == 0


def test_batchnorm_momentum_and_train_eval(tmp_path: Path) -> None:
    gm = _tiny_model(tmp_path, "train")
    bn = gm.get_submodule("bn1")
    assert bn.momentum == pytest.approx(0.001)  # 1 - moving_average_fraction
    assert bn.use_global_stats is None
    x = torch.randn(2, 1, 12, 12)
    gm.train()
    rm = bn.running_mean.clone()
    a = gm(x)
    assert not torch.equal(rm, bn.running_mean)  # batch statistics update the averages
    gm.eval()
    b1, b2 = gm(x), gm(x)
    torch.testing.assert_close(b1, b2)  # Dropout off, global stats
    assert not torch.allclose(a, b1)


def test_dropout_is_inverted_in_train() -> None:
    net = Net("d", [
        Layer("in", "Input", [], ["x"], attrs={"shape": [{"dim": [1, 1000]}]},
              param_field="input_param"),
        Layer("drop", "Dropout", ["x"], ["x"], attrs={"dropout_ratio": 0.25},
              param_field="dropout_param"),
    ])
    gm = to_torch(net, "train")
    y = gm(torch.ones(1, 1000))
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))


def test_dropout_without_scale_train() -> None:
    """The Fast R-CNN fork's scale_train: false: x * mask at TRAIN, x * (1 - p) at TEST."""
    net = Net("d", [
        Layer("in", "Input", [], ["x"], attrs={"shape": [{"dim": [1, 1000]}]},
              param_field="input_param"),
        Layer("drop", "Dropout", ["x"], ["x"],
              attrs={"dropout_ratio": 0.25, "scale_train": False}, param_field="dropout_param"),
    ])
    gm = to_torch(net, "train")
    y = gm(torch.ones(1, 1000))
    kept = y[y != 0]
    assert 0 < kept.numel() < 1000
    torch.testing.assert_close(kept, torch.ones_like(kept))
    gm.eval()
    torch.testing.assert_close(gm(torch.ones(1, 1000)), torch.full((1, 1000), 0.75))
    assert "operator.mul(" in generate_source(gm)  # model.py writes it too


def test_bnll_gradient_is_finite_for_large_inputs() -> None:
    net = Net("b", [
        Layer("in", "Input", [], ["x"], attrs={"shape": [{"dim": [1, 6]}]},
              param_field="input_param"),
        Layer("bnll", "BNLL", ["x"], ["y"]),
    ])
    x = torch.tensor([[-200.0, -50.0, -1.0, 0.0, 50.0, 200.0]], requires_grad=True)
    y = to_torch(net)(x)
    y.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()))
    torch.testing.assert_close(y.detach(), torch.nn.functional.softplus(x.detach()))


def test_train_phase_loss_heads() -> None:
    net = Net("l", [
        Layer("in", "Input", [], ["x", "label"],
              attrs={"shape": [{"dim": [4, 5]}, {"dim": [4]}]}, param_field="input_param"),
        Layer("loss", "SoftmaxWithLoss", ["x", "label"], ["loss"],
              extra={"loss_weight": [2.0], "loss_param": {"ignore_label": 1}}),
    ])
    gm = to_torch(net, "train")
    x = torch.randn(4, 5)
    label = torch.tensor([0.0, 1.0, 3.0, 4.0])
    out = gm(x, label)
    ce = torch.nn.functional.cross_entropy(x, label.long(), ignore_index=1)
    torch.testing.assert_close(out["loss"], ce)
    torch.testing.assert_close(out[gm.total_loss_key], 2.0 * ce)
    net2 = Net("e", [
        Layer("in", "Input", [], ["a", "b"], attrs={"shape": [{"dim": [3, 4]}]},
              param_field="input_param"),
        Layer("l2", "EuclideanLoss", ["a", "b"], ["l2"]),
        Layer("bce", "SigmoidCrossEntropyLoss", ["a", "b"], ["bce"]),
    ])
    gm2 = to_torch(net2, "train")
    a, b = torch.randn(3, 4), torch.rand(3, 4)
    out2 = gm2(a, b)
    torch.testing.assert_close(out2["l2"], ((a - b) ** 2).sum() / 3 / 2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(a, b, reduction="sum") / 3
    torch.testing.assert_close(out2["bce"], bce)


def test_test_phase_drops_losses_and_data_layers() -> None:
    net = surgery.load(ZOO / "bvlc_googlenet" / "train_val.prototxt")
    gm = to_torch(net, "test", {"data": (1, 3, 224, 224)}, missing="fill")
    assert gm.input_names == ["data"]
    assert set(gm.output_names) == {"loss1/classifier", "loss2/classifier", "loss3/classifier"}
    assert any("Accuracy" in n for n in gm.notes) and any("loss" in n for n in gm.notes)


# -- errors -----------------------------------------------------------------------------------
def test_unsupported_layers_all_named() -> None:
    net = Net("u", [
        Layer("in", "Input", [], ["x"], attrs={"shape": [{"dim": [1, 2, 3, 3]}]},
              param_field="input_param"),
        Layer("a", "FancyOp", ["x"], ["y"]),
        Layer("r", "ReLU", ["y"], ["z"]),
        Layer("b", "OtherOp", ["z"], ["w"]),
    ])
    with pytest.raises(UnsupportedLayerError) as e:
        to_torch(net)
    assert "'a' (FancyOp)" in str(e.value) and "'b' (OtherOp)" in str(e.value)


def test_refused_configurations_all_named() -> None:
    """Configurations a lowering refuses are collected like unsupported types: one error."""
    net = Net("c", [
        Layer("in", "Input", [], ["x"], attrs={"shape": [{"dim": [1, 2, 6, 6]}]},
              param_field="input_param"),
        Layer("p1", "Pooling", ["x"], ["p1", "m1"], attrs={"pool": "AVE", "kernel_size": [2],
                                                           "stride": [2]},
              param_field="pooling_param"),
        Layer("r", "ReLU", ["p1"], ["r"]),
        Layer("p2", "Pooling", ["r"], ["p2", "m2"], attrs={"pool": "AVE", "kernel_size": [2],
                                                           "stride": [1]},
              param_field="pooling_param"),
    ])
    with pytest.raises(UnsupportedLayerError) as e:
        to_torch(net)
    msg = str(e.value)
    assert msg.startswith("2 layer(s)") and "'p1'" in msg and "'p2'" in msg


def test_missing_weights_named(tmp_path: Path) -> None:
    with pytest.raises(NetError) as e:
        to_torch(_tiny(tmp_path))
    msg = str(e.value)
    assert "'conv1'" in msg and "'fc'" in msg and "'bn1'" in msg and "missing='fill'" in msg


def test_save_torch_leaves_no_partial_output(tmp_path: Path) -> None:
    with pytest.raises(NetError):
        save_torch(_tiny(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# -- generated source -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_ssd", "open_nsfw_real", "googlenet"])
def test_model_py_equals_graph_module(tmp_path: Path, name: str) -> None:
    net, inputs, meta, _ = _golden(name)
    shapes = {k: v.shape for k, v in inputs.items()}
    out = save_torch(net, tmp_path / "m", input_shapes=shapes)
    assert sorted(p.name for p in out.iterdir()) == ["caffe_names.json", "model.py", "net.prototxt",
                                                      "weights.safetensors"]
    mod = import_generated(out / "model.py", f"gen_{name}")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    model.eval()
    gm = to_torch(net, input_shapes=shapes)
    args = [torch.from_numpy(inputs[n]) for n in gm.input_names]
    with torch.no_grad():
        a, b = gm(*args), model(*args)
    if isinstance(a, torch.Tensor):
        a, b = {"out": a}, {"out": b}
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    names = json.loads((out / "caffe_names.json").read_text())["caffe_names"]
    assert names and all("layer" in v for v in names.values())
    assert [g["names"] for g in mod.param_groups(model, 0.1)] == [
        g["names"] for g in param_groups(gm, 0.1)]


HOSTILE = [
    'quote"s', "single'quote", "new\nline", '__import__("os").system("echo pwned")', "class",
    "1st", "def", "self", "torch", "ünïcödé/层", "a.b-c/d", "", "__init__", "forward",
    "x\\y", "'''", '"""', "None", "inputs",
]


def test_hostile_layer_names_generate_safe_code(tmp_path: Path) -> None:
    layers = [Layer("in'put", "Input", [], ['da"ta'], attrs={"shape": [{"dim": [1, 2, 5, 5]}]},
                    param_field="input_param")]
    prev = 'da"ta'
    rng = np.random.default_rng(0)
    for i, n in enumerate(HOSTILE):
        top = n or f"t{i}"
        if i % 2:
            layers.append(Layer(n, "Convolution", [prev], [top],
                                params=[Param(rng.normal(0, .3, (2, 2, 1, 1)).astype(np.float32)),
                                        Param(rng.normal(0, .3, (2,)).astype(np.float32))],
                                attrs={"num_output": 2, "kernel_size": [1]},
                                param_field="convolution_param"))
        else:
            layers.append(Layer(n, "ReLU", [prev], [top], param_field="relu_param"))
        prev = top
    marker = tmp_path / "pwned"
    payload = f'__import__("os").system("touch {marker}")'
    layers.append(Layer(payload, "ReLU", [prev], [payload], param_field="relu_param"))
    layers.append(Layer(payload + "\n", "Convolution", [payload], ["out"],
                        params=[Param(np.ones((2, 2, 1, 1), np.float32)),
                                Param(np.zeros((2,), np.float32))],
                        attrs={"num_output": 2, "kernel_size": [1]},
                        param_field="convolution_param"))
    net = Net("hostile", layers)
    gm = to_torch(net, keep_blobs=True)
    src = generate_source(gm)
    tree = ast.parse(src)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "__import__"]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "system"]
    out = save_torch(net, tmp_path / "h")
    mod = import_generated(out / "model.py", "gen_hostile")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(model(x), to_torch(net)(x))
    assert not marker.exists()
    mapped = {v["layer"] for v in gm.caffe_names.values()}
    assert {lay.name for lay in layers if lay.type == "Convolution"} <= mapped
    assert all(k.split(".")[0].isidentifier() for k in gm.caffe_names)


# -- PyTorch features -------------------------------------------------------------------------
@pytest.mark.parametrize("names", [("train", "to", "graph"), ("code", "load_weights",
                                                               "CAFFE_LR", "state_dict")])
def test_layer_names_of_module_methods(tmp_path: Path, names: tuple[str, ...]) -> None:
    """Layers named like an nn.Module / GraphModule / model.py attribute do not shadow it."""
    rng = np.random.default_rng(0)
    layers = [Layer("input", "Input", [], ["data"], attrs={"shape": [{"dim": [1, 2, 4, 4]}]},
                    param_field="input_param")]
    prev = "data"
    for n in names:
        layers.append(Layer(n, "Convolution", [prev], [n],
                            params=[Param(rng.normal(0, .3, (2, 2, 1, 1)).astype(np.float32)),
                                    Param(rng.normal(0, .3, (2,)).astype(np.float32))],
                            attrs={"num_output": 2, "kernel_size": [1]},
                            param_field="convolution_param"))
        prev = n
    net = Net("methods", layers)
    gm = to_torch(net)
    x = torch.randn(1, 2, 4, 4)
    want = gm(x)
    assert callable(gm.train) and callable(gm.to) and isinstance(gm.code, str)
    out = save_torch(net, tmp_path / "m")
    mod = import_generated(out / "model.py", "gen_methods")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    model.eval()
    torch.testing.assert_close(model(x), want)
    assert {v["layer"] for v in gm.caffe_names.values()} == set(names)


def test_torch_compile_eager_backend(tmp_path: Path) -> None:
    gm = _tiny_model(tmp_path)
    x = torch.randn(2, 1, 12, 12)
    compiled = torch.compile(gm, backend="eager")
    torch.testing.assert_close(compiled(x), gm(x))
    assert param_groups(compiled, 0.1)


def test_channels_last_and_autocast() -> None:
    net, inputs, meta, _ = _golden("open_nsfw_real")
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()})
    x = torch.from_numpy(inputs["data"])
    with torch.no_grad():
        ref = gm(x)
        cl = gm.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo = gm(x)
    assert float((lo.float() - ref).abs().max()) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_moves_to_cuda() -> None:
    net, inputs, meta, d = _golden("squeezenet_v1_1")
    gm = to_torch(net, input_shapes={k: v.shape for k, v in inputs.items()}).cuda()
    out = gm(torch.from_numpy(inputs["data"]).cuda()).cpu().detach().numpy()
    assert _rel(out, np.load(d / "outputs.npz")["prob"]) <= 1e-3


def test_readable_code(tmp_path: Path) -> None:
    code = _tiny_model(tmp_path).code
    assert "self.conv1(" in code and "caffe_pool2d" in code


def test_registering_twice_is_an_error() -> None:
    from surgery.export.torch import lowering

    with pytest.raises(ValueError):
        lowering("ReLU")(lambda ctx, node, xs: xs)


def test_model_py_of_fork_layers(tmp_path: Path) -> None:
    """Interp, ShuffleChannel and Axpy go through the generated source too (runtime helpers,
    not bare operators that model.py cannot name)."""
    def inp(name: str, dims: list[int]) -> Layer:
        return Layer(name, "Input", [], [name], attrs={"shape": [{"dim": dims}]},
                     param_field="input_param")

    net = Net("forks", [
        inp("x", [2, 6, 4, 5]), inp("a", [2, 6, 1, 1]),
        Layer("shuffle", "ShuffleChannel", ["x"], ["s"], attrs={"group": 3},
              param_field="shuffle_channel_param"),
        Layer("axpy", "Axpy", ["a", "s", "x"], ["y"]),
        Layer("interp", "Interp", ["y"], ["out"], attrs={"zoom_factor": 2},
              param_field="interp_param"),
    ])
    out = save_torch(net, tmp_path / "m")
    mod = import_generated(out / "model.py", "gen_forks")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    model.eval()
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(2, 6, 4, 5)).astype(np.float32),
            "a": rng.normal(size=(2, 6, 1, 1)).astype(np.float32)}
    gm = to_torch(net)
    args = [torch.from_numpy(feed[n]) for n in gm.input_names]
    with torch.no_grad():
        a, b = gm(*args), model(*args)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert tuple(a.shape) == (2, 6, 7, 9)
