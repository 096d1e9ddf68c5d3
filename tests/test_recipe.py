"""surgery.ops.recipe: TOML recipes, including the documented GoogLeNet fine-tuning example."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import surgery
import surgery.ops
from surgery.caffe_io import load, save
from surgery.check import check
from surgery.errors import LayerNotFoundError, SurgeryError
from surgery.ops import Report, apply_recipe, load_recipe
from surgery.ops._common import fill_missing_weights

from .conftest import MODELS, ROOT, ZOO

EXAMPLE = ROOT / "examples" / "googlenet_finetune.toml"
HEADS3 = ["loss1/classifier", "loss2/classifier", "loss3/classifier"]


def errors(net: surgery.Net) -> list[str]:
    return [str(p) for p in check(net) if p.severity == "error"]


@pytest.fixture(scope="module")
def googlenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model-zoo layout the example expects, with random weights for train_val."""
    root = tmp_path_factory.mktemp("zoo")
    (root / "bvlc_googlenet").mkdir()
    shutil.copy(ZOO / "bvlc_googlenet" / "train_val.prototxt", root / "bvlc_googlenet")
    net = load(root / "bvlc_googlenet" / "train_val.prototxt")
    fill_missing_weights(net, np.random.default_rng(11))
    save(net, None, root / "bvlc_googlenet" / "bvlc_googlenet.caffemodel")
    shutil.copy(EXAMPLE, root / "googlenet_finetune.toml")
    return root


def test_example_recipe_fine_tunes_googlenet(googlenet_dir: Path) -> None:
    net, rep = apply_recipe(googlenet_dir / "googlenet_finetune.toml")
    out_p = googlenet_dir / "googlenet_ft_train_val.prototxt"
    out_w = googlenet_dir / "googlenet_ft_init.caffemodel"
    assert out_p.is_file() and out_w.is_file()
    back = load(out_p, out_w)
    assert errors(back) == []
    src = load(
        googlenet_dir / "bvlc_googlenet" / "train_val.prototxt",
        googlenet_dir / "bvlc_googlenet" / "bvlc_googlenet.caffemodel",
    )
    for h in HEADS3:
        head = back.layer(h + "_ft")
        assert head.attrs["num_output"] == 7
        assert head.params[0].data.shape == (7, 1024)
        assert [p.lr_mult for p in head.params] == [10, 20]
        assert not back.layers_named(h)
    for lay in src.layers:
        if lay.has_weights and lay.name not in HEADS3:
            got = back.layers_named(lay.name)[0]
            for p, q in zip(lay.params, got.params, strict=True):
                assert np.array_equal(p.data, q.data), lay.name
    assert [p.lr_mult for p in back.layer("conv1/7x7_s2").params] == [0, 0]
    assert [p.lr_mult for p in back.layer("inception_3b/1x1").params] == [0, 0]
    assert [p.lr_mult for p in back.layer("inception_4a/1x1").params] == [1, 2]
    assert [p.lr_mult for p in back.layer("loss1/conv").params] == [1, 2]
    assert [s["op"] for s in rep.data["steps"]] == ["rename_heads", "freeze"]
    assert rep.seed == 20240601


def test_dict_recipe_relative_paths_and_no_write(tmp_path: Path) -> None:
    recipe = {
        "net": "lenet.prototxt",
        "output": "out.prototxt",
        "step": [
            {"op": "rename-heads", "num-output": 3, "layer": ["ip2"]},
            {"op": "lr", "layers": "ip2_ft", "lr_mult": [10, 20]},
            {"op": "fc-to-conv", "layers": ["ip1", "ip2_ft"]},
        ],
    }
    net, rep = apply_recipe(recipe, base_dir=MODELS, write=False)
    assert not (MODELS / "out.prototxt").exists()
    assert net.layer("ip2_ft-conv").attrs["num_output"] == 3
    assert [p.lr_mult for p in net.layer("ip2_ft-conv").params] == [10, 20]
    net2, _ = apply_recipe(recipe, base_dir=MODELS, output=tmp_path / "o.prototxt")
    assert errors(load(tmp_path / "o.prototxt")) == []


