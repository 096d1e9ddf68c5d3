"""Fine-tuning the exported module in PyTorch: param_groups after unfreezing, set_trainable,
BatchNorm statistics kept fixed (freeze_bn, ``freeze --bn-stats``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import surgery  # noqa: E402
from surgery import ops  # noqa: E402
from surgery.errors import LayerNotFoundError, SurgeryError  # noqa: E402
from surgery.export import (  # noqa: E402
    freeze_bn,
    param_groups,
    save_torch,
    set_trainable,
    to_torch,
    trainable_count,
)
from surgery.net import Param  # noqa: E402

from .conftest import MODELS, import_generated  # noqa: E402

SHAPES = {"data": (4, 3, 32, 32), "label": (4,)}


def _frozen_tiny_googlenet() -> surgery.Net:
    """The bundled GoogLeNet-shaped net for 3 classes, everything but the heads frozen."""
    net = surgery.load(MODELS / "tiny_googlenet_train_val.prototxt")
    net, _ = ops.rename_heads(net, num_output=3, seed=0)
    net, _ = ops.freeze(net, layers="*", except_="*_ft")
    return net


def _names(groups: list[dict]) -> set[str]:
    return {n for g in groups for n in g["names"]}


def _step(model: torch.nn.Module, groups: list[dict]) -> set[str]:
    """One SGD step on random data; the parameter names that changed."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES["data"], generator=g)
    label = torch.tensor([0.0, 1.0, 2.0, 1.0])
    out = model(x, label)
    opt.zero_grad()
    out[model.total_loss_key].backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_param_groups_follow_requires_grad_after_unfreezing_in_torch() -> None:
    """The bug: after ``requires_grad_(True)`` on a net frozen in Caffe, param_groups still
    dropped every blob with lr_mult 0, so stage 2 trained only the heads (6 of 36 here)."""
    model = to_torch(_frozen_tiny_googlenet(), "train", SHAPES, missing="fill")
    everything = {n for n, _ in model.named_parameters()}
    heads = {n for n in everything if "_ft." in n}
    assert len(heads) == 6 and len(everything) == 36
    stage1 = param_groups(model, 0.01)
    assert _names(stage1) == heads
    assert _step(model, stage1) == heads
    for p in model.parameters():  # stage 2, by hand
        p.requires_grad_(True)
    stage2 = param_groups(model, 0.01)
    assert _names(stage2) == everything
    by_pair = {(g["lr_mult"], g["decay_mult"]): set(g["names"]) for g in stage2}
    # frozen blobs (0/0) come back at Caffe's defaults 1/1; the heads keep theirs
    assert by_pair[(1.0, 1.0)] >= everything - heads
    assert by_pair[(1.0, 1.0)] | by_pair.get((2.0, 0.0), set()) == everything
    assert _step(model, stage2) == everything
    # a parameter frozen in torch leaves the groups, whatever its Caffe lr_mult
    model.get_parameter("loss3_classifier_ft.weight").requires_grad_(False)
    assert "loss3_classifier_ft.weight" not in _names(param_groups(model, 0.01))
    # unfrozen=... changes rule 3's multipliers
    custom = param_groups(model, 0.1, 1e-4, unfrozen=(0.5, 0.0))
    g = next(g for g in custom if "conv1_3x3_s1.weight" in g["names"])
    assert g["lr"] == pytest.approx(0.05) and g["weight_decay"] == 0.0


def test_set_trainable_does_stage_two_in_one_call() -> None:
    model = to_torch(_frozen_tiny_googlenet(), "train", SHAPES, missing="fill")
    n_train, n_all = trainable_count(model)
    assert 0 < n_train < n_all
    changed = set_trainable(model, layers="inception_c/*", lr_mult=(1, 2), decay_mult=(1, 0))
    assert changed == [n for n, _ in model.named_parameters() if n.startswith("inception_c_")]
    assert model.caffe_lr["inception_c_1x1.weight"] == (1.0, 1.0)
    assert model.caffe_lr["inception_c_1x1.bias"] == (2.0, 0.0)
    assert model.caffe_lr["inception_b_1x1.weight"] == (0.0, 0.0)  # untouched
    assert not model.get_parameter("inception_b_1x1.weight").requires_grad
    # the rest, with no multipliers given: frozen blobs get 1/1, the heads keep 10/20-style
    set_trainable(model, except_=["inception_c/*"])
    assert trainable_count(model) == (n_all, n_all)
    assert model.caffe_lr["conv1_3x3_s1.bias"] == (1.0, 1.0)
    assert model.caffe_lr["inception_c_1x1.bias"] == (2.0, 0.0)
    groups = param_groups(model, 0.01, 5e-4)
    assert _names(groups) == {n for n, _ in model.named_parameters()}
    assert _step(model, groups) == _names(groups)
    # freezing again keeps the multipliers for a later unfreeze
    set_trainable(model, "loss1/*", trainable=False)
    assert not any("loss1_" in n for n in _names(param_groups(model, 0.01)))
    set_trainable(model, "loss1/*")
    assert model.caffe_lr["loss1_classifier_ft.weight"] == (1.0, 1.0)


