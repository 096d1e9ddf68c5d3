"""``verify --backends ...,reference64`` (issue 7, item 17): the numpy reference run in float64
from input to output, the yardstick both exports are compared to. A small SE-ResNet-style net
(three squeeze-excitation blocks, as SENet's Caffe models write them: global AVE pooling, 1x1
convs, Sigmoid, Axpy); the full SE-ResNet-50 PSPNet measurement is tools/se_pspnet_precision.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery.cli import main
from surgery.export.reference import run_net
from surgery.ops._common import fill_missing_weights

_BLOCK = """
layer {{ name: "conv{i}" type: "Convolution" bottom: "{x}" top: "conv{i}"
  convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 bias_term: false
  weight_filler {{ type: "msra" }} }} }}
layer {{ name: "conv{i}/bn" type: "BatchNorm" bottom: "conv{i}" top: "conv{i}" }}
layer {{ name: "conv{i}/scale" type: "Scale" bottom: "conv{i}" top: "conv{i}"
  scale_param {{ bias_term: true filler {{ type: "gaussian" mean: 1 std: 0.1 }}
  bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "fc{i}/pool" type: "Pooling" bottom: "conv{i}" top: "fc{i}/pool"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc{i}/sqz" type: "Convolution" bottom: "fc{i}/pool" top: "fc{i}/sqz"
  convolution_param {{ num_output: 4 kernel_size: 1 weight_filler {{ type: "msra" }}
  bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "fc{i}/sqz/relu" type: "ReLU" bottom: "fc{i}/sqz" top: "fc{i}/sqz" }}
layer {{ name: "fc{i}/exc" type: "Convolution" bottom: "fc{i}/sqz" top: "fc{i}/exc"
  convolution_param {{ num_output: 16 kernel_size: 1 weight_filler {{ type: "msra" }}
  bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "fc{i}/exc/sigmoid" type: "Sigmoid" bottom: "fc{i}/exc" top: "fc{i}/exc" }}
layer {{ name: "res{i}" type: "Axpy" bottom: "fc{i}/exc" bottom: "conv{i}" bottom: "{x}"
  top: "res{i}" }}
layer {{ name: "res{i}/relu" type: "ReLU" bottom: "res{i}" top: "res{i}" }}
"""


@pytest.fixture()
def se_net(tmp_path: Path) -> tuple[str, str]:
    text = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 2 dim: 16 dim: 12 dim: 12 } } }\n')
    x = "data"
    for i in range(1, 4):
        text += _BLOCK.format(i=i, x=x)
        x = f"res{i}"
    text += (f'layer {{ name: "pool" type: "Pooling" bottom: "{x}" top: "pool" '
             'pooling_param { pool: AVE global_pooling: true } }\n'
             'layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" '
             'inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }\n'
             'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
    proto = tmp_path / "se.prototxt"
    proto.write_text(text)
    net = surgery.load(proto)
    fill_missing_weights(net, np.random.default_rng(0))
    for lay in net.layers:  # BatchNorm statistics: mean 0.1, variance 2, factor 1
        if lay.type == "BatchNorm":
            for p, v in zip(lay.params, (0.1, 2.0, 1.0), strict=True):
                p.data = np.full(p.data.shape, v, np.float32)
    weights = tmp_path / "se.caffemodel"
    surgery.save(net, weights=weights)
    return str(proto), str(weights)


def test_run_net_is_float64_and_matches_a_direct_computation(se_net: tuple[str, str]) -> None:
    net = surgery.load(*se_net)
    x = np.random.default_rng(1).standard_normal((2, 16, 12, 12))
    blobs = run_net(net, {"data": x})
    assert all(v.dtype == np.float64 for v in blobs.values())
    # the first SE block by hand, in float64
    conv1 = blobs["conv1@conv1"]
    conv1_bn = blobs["conv1"]  # the last version: after conv1/bn and conv1/scale in place
    pooled = conv1_bn.mean((2, 3), keepdims=True)
    assert np.allclose(blobs["fc1/pool"], pooled, rtol=1e-12)
    sqz = blobs["fc1/sqz"]
    w, b = (np.float64(p.data) for p in net.layer("fc1/exc").params)
    exc = 1 / (1 + np.exp(-(np.einsum("oc,nchw->nohw", w[:, :, 0, 0], sqz)
                            + b.reshape(1, -1, 1, 1))))
    assert np.allclose(blobs["fc1/exc"], exc, rtol=1e-12)
    assert np.allclose(blobs["res1"], np.maximum(exc * conv1_bn + x, 0), rtol=1e-12)
    assert conv1.shape == (2, 16, 12, 12)


def test_verify_against_reference64(se_net: tuple[str, str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    assert main(["verify", *se_net[:1], "--weights", se_net[1], "--backends",
                 "onnxruntime,torch,reference64", "--tolerance", "1e-5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["reference"].startswith("reference64")
    assert rep["backends"] == ["onnxruntime", "torch"]
    rows = {(r["blob"], r["backend"]): r["max_rel"] for r in rep["rows"]}
    assert {b for b, _ in rows} >= {"fc1/exc", "fc3/exc", "res3", "prob"}
    assert max(rows.values()) < 1e-5


def test_reference64_finds_a_wrong_lowering(se_net: tuple[str, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A lowering off by a rounding-sized amount in one layer (a sigmoid evaluated through
    float16) is what the float64 yardstick must expose."""
    torch = pytest.importorskip("torch")
    from surgery import verify as v
    from surgery.export import torch as texport

    real = texport._TABLE["Sigmoid"]

    def half_sigmoid(ctx, node, xs):  # noqa: ANN001, ANN202 - a lowering's signature
        (y,) = real(ctx, node, xs)
        return [ctx.graph.call_method("to", (ctx.graph.call_method("to", (y, torch.float16)),
                                             torch.float32))]

    net = surgery.load(*se_net)
    good = v.verify(net, backends=["torch", "reference64"], tolerance=1e-5)
    assert good.passed
    monkeypatch.setitem(texport._TABLE, "Sigmoid", half_sigmoid)
    bad = v.verify(net, backends=["torch", "reference64"], tolerance=1e-5)
    assert not bad.passed and bad.worst("torch").max_rel > 1e-4