def test_given_net_and_seed_reproducible() -> None:
    base = load(MODELS / "lenet.prototxt")
    fill_missing_weights(base, np.random.default_rng(0))
    recipe = {"seed": 5, "step": [{"op": "rename-heads", "num_output": 4}]}
    a, ra = apply_recipe(recipe, base, write=False)
    b, _ = apply_recipe(recipe, base, write=False)
    c, _ = apply_recipe(recipe, base, write=False, seed=6)
    wa, wb, wc = (n.layer("ip2_ft").params[0].data for n in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)
    assert ra.seed == 5
    assert a.layer("ip1").params[0].data is base.layer("ip1").params[0].data


def test_unknown_op_names_step_and_valid_ops() -> None:
    recipe = {"step": [{"op": "freeze", "layers": ["*"]}, {"op": "rename-head"}]}
    with pytest.raises(SurgeryError, match=r"step 2: unknown op 'rename-head'.*rename-heads"):
        apply_recipe(recipe, load(MODELS / "lenet.prototxt"), write=False)


def test_unknown_option_names_step_and_valid_options() -> None:
    recipe = {"step": [{"op": "rename-heads", "num_output": 3, "classes": 3}]}
    with pytest.raises(
        SurgeryError,
        match=r"step 1 \(rename-heads\): unknown option 'classes'"
        r".*num-output",
    ):
        apply_recipe(recipe, load(MODELS / "lenet.prototxt"), write=False)


def test_failing_step_writes_nothing(tmp_path: Path) -> None:
    recipe = {
        "net": str(MODELS / "lenet.prototxt"),
        "output": str(tmp_path / "o.prototxt"),
        "step": [{"op": "rename-heads", "num_output": 3}, {"op": "freeze", "until": "conv9"}],
    }
    with pytest.raises(LayerNotFoundError, match=r"step 2 \(freeze\).*did you mean"):
        apply_recipe(recipe)
    assert not list(tmp_path.iterdir())


def test_bad_recipe_shapes(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="no steps"):
        apply_recipe({"net": "x"}, write=False)
    with pytest.raises(SurgeryError, match="unknown key"):
        apply_recipe({"nett": "x", "step": [{"op": "freeze"}]}, write=False)
    with pytest.raises(SurgeryError, match="needs op"):
        apply_recipe({"step": [{"layers": "x"}]}, write=False)
    bad = tmp_path / "bad.toml"
    bad.write_text("net = \n")
    with pytest.raises(SurgeryError, match="not a valid TOML"):
        load_recipe(bad)


def test_steps_dispatch_through_surgery_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_gate(
        net: surgery.Net,
        at: str,
        channels: int | str = 1,
        *,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
    ) -> tuple[surgery.Net, Report]:
        seen.update(at=at, channels=channels, rng=rng, seed=seed)
        return net.copy(), Report("insert_gate")

    monkeypatch.setattr(surgery.ops, "insert_gate", fake_gate, raising=False)
    recipe = {"seed": 9, "step": [{"op": "insert-gate", "at": "conv1", "channels": "same"}]}
    _, rep = apply_recipe(recipe, load(MODELS / "lenet.prototxt"), write=False)
    assert seen["at"] == "conv1" and seen["channels"] == "same"
    assert isinstance(seen["rng"], np.random.Generator) and seen["seed"] == 9
    assert rep.data["steps"][0]["op"] == "insert_gate"
    with pytest.raises(SurgeryError, match=r"step 1 \(insert-gate\): unknown option 'where'"):
        apply_recipe(
            {"step": [{"op": "insert-gate", "where": "x"}]},
            load(MODELS / "lenet.prototxt"),
            write=False,
        )


def test_map_as_list_of_pairs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_transplant(
        net: surgery.Net, source: Any, map: Any = None, on_mismatch: str = "error"
    ) -> tuple[surgery.Net, Report]:
        seen.update(source=source, map=map)
        return net.copy(), Report("transplant")

    monkeypatch.setattr(surgery.ops, "transplant", fake_transplant, raising=False)
    recipe = {"step": [{"op": "transplant", "from": "w.caffemodel", "map": ["a=b", "c=d"]}]}
    apply_recipe(recipe, load(MODELS / "lenet.prototxt"), base_dir=tmp_path, write=False)
    assert seen["source"] == str(tmp_path.resolve() / "w.caffemodel")
    assert seen["map"] == {"a": "b", "c": "d"}