def test_set_trainable_errors() -> None:
    model = to_torch(_frozen_tiny_googlenet(), "train", SHAPES, missing="fill")
    with pytest.raises(LayerNotFoundError, match="did you mean 'inception_c/1x1'"):
        set_trainable(model, "inception_c/1x1x")
    with pytest.raises(LayerNotFoundError, match="matches no learnable layer"):
        set_trainable(model, "pool*")  # no parameters there
    with pytest.raises(SurgeryError, match="trainable=False"):
        set_trainable(model, lr_mult=0)
    with pytest.raises(SurgeryError, match="only with trainable=True"):
        set_trainable(model, trainable=False, lr_mult=1)
    assert trainable_count(model)[0] < trainable_count(model)[1]  # nothing changed


def test_generated_model_py_has_the_same_helpers(tmp_path: Path) -> None:
    net = _frozen_tiny_googlenet()
    out = save_torch(net, tmp_path / "m", "train", SHAPES, missing="fill")
    mod = import_generated(out / "model.py", "gen_finetune")
    model = mod.CaffeNet()
    model.load_weights(str(out / "weights.safetensors"))
    gm = to_torch(net, "train", SHAPES, missing="fill")
    assert [g["names"] for g in mod.param_groups(model, 0.1)] == [
        g["names"] for g in param_groups(gm, 0.1)]
    assert model.CAFFE_NAMES["conv1_3x3_s1.weight"] == {"layer": "conv1/3x3_s1", "blob": 0}
    # stage 2 with the model.py copies and with surgery's: the same groups
    mod.set_trainable(model, ["inception_*"], lr_mult=(1, 2))
    set_trainable(gm, ["inception_*"], lr_mult=(1, 2))
    assert [(g["lr_mult"], g["names"]) for g in mod.param_groups(model, 0.1)] == [
        (g["lr_mult"], g["names"]) for g in param_groups(gm, 0.1)]
    assert type(model).CAFFE_LR["inception_a_1x1.weight"] == (0.0, 0.0)  # the class is intact
    assert set_trainable(model, "conv1/3x3_s1") == ["conv1_3x3_s1.weight", "conv1_3x3_s1.bias"]
    compiled = torch.compile(model, backend="eager")  # wrappers are unwrapped
    assert _names(param_groups(compiled, 0.1)) == _names(mod.param_groups(model, 0.1))


BN_NET = """
name: "bn"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 8 dim: 2 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "conv1/bn" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "conv1/scale" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "conv2/bn" type: "BatchNorm" bottom: "conv2" top: "conv2" }
"""


def _bn_net(tmp_path: Path) -> surgery.Net:
    p = tmp_path / "bn.prototxt"
    p.write_text(BN_NET)
    net = surgery.load(p)
    rng = np.random.default_rng(0)
    for name in ("conv1/bn", "conv2/bn"):  # stored statistics far from any batch's
        lay = net.layer(name)
        c = 4 if name == "conv1/bn" else 3
        blobs = (rng.normal(3, 1, c) * 2, rng.uniform(5, 9, c) * 2, [2.0])
        lay.params = [Param(np.asarray(v, np.float32), lr_mult=0.0) for v in blobs]
    return net


