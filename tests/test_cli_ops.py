"""The fine-tuning verbs through ``surgery.cli.main``: outputs, reports, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from surgery.caffe_io import load, save
from surgery.check import check
from surgery.cli import main
from surgery.fillers import DEFAULT_SEED
from surgery.ops._common import fill_missing_weights

from .conftest import MODELS, ROOT, ZOO

LENET = str(MODELS / "lenet.prototxt")
TINY = str(MODELS / "tiny_googlenet_train_val.prototxt")
GOOGLENET_TV = str(ZOO / "bvlc_googlenet" / "train_val.prototxt")


def ok(path: Path, weights: Path | None = None) -> None:
    net = load(path, weights)
    assert [p for p in check(net) if p.severity == "error"] == []


@pytest.fixture()
def lenet_weights(tmp_path: Path) -> Path:
    net = load(LENET)
    fill_missing_weights(net, np.random.default_rng(0))
    w = tmp_path / "lenet.caffemodel"
    save(net, None, w)
    return w


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# -- rename-heads -------------------------------------------------------------------------------
def test_rename_heads_typical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new.prototxt"
    assert main(["rename-heads", TINY, "--num-output", "3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "loss1/classifier_ft" in text and f"wrote {out}" in text
    ok(out)
    net = load(out)
    assert [net.layer(f"loss{i}/classifier_ft").attrs["num_output"] for i in (1, 2, 3)] == [3] * 3


def test_rename_heads_weights_json(
    tmp_path: Path, lenet_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, ow = tmp_path / "o.prototxt", tmp_path / "o.caffemodel"
    rep = run_json(
        capsys,
        [
            "rename-heads",
            LENET,
            "--num-output",
            "4",
            "--lr-mult",
            "10,20",
            "--weights",
            str(lenet_weights),
            "--out-weights",
            str(ow),
            "-o",
            str(out),
        ],
    )
    assert rep["op"] == "rename_heads"
    assert rep["seed"] == DEFAULT_SEED
    assert rep["data"]["renamed"] == {"ip2": "ip2_ft"}
    assert rep["output"] == str(out) and rep["out_weights"] == str(ow)
    assert {"changed", "left", "notes", "data"} <= set(rep)
    ok(out, ow)
    net, src = load(out, ow), load(LENET, lenet_weights)
    assert net.layer("ip2_ft").params[0].data.shape == (4, 500)
    assert [p.lr_mult for p in net.layer("ip2_ft").params] == [10, 20]
    assert np.array_equal(net.layer("ip1").params[0].data, src.layer("ip1").params[0].data)


def test_rename_heads_seed_option(
    tmp_path: Path, lenet_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = []
    for seed in ("1", "1", "2"):
        ow = tmp_path / f"w{len(ws)}.caffemodel"
        rep = run_json(
            capsys,
            [
                "rename-heads",
                LENET,
                "--num-output",
                "2",
                "--seed",
                seed,
                "--weights",
                str(lenet_weights),
                "--out-weights",
                str(ow),
                "-o",
                str(tmp_path / "o.prototxt"),
            ],
        )
        assert rep["seed"] == int(seed)
        ws.append(load(tmp_path / "o.prototxt", ow).layer("ip2_ft").params[0].data)
    assert np.array_equal(ws[0], ws[1]) and not np.array_equal(ws[0], ws[2])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-output", "3", "--layer", "ip3"], "did you mean 'ip2'"),
        (["--num-output", "3", "--layer", "fc*"], "glob 'fc*' matches no"),
        (["--num-output", "0"], "--num-output must be a positive integer"),
        (["--num-output", "abc"], "--num-output must be a positive integer"),
        (["--num-output", "3", "--lr-mult", "a,b"], "--lr-mult"),
        (["--num-output", "3", "--rename", "ip2"], "OLD=NEW"),
        (["--num-output", "3", "--rename", "ip2=ip1"], "already exists"),
    ],
)
def test_rename_heads_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "o.prototxt"
    assert main(["rename-heads", LENET, *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_weights_without_out_weights(
    tmp_path: Path, lenet_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.prototxt"
    assert (
        main(
            [
                "rename-heads",
                LENET,
                "--num-output",
                "3",
                "--weights",
                str(lenet_weights),
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert "--out-weights" in capsys.readouterr().err
    assert not out.exists()


def test_never_overwrites_input_unless_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = tmp_path / "lenet.prototxt"
    shutil.copy(LENET, net)
    before = net.read_text()
    assert main(["freeze", str(net), "--layers", "conv1", "-o", str(net)]) == 2
    assert "--in-place" in capsys.readouterr().err
    assert net.read_text() == before
    assert main(["freeze", str(net), "--layers", "conv1", "-o", str(net), "--in-place"]) == 0
    assert load(net).layer("conv1").params[0].lr_mult == 0


# -- freeze / unfreeze / lr ---------------------------------------------------------------------
def test_freeze_until_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.prototxt"
    rep = run_json(
        capsys, ["freeze", GOOGLENET_TV, "--until", "inception_4e/output", "-o", str(out)]
    )
    m = rep["data"]["multipliers"]
    assert m["conv1/7x7_s2"]["lr_mult"] == [0, 0] and m["conv1/7x7_s2"]["frozen"]
    assert not m["loss1/classifier"]["frozen"] and not m["loss2/fc"]["frozen"]
    ok(out)


def test_freeze_except_and_unfreeze(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f, u = tmp_path / "f.prototxt", tmp_path / "u.prototxt"
    assert (
        main(
            [
                "freeze",
                TINY,
                "--layers",
                "conv*",
                "inception_*",
                "--except",
                "inception_c*",
                "-o",
                str(f),
            ]
        )
        == 0
    )
    net = load(f)
    assert net.layer("conv1/3x3_s1").params[0].lr_mult == 0
    assert (
        net.layers_named("inception_c/1x1") and net.layer("inception_c/1x1").params[0].lr_mult == 1
    )
    assert main(["unfreeze", str(f), "--layers", "conv1/*", "-o", str(u)]) == 0
    assert load(u).layer("conv1/3x3_s1").params[0].lr_mult == 1
    ok(u)
    capsys.readouterr()


def test_freeze_needs_a_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.prototxt"
    assert main(["freeze", LENET, "-o", str(out)]) == 2
    assert "--until" in capsys.readouterr().err
    assert main(["freeze", LENET, "--until", "conv9", "-o", str(out)]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not out.exists()


def test_lr_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lr.prototxt"
    rep = run_json(
        capsys,
        [
            "lr",
            LENET,
            "--layers",
            "ip*",
            "--lr-mult",
            "10,20",
            "--decay-mult",
            "1,0",
            "-o",
            str(out),
        ],
    )
    assert rep["data"]["multipliers"]["ip1"] == {
        "type": "InnerProduct",
        "lr_mult": [10, 20],
        "decay_mult": [1, 0],
        "frozen": False,
    }
    ok(out)
    assert main(["lr", LENET, "--layers", "ip*", "-o", str(tmp_path / "x.prototxt")]) == 2
    assert not (tmp_path / "x.prototxt").exists()


# -- deploy / fc-to-conv ------------------------------------------------------------------------
def test_deploy_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deploy.prototxt"
    rep = run_json(capsys, ["deploy", GOOGLENET_TV, "-o", str(out)])
    assert rep["data"]["inputs"] == {"data": [50, 3, 224, 224]}
    ok(out)
    assert main(["deploy", GOOGLENET_TV, "--input-shape", "1,3,224,224", "-o", str(out)]) == 0
    assert load(out).layers[0].attrs["shape"][0]["dim"] == [1, 3, 224, 224]


def test_deploy_needs_input_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deploy.prototxt"
    tv = str(ZOO / "bvlc_reference_caffenet" / "train_val.prototxt")
    assert main(["deploy", tv, "-o", str(out)]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert not out.exists()
    assert main(["deploy", tv, "--input-shape", "10,3,227,227", "-o", str(out)]) == 0
    ok(out)


def test_fc_to_conv_verb(
    tmp_path: Path, lenet_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, ow = tmp_path / "fc.prototxt", tmp_path / "fc.caffemodel"
    assert (
        main(
            [
                "fc-to-conv",
                LENET,
                "--layers",
                "ip1,ip2",
                "--weights",
                str(lenet_weights),
                "--out-weights",
                str(ow),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    ok(out, ow)
    net = load(out, ow)
    assert net.layer("ip1-conv").params[0].data.shape == (500, 50, 4, 4)
    capsys.readouterr()
    assert main(["fc-to-conv", LENET, "--layers", "conv1", "-o", str(tmp_path / "x")]) == 2
    assert "not an InnerProduct" in capsys.readouterr().err


# -- apply --------------------------------------------------------------------------------------
def test_apply_recipe(
    tmp_path: Path, lenet_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.toml"
    shutil.copy(LENET, tmp_path / "net.prototxt")
    recipe.write_text(
        'net = "net.prototxt"\nweights = "lenet.caffemodel"\noutput = "out.prototxt"\n'
        'out_weights = "out.caffemodel"\nseed = 3\n'
        '[[step]]\nop = "rename-heads"\nnum_output = 5\nlr_mult = [10, 20]\n'
        '[[step]]\nop = "freeze"\nuntil = "ip1"\n'
    )
    rep = run_json(capsys, ["apply", str(recipe)])
    assert rep["seed"] == 3
    assert [s["op"] for s in rep["data"]["steps"]] == ["rename_heads", "freeze"]
    ok(tmp_path / "out.prototxt", tmp_path / "out.caffemodel")
    net = load(tmp_path / "out.prototxt", tmp_path / "out.caffemodel")
    assert net.layer("ip2_ft").params[0].data.shape == (5, 500)
    assert net.layer("conv1").params[0].lr_mult == 0


def test_apply_failure_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'net = "{LENET}"\noutput = "out.prototxt"\n'
        '[[step]]\nop = "rename-heads"\nnum_output = 5\n'
        '[[step]]\nop = "frezee"\n'
    )
    assert main(["apply", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "step 2" in err and "did you mean 'freeze'" in err
    assert not (tmp_path / "out.prototxt").exists()


def test_apply_example_with_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = ROOT / "examples" / "googlenet_finetune.toml"
    out = tmp_path / "ft.prototxt"
    assert (
        main(
            [
                "apply",
                str(example),
                "--net",
                GOOGLENET_TV,
                "--no-weights",
                "-o",
                str(out),
                "--dry-run",
            ]
        )
        == 0
    )
    assert "dry run" in capsys.readouterr().out
    assert not out.exists()
    assert main(["apply", str(example), "--net", GOOGLENET_TV, "--no-weights", "-o", str(out)]) == 0
    ok(out)
    assert load(out).layer("loss2/classifier_ft").attrs["num_output"] == 7


def test_verbs_import_no_torch_or_onnx() -> None:
    import subprocess
    import sys

    code = (
        "import sys, surgery.cli.edit, surgery.cli; surgery.cli.build_parser(); "
        "import surgery.ops.heads, surgery.ops.lr, surgery.ops.deploy, surgery.ops.recipe; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert res.stdout.strip() == "[]"
