"""Contract: the PyTorch and ONNX lowering tables cover the same Caffe types, and both cover
every type in the goldens and Caffe's standard BVLC layers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from surgery.export.torch import torch_supported_types  # noqa: E402

from .conftest import GOLDEN  # noqa: E402

# Types one table has and the other need not, with the reason. Anything else must match.
TORCH_ONLY = {
    "SoftmaxWithLoss": "TRAIN loss heads are a PyTorch training feature",
    "EuclideanLoss": "TRAIN loss head",
    "SigmoidCrossEntropyLoss": "TRAIN loss head",
    "ConvolutionDepthwise": "fork alias of Convolution",
    "DepthwiseConvolution": "fork alias of Convolution",
}
ONNX_ONLY = {
    "Input": "the torch exporter turns Input tops into placeholders in the plan",
}
BVLC = {
    "Convolution", "Deconvolution", "Pooling", "InnerProduct", "ReLU", "PReLU", "Sigmoid",
    "TanH", "ELU", "AbsVal", "Power", "Exp", "Log", "BNLL", "Threshold", "Clip", "Swish",
    "BatchNorm", "Scale", "Bias", "LRN", "Eltwise", "Concat", "Slice", "Split", "Flatten",
    "Reshape", "Crop", "Tile", "Softmax", "Dropout", "ArgMax", "Reduction", "MVN",
}
SSD = {"Permute", "Normalize", "PriorBox"}
# Never lowered: dropped (data, loss at TEST, metrics) or cut (DetectionOutput) by the plan.
PLAN_HANDLED = {"Input", "DetectionOutput"}


def _golden_types() -> set[str]:
    types: set[str] = set()
    for meta in GOLDEN.glob("*/meta.json"):
        types |= set(json.loads(meta.read_text())["layer_types"])
    return types


def test_torch_table_covers_goldens_and_bvlc() -> None:
    missing = (_golden_types() | BVLC | SSD) - PLAN_HANDLED - torch_supported_types()
    assert not missing


def test_tables_cover_the_same_types() -> None:
    onnx_mod = pytest.importorskip("surgery.export.onnx")
    onnx_types = set(onnx_mod.supported_types())
    torch_types = set(torch_supported_types())
    assert torch_types - onnx_types <= set(TORCH_ONLY), sorted(torch_types - onnx_types)
    assert onnx_types - torch_types <= set(ONNX_ONLY), sorted(onnx_types - torch_types)
    assert not (_golden_types() | BVLC | SSD) - PLAN_HANDLED - onnx_types