def test_freeze_bn_keeps_the_stored_statistics_under_train(tmp_path: Path) -> None:
    net = _bn_net(tmp_path)
    model = to_torch(net, "test", missing="fill", seed=1)
    x = torch.randn(8, 2, 6, 6)
    model.eval()
    with torch.no_grad():
        stored = model(x)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    model.train()  # Caffe's TRAIN: the batch's statistics, moving averages updated
    with torch.no_grad():
        batch = model(x)
    assert not torch.allclose(batch, stored)
    assert not torch.equal(model.get_buffer("conv1_bn.running_mean"),
                           stats["conv1_bn.running_mean"])
    for n, b in stats.items():
        model.get_buffer(n).copy_(b)
    assert freeze_bn(model) == ["conv1/bn", "conv2/bn"]
    model.train()
    with torch.no_grad():
        fixed = model(x)
    torch.testing.assert_close(fixed, stored, rtol=0, atol=0)
    assert all(torch.equal(model.get_buffer(n), b) for n, b in stats.items())
    # one layer back to Caffe's default; a glob naming no BatchNorm is an error
    assert freeze_bn(model, "conv2/*", fixed=False) == ["conv2/bn"]
    assert model.get_submodule("conv1_bn").use_global_stats is True
    assert model.get_submodule("conv2_bn").use_global_stats is None
    with pytest.raises(LayerNotFoundError, match="no BatchNorm layer"):
        freeze_bn(model, "conv1/scale")


def test_freeze_bn_stats_writes_use_global_stats(tmp_path: Path) -> None:
    """``freeze --bn-stats``: the frozen part's BatchNorm layers get ``use_global_stats:
    true`` (Caffe: the stored statistics in TRAIN too); the export pins them, so the module
    does not update them under ``train()``; ``unfreeze --bn-stats`` removes it."""
    from surgery.cli import main

    net = _bn_net(tmp_path)
    frozen, report = ops.freeze(net, until="conv1/scale", bn_stats=True)
    assert frozen.layer("conv1/bn").attrs["use_global_stats"] is True
    assert "use_global_stats" not in frozen.layer("conv2/bn").attrs  # not in the selection
    assert "use_global_stats" not in net.layer("conv1/bn").attrs  # input untouched
    assert any(c["layer"] == "conv1/bn" and "use_global_stats" in c["what"]
               for c in report.changed)
    text = surgery.caffe_io.net_to_text(frozen)
    assert text.count("use_global_stats: true") == 1
    without, rep0 = ops.freeze(net, until="conv1/scale")  # default: as before
    assert "use_global_stats" not in without.layer("conv1/bn").attrs
    assert any(e["layer"] == "conv1/bn" for e in rep0.left)

    model = to_torch(frozen, "train", missing="fill", seed=1)
    assert model.get_submodule("conv1_bn").use_global_stats is True
    assert model.get_submodule("conv2_bn").use_global_stats is None
    x = torch.randn(8, 2, 6, 6)
    means = {n: model.get_buffer(f"{n}.running_mean").clone() for n in ("conv1_bn", "conv2_bn")}
    model.train()
    with torch.no_grad():
        model(x)
    assert torch.equal(model.get_buffer("conv1_bn.running_mean"), means["conv1_bn"])  # fixed
    assert not torch.equal(model.get_buffer("conv2_bn.running_mean"), means["conv2_bn"])

    back, rep = ops.unfreeze(frozen, until="conv1/scale", bn_stats=True)
    assert "use_global_stats" not in back.layer("conv1/bn").attrs
    assert any("removed" in c["what"] for c in rep.changed)

    src = tmp_path / "bn_w.prototxt"
    surgery.save(net, src)
    out = tmp_path / "frozen.prototxt"
    assert main(["freeze", str(src), "--until", "conv1/scale", "--bn-stats", "-o", str(out)]) == 0
    assert surgery.load(out).layer("conv1/bn").attrs["use_global_stats"] is True
    out2 = tmp_path / "unfrozen.prototxt"
    assert main(["unfreeze", str(out), "--layers", "conv1*", "--bn-stats", "-o", str(out2)]) == 0
    assert "use_global_stats" not in surgery.load(out2).layer("conv1/bn").attrs


def test_a_deep_copy_keeps_the_caffe_tables() -> None:
    """fx's deepcopy rebuilds a GraphModule and dropped caffe_lr: a copy (an EMA, a
    checkpoint clone) then trained frozen blobs at lr_mult 1."""
    import copy

    model = to_torch(_frozen_tiny_googlenet(), "train", SHAPES, missing="fill")
    twin = copy.deepcopy(model)
    assert twin.caffe_lr == model.caffe_lr and twin.caffe_lr is not model.caffe_lr
    assert twin.caffe_names == model.caffe_names and twin.total_loss_key == "total_loss"
    assert _names(param_groups(twin, 0.1)) == _names(param_groups(model, 0.1))
    set_trainable(twin)
    assert model.caffe_lr["conv1_3x3_s1.weight"] == (0.0, 0.0)  # the original is untouched
    assert twin.caffe_lr["conv1_3x3_s1.weight"] == (1.0, 1.0)
