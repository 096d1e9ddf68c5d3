"""Shape inference: one table of single-layer cases per family, error cases, whole-net inference
and the goldens produced by the reference Caffe."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from surgery import shapes
from surgery.dataflow import resolve
from surgery.errors import ShapeMismatchError, UnsupportedLayerError
from surgery.net import Layer, Net, NetState, Param
from surgery.shapes import infer, macs, param_shapes, top_shapes

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def L(type_: str, nb: int = 1, nt: int = 1, **attrs: Any) -> Layer:  # noqa: N802 - table helper
    """A layer of ``type_`` with ``nb`` bottoms, ``nt`` tops and these ``*_param`` fields."""
    return Layer(
        name=f"{type_.lower()}1",
        type=type_,
        bottoms=[f"b{i}" for i in range(nb)],
        tops=[f"t{i}" for i in range(nt)],
        attrs=attrs,
    )


def tops(layer: Layer, *bottoms: tuple[int, ...]) -> list[tuple[int, ...] | None]:
    return top_shapes(layer, list(bottoms))


def top(layer: Layer, *bottoms: tuple[int, ...]) -> tuple[int, ...] | None:
    (out,) = tops(layer, *bottoms)
    return out


# -- convolution ------------------------------------------------------------------------------
CONV_CASES = [
    # (attrs, bottom, top, params)
    pytest.param(
        dict(num_output=64, kernel_size=[7], stride=[2], pad=[3]),
        (2, 3, 224, 224),
        (2, 64, 112, 112),
        [(64, 3, 7, 7), (64,)],
        id="alexnet-like",
    ),
    pytest.param(
        dict(num_output=4, kernel_size=[3], stride=[2]),
        (1, 1, 10, 10),
        (1, 4, 4, 4),
        [(4, 1, 3, 3), (4,)],
        id="floor-rounding",
    ),
    pytest.param(
        dict(num_output=8, kernel_size=[3], pad=[1], dilation=[2]),
        (1, 8, 17, 17),
        (1, 8, 15, 15),
        [(8, 8, 3, 3), (8,)],
        id="dilation",
    ),
    pytest.param(
        dict(num_output=64, kernel_size=[3], pad=[1], group=4, bias_term=False),
        (1, 32, 10, 10),
        (1, 64, 10, 10),
        [(64, 8, 3, 3)],
        id="group-nobias",
    ),
    pytest.param(
        dict(num_output=4, kernel_size=[1, 2, 3], pad=[0], stride=[1, 1, 2]),
        (1, 2, 5, 6, 7),
        (1, 4, 5, 5, 3),
        [(4, 2, 1, 2, 3), (4,)],
        id="3d-per-axis",
    ),
    pytest.param(
        dict(num_output=2, kernel_h=3, kernel_w=5, pad_h=1, pad_w=0, stride_h=2, stride_w=1),
        (1, 3, 10, 11),
        (1, 2, 5, 7),
        [(2, 3, 3, 5), (2,)],
        id="h-w-fields",
    ),
    pytest.param(
        dict(num_output=6, kernel_size=[3], axis=2),
        (7, 2, 3, 9),
        (7, 2, 6, 7),
        [(6, 3, 3), (6,)],
        id="axis-2-1d",
    ),
]


@pytest.mark.parametrize(("attrs", "bottom", "want", "params"), CONV_CASES)
def test_convolution(attrs: dict, bottom: tuple, want: tuple, params: list) -> None:
    for t in ("Convolution", "ConvolutionDepthwise", "DepthwiseConvolution"):
        layer = L(t, **attrs)
        assert top(layer, bottom) == want
        assert param_shapes(layer, [bottom]) == params


def test_convolution_multiple_bottoms_and_macs() -> None:
    layer = L("Convolution", nb=2, nt=2, num_output=4, kernel_size=[3], pad=[1])
    assert tops(layer, (1, 3, 8, 8), (1, 3, 8, 8)) == [(1, 4, 8, 8)] * 2
    single = L("Convolution", num_output=4, kernel_size=[3], pad=[1])
    assert macs(single, [(1, 3, 8, 8)], [(1, 4, 8, 8)]) == 4 * 8 * 8 * 3 * 9
    grouped = L("Convolution", num_output=4, kernel_size=[3], pad=[1], group=2)
    assert macs(grouped, [(2, 4, 8, 8)], [(2, 4, 8, 8)]) == 2 * 4 * 64 * 2 * 9


@pytest.mark.parametrize(
    ("attrs", "bottoms", "match"),
    [
        (dict(num_output=4, kernel_size=[5]), [(1, 3, 4, 4)], "larger than the padded input"),
        (dict(num_output=4, kernel_size=[3], dilation=[3]), [(1, 3, 6, 6)], "kernel extent 7"),
        (dict(num_output=6, kernel_size=[3], group=4), [(1, 8, 9, 9)], "group 4"),
        (dict(num_output=6, kernel_size=[3, 3, 3]), [(1, 8, 9, 9)], "3 values for 2"),
        (dict(num_output=6), [(1, 8, 9, 9)], "no kernel_size"),
        (dict(kernel_size=[3]), [(1, 8, 9, 9)], "num_output"),
        (dict(num_output=2, kernel_size=[3], kernel_h=3, kernel_w=3), [(1, 1, 9, 9)], "both"),
        (dict(num_output=2, kernel_h=3), [(1, 1, 9, 9)], "together"),
        (dict(num_output=2, kernel_size=[1]), [(1, 1, 9, 9), (1, 1, 8, 8)], "same shape"),
    ],
)
def test_convolution_errors(attrs: dict, bottoms: list, match: str) -> None:
    layer = L("Convolution", nb=len(bottoms), nt=len(bottoms), **attrs)
    with pytest.raises(ShapeMismatchError, match=match) as err:
        top_shapes(layer, bottoms)
    assert "convolution1" in str(err.value) and str(bottoms[0]) in str(err.value)


@pytest.mark.parametrize(
    ("attrs", "bottom", "want", "params"),
    [
        (
            dict(num_output=2, kernel_size=[4], stride=[2], pad=[1]),
            (1, 4, 5, 5),
            (1, 2, 10, 10),
            [(4, 2, 4, 4), (2,)],
        ),
        (
            dict(num_output=2, kernel_size=[4], stride=[2], group=2, bias_term=False),
            (1, 4, 5, 5),
            (1, 2, 12, 12),
            [(4, 1, 4, 4)],
        ),
        (
            dict(num_output=1, kernel_size=[3], stride=[1], dilation=[2]),
            (1, 1, 5, 5),
            (1, 1, 9, 9),
            [(1, 1, 3, 3), (1,)],
        ),
        # HED's upscore-dsn2: 2x upsampling of a 1-channel map
        (
            dict(num_output=1, kernel_size=[4], stride=[2]),
            (1, 1, 284, 284),
            (1, 1, 570, 570),
            [(1, 1, 4, 4), (1,)],
        ),
    ],
)
def test_deconvolution(attrs: dict, bottom: tuple, want: tuple, params: list) -> None:
    layer = L("Deconvolution", **attrs)
    assert top(layer, bottom) == want
    assert param_shapes(layer, [bottom]) == params


def test_deconvolution_macs_and_error() -> None:
    layer = L("Deconvolution", num_output=2, kernel_size=[4], stride=[2], pad=[1])
    assert macs(layer, [(1, 4, 5, 5)], [(1, 2, 10, 10)]) == 4 * 25 * 2 * 16
    bad = L("Deconvolution", num_output=2, kernel_size=[1], pad=[1])
    with pytest.raises(ShapeMismatchError, match="not positive"):
        top(bad, (1, 1, 1, 1))


# -- pooling ----------------------------------------------------------------------------------
POOL_CASES = [
    pytest.param(dict(kernel_size=3, stride=2), (1, 1, 6, 6), (1, 1, 3, 3), id="ceil-default"),
    pytest.param(
        dict(kernel_size=3, stride=2, round_mode="FLOOR"),
        (1, 1, 6, 6),
        (1, 1, 2, 2),
        id="round-floor",
    ),
    pytest.param(
        dict(kernel_size=3, stride=2, round_mode="CEIL"),
        (1, 1, 6, 6),
        (1, 1, 3, 3),
        id="round-ceil",
    ),
    pytest.param(
        dict(kernel_size=3, stride=2, ceil_mode=False),
        (1, 1, 6, 6),
        (1, 1, 2, 2),
        id="fork-ceil-mode-false",
    ),
    pytest.param(
        dict(kernel_size=3, stride=2, ceil_mode=True),
        (1, 1, 6, 6),
        (1, 1, 3, 3),
        id="fork-ceil-mode-true",
    ),
    # ceil((5 + 2 - 2) / 2) + 1 = 4, but window 3 would start at 6 >= 5 + 1: clipped to 3
    pytest.param(dict(kernel_size=2, stride=2, pad=1), (1, 1, 5, 5), (1, 1, 3, 3), id="clip-rule"),
    # same overhang without padding: Caffe keeps the window that starts past the image
    pytest.param(dict(kernel_size=1, stride=2), (1, 1, 4, 4), (1, 1, 3, 3), id="no-pad-no-clip"),
    # pad_w alone switches the clip on for the height too
    pytest.param(
        dict(kernel_h=1, kernel_w=3, stride=2, pad_h=0, pad_w=1),
        (1, 1, 4, 6),
        (1, 1, 2, 4),
        id="clip-both-axes",
    ),
    pytest.param(
        dict(kernel_size=3, stride=2), (2, 64, 112, 112), (2, 64, 56, 56), id="googlenet-pool1"
    ),
    pytest.param(dict(kernel_size=3, stride=1, pad=1), (1, 4, 7, 7), (1, 4, 7, 7), id="same"),
    pytest.param(dict(global_pooling=True, pool="AVE"), (1, 8, 7, 5), (1, 8, 1, 1), id="global"),
    pytest.param(
        dict(kernel_h=2, kernel_w=3, stride_h=1, stride_w=3), (1, 1, 5, 9), (1, 1, 4, 3), id="h-w"
    ),
]


@pytest.mark.parametrize(("attrs", "bottom", "want"), POOL_CASES)
def test_pooling(attrs: dict, bottom: tuple, want: tuple) -> None:
    layer = L("Pooling", **attrs)
    assert top(layer, bottom) == want
    assert param_shapes(layer, [bottom]) == []


def test_pooling_mask_top() -> None:
    layer = L("Pooling", nt=2, kernel_size=2, stride=2)
    assert tops(layer, (1, 3, 9, 9)) == [(1, 3, 5, 5)] * 2


def test_pooling_matches_torch_ceil_mode() -> None:
    torch = pytest.importorskip("torch")
    for size, k, s, p in [(5, 2, 2, 1), (6, 3, 2, 1), (7, 3, 2, 0), (13, 3, 2, 1), (8, 4, 3, 2)]:
        x = torch.zeros(1, 1, size, size)
        want = torch.nn.functional.max_pool2d(x, k, s, p, ceil_mode=True).shape
        layer = L("Pooling", kernel_size=k, stride=s, pad=p)
        assert top(layer, (1, 1, size, size)) == tuple(want), (size, k, s, p)


@pytest.mark.parametrize(
    ("attrs", "bottom", "match"),
    [
        (dict(kernel_size=3, pad=3), (1, 1, 9, 9), "smaller than the kernel"),
        (dict(kernel_size=3), (1, 9, 9), "4-axis"),
        (dict(global_pooling=True, stride=2), (1, 1, 9, 9), "global_pooling"),
        (dict(stride=2), (1, 1, 9, 9), "no kernel_size"),
        (dict(kernel_size=3, kernel_h=3, kernel_w=3), (1, 1, 9, 9), "both"),
        (dict(kernel_size=7, stride=1), (1, 1, 5, 5), "larger than the padded input"),
    ],
)
def test_pooling_errors(attrs: dict, bottom: tuple, match: str) -> None:
    with pytest.raises(ShapeMismatchError, match=match):
        top(L("Pooling", **attrs), bottom)


# -- inner product, embed ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attrs", "bottom", "want", "params"),
    [
        (dict(num_output=4096), (2, 256, 6, 6), (2, 4096), [(4096, 9216), (4096,)]),
        (dict(num_output=10, transpose=True, bias_term=False), (2, 7), (2, 10), [(7, 10)]),
        (dict(num_output=7, axis=2), (2, 3, 4, 5), (2, 3, 7), [(7, 20), (7,)]),
        (dict(num_output=7, axis=-1), (2, 3, 4, 5), (2, 3, 4, 7), [(7, 5), (7,)]),
        (dict(num_output=3, axis=0), (2, 5), (3,), [(3, 10), (3,)]),
    ],
)
def test_inner_product(attrs: dict, bottom: tuple, want: tuple, params: list) -> None:
    layer = L("InnerProduct", **attrs)
    assert top(layer, bottom) == want
    assert param_shapes(layer, [bottom]) == params
    assert macs(layer, [bottom], [want]) == math.prod(want) * math.prod(params[0]) // want[-1]


def test_inner_product_errors() -> None:
    with pytest.raises(ShapeMismatchError, match="num_output"):
        top(L("InnerProduct"), (2, 3))
    with pytest.raises(ShapeMismatchError, match="axis 2 is out of range"):
        top(L("InnerProduct", num_output=3, axis=2), (2, 3))


def test_embed() -> None:
    layer = L("Embed", num_output=16, input_dim=100)
    assert top(layer, (2, 7)) == (2, 7, 16)
    assert param_shapes(layer, [(2, 7)]) == [(100, 16), (16,)]
    nobias = L("Embed", num_output=16, input_dim=100, bias_term=False)
    assert param_shapes(nobias, [(2, 7)]) == [(100, 16)]


# -- same-shape layers and their parameters ---------------------------------------------------
SAME_TYPES = [
    "ReLU",
    "PReLU",
    "ELU",
    "Sigmoid",
    "TanH",
    "AbsVal",
    "Power",
    "Exp",
    "Log",
    "BNLL",
    "Threshold",
    "Clip",
    "Swish",
    "Dropout",
    "BatchNorm",
    "Scale",
    "Bias",
    "LRN",
    "MVN",
    "Softmax",
    "Normalize",
    "ShuffleChannel",
    "BN",
]


@pytest.mark.parametrize("type_", SAME_TYPES)
def test_same_shape(type_: str) -> None:
    assert top(L(type_), (2, 6, 5, 3)) == (2, 6, 5, 3)
    assert macs(L(type_), [(2, 6, 5, 3)], [(2, 6, 5, 3)]) == (180 if type_ == "Scale" else 0)


def test_split_and_silence() -> None:
    assert tops(L("Split", nt=3), (2, 3)) == [(2, 3)] * 3
    assert tops(L("Silence", nb=2, nt=0), (2, 3), (4,)) == []
    assert tops(L("HDF5Output", nb=2, nt=0), (2, 3), (2,)) == []


@pytest.mark.parametrize(
    ("layer", "bottoms", "params"),
    [
        (L("BatchNorm"), [(2, 16, 5, 5)], [(16,), (16,), (1,)]),
        (L("BatchNorm"), [(2, 16)], [(16,), (16,), (1,)]),
        (L("PReLU"), [(2, 16, 5, 5)], [(16,)]),
        (L("PReLU", channel_shared=True), [(2, 16, 5, 5)], [(1,)]),
        (L("Scale"), [(2, 16, 5, 5)], [(16,)]),
        (L("Scale", bias_term=True), [(2, 16, 5, 5)], [(16,), (16,)]),
        (L("Scale", axis=1, num_axes=2), [(2, 16, 5, 5)], [(16, 5)]),
        (L("Scale", axis=2, num_axes=-1), [(2, 16, 5, 5)], [(5, 5)]),
        (L("Scale", num_axes=0, bias_term=True), [(2, 16, 5, 5)], [(), ()]),
        (L("Scale", nb=2), [(2, 16, 5, 5), (16, 5)], []),
        (L("Scale", nb=2, axis=0, bias_term=True), [(2, 16, 5, 5), (2, 16)], [(2, 16)]),
        (L("Scale", nb=2, axis=1), [(2, 16, 5, 5), ()], []),
        (L("Bias"), [(2, 16, 5, 5)], [(16,)]),
        (L("Bias", nb=2), [(2, 16, 5, 5), (16,)], []),
        (L("Normalize"), [(1, 512, 38, 38)], [(1,)]),
        (L("Normalize", channel_shared=False), [(1, 512, 38, 38)], [(512,)]),
        (L("ReLU"), [(1, 5)], []),
        (L("LRN", local_size=5), [(1, 5, 4, 4)], []),
        (L("BN"), [(2, 16, 5, 5)], [(1, 16, 1, 1)] * 4),  # PSPNet: slope, bias, mean, var
        (L("BN", frozen=True, eps=1e-4), [(2, 16, 5, 5)], [(1, 16, 1, 1)] * 4),
        (L("BN", bn_mode="INFERENCE"), [(2, 16, 5, 5)], [(1, 16, 1, 1)] * 2),  # SegNet
    ],
)
def test_learnable_shapes(layer: Layer, bottoms: list, params: list) -> None:
    assert top_shapes(layer, bottoms) == [bottoms[0]]
    assert param_shapes(layer, bottoms) == params


def test_fork_bn_layout_fillers_and_count() -> None:
    import numpy as np

    from surgery.fillers import fill_layer, layer_fillers
    from surgery.ops._common import learnable_count

    blob = np.zeros((1, 16, 1, 1), np.float32)
    segnet = L("BN")
    segnet.params = [Param(data=blob), Param(data=blob)]  # loaded blobs decide: SegNet's 2
    assert param_shapes(segnet, [(2, 16, 5, 5)]) == [(1, 16, 1, 1)] * 2
    assert learnable_count(segnet) == 2 and learnable_count(L("BN")) == 4
    # fillers as the forks' LayerSetUp: an unset filler is constant 0; PSPNet's stored
    # variance starts at 1 when frozen, else 0
    one = {"type": "constant", "value": 1.0}
    frozen = L("BN", slope_filler=one, frozen=True)
    blobs = fill_layer(frozen, [(1, 3, 1, 1)] * 4, np.random.default_rng(0))
    assert [b.ravel().tolist() for b in blobs] == [[1.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3]
    assert layer_fillers(L("BN"))[3] == {"type": "constant", "value": 0.0}
    assert layer_fillers(L("BN", scale_filler=one, bn_mode="LEARN"))[0] == one
    # a layout no fork has, or fields of one fork with the other's blobs: one clear error
    for bad, what in [
        (L("BN"), "3 loaded blob"),
        (L("BN", frozen=True), "bn_param sets pspnet's fields"),
        (L("BN", frozen=True, bn_mode="INFERENCE"), "mixes PSPNet's fields"),
    ]:
        bad.params = [Param(data=blob)] * (3 if what.startswith("3") else 2 if "sets" in what
                                           else 0)
        with pytest.raises(UnsupportedLayerError, match=what) as info:
            param_shapes(bad, [(2, 16, 5, 5)])
        assert "'bn1'" in str(info.value)


@pytest.mark.parametrize(
    ("layer", "bottoms", "match"),
    [
        (L("Scale", nb=2), [(2, 16, 5, 5), (5, 5)], "must equal bottom"),
        (L("Scale", axis=3, num_axes=2), [(2, 16, 5, 5)], "exceeds"),
        (L("Bias", axis=4), [(2, 16, 5, 5)], "out of range"),
        (L("LRN"), [(2, 16)], "4-axis"),
        (L("LRN", local_size=4), [(1, 5, 4, 4)], "odd"),
        (L("PReLU"), [(16,)], "at least 2 axes"),
        (L("ShuffleChannel", group=3), [(1, 16, 2, 2)], "divide"),
    ],
)
def test_same_shape_errors(layer: Layer, bottoms: list, match: str) -> None:
    with pytest.raises(ShapeMismatchError, match=match):
        top_shapes(layer, bottoms)


def test_eltwise() -> None:
    assert top(L("Eltwise", nb=3), (2, 4, 3, 3), (2, 4, 3, 3), (2, 4, 3, 3)) == (2, 4, 3, 3)
    coeff = L("Eltwise", nb=2, operation="SUM", coeff=[1.0, -1.0])
    assert top(coeff, (2, 3), (2, 3)) == (2, 3)
    with pytest.raises(ShapeMismatchError, match=r"bottom\[1\] \(1, 4, 3, 3\) differs"):
        top(L("Eltwise", nb=2), (2, 4, 3, 3), (1, 4, 3, 3))
    with pytest.raises(ShapeMismatchError, match="only allowed for SUM"):
        top(L("Eltwise", nb=2, operation="PROD", coeff=[1.0, 2.0]), (2, 3), (2, 3))
    with pytest.raises(ShapeMismatchError, match="one coeff per bottom"):
        top(L("Eltwise", nb=2, coeff=[1.0]), (2, 3), (2, 3))


# -- joining, splitting, reshaping ------------------------------------------------------------
def test_concat() -> None:
    assert top(L("Concat", nb=2), (2, 3, 4, 4), (2, 5, 4, 4)) == (2, 8, 4, 4)
    assert top(L("Concat", nb=2, axis=-1), (2, 3, 4), (2, 3, 1)) == (2, 3, 5)
    assert top(L("Concat", nb=2, concat_dim=0), (2, 3), (5, 3)) == (7, 3)
    assert top(L("Concat", nb=1), (2, 3)) == (2, 3)
    with pytest.raises(ShapeMismatchError, match="concat axis 1") as err:
        top(L("Concat", nb=2), (2, 3, 4, 4), (2, 5, 4, 5))
    assert "(2, 5, 4, 5)" in str(err.value)
    with pytest.raises(ShapeMismatchError):
        top(L("Concat", nb=2), (2, 3, 4, 4), (2, 3, 16))


def test_slice() -> None:
    assert tops(L("Slice", nt=3, slice_point=[2, 5]), (2, 10, 3)) == [
        (2, 2, 3),
        (2, 3, 3),
        (2, 5, 3),
    ]
    assert tops(L("Slice", nt=3), (2, 9)) == [(2, 3)] * 3
    assert tops(L("Slice", nt=2, slice_dim=0), (4, 9)) == [(2, 9)] * 2
    assert tops(L("Slice", nt=2, axis=-1, slice_point=[1]), (4, 9)) == [(4, 1), (4, 8)]
    with pytest.raises(ShapeMismatchError, match="equally"):
        tops(L("Slice", nt=2), (2, 9))
    with pytest.raises(ShapeMismatchError, match="2 slice_point values for 2 tops"):
        tops(L("Slice", nt=2, slice_point=[1, 2]), (2, 9))
    with pytest.raises(ShapeMismatchError, match="strictly increasing"):
        tops(L("Slice", nt=3, slice_point=[5, 2]), (2, 9))
    with pytest.raises(ShapeMismatchError, match="past the axis"):
        tops(L("Slice", nt=3, slice_point=[2, 12]), (2, 9))


@pytest.mark.parametrize(
    ("attrs", "want"),
    [
        (dict(), (2, 60)),
        (dict(axis=2), (2, 3, 20)),
        (dict(axis=2, end_axis=2), (2, 3, 4, 5)),
        (dict(axis=1, end_axis=-2), (2, 12, 5)),
        (dict(axis=0), (120,)),
    ],
)
def test_flatten(attrs: dict, want: tuple) -> None:
    assert top(L("Flatten", **attrs), (2, 3, 4, 5)) == want


@pytest.mark.parametrize(
    ("attrs", "want"),
    [
        (dict(shape={"dim": [0, -1]}), (2, 60)),
        (dict(shape={"dim": [0, 0, -1, 1]}), (2, 3, 20, 1)),
        (dict(shape={"dim": [-1]}, axis=1, num_axes=2), (2, 12, 5)),
        (dict(shape={"dim": [1]}, axis=1, num_axes=0), (2, 1, 3, 4, 5)),
        (dict(shape={"dim": [1, 1]}, axis=-1, num_axes=0), (2, 3, 4, 5, 1, 1)),
        (dict(shape={"dim": [6, -1]}, axis=0, num_axes=2), (6, 1, 4, 5)),
        (dict(shape={"dim": [0, 2, -1, 0]}), (2, 2, 6, 5)),
        (dict(shape={"dim": [5, 4, 3, 2]}), (5, 4, 3, 2)),
    ],
)
def test_reshape(attrs: dict, want: tuple) -> None:
    assert top(L("Reshape", **attrs), (2, 3, 4, 5)) == want


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        (dict(shape={"dim": [-1, -1]}), "more than one"),
        (dict(shape={"dim": [7, -1]}), "not a multiple"),
        (dict(shape={"dim": [2, 3, 4, 6]}), "has 144 elements"),
        (dict(shape={"dim": [0, 0]}, axis=3), "no axis 4"),
        (dict(shape={"dim": [1]}, axis=2, num_axes=3), "exceeds"),
    ],
)
def test_reshape_errors(attrs: dict, match: str) -> None:
    with pytest.raises(ShapeMismatchError, match=match):
        top(L("Reshape", **attrs), (2, 3, 4, 5))


def test_crop() -> None:
    # HED: crop the 568x568 upscore to the 500x500 input at offset 34
    assert top(L("Crop", nb=2, offset=[34]), (1, 1, 568, 568), (1, 3, 500, 500)) == (1, 1, 500, 500)
    assert top(L("Crop", nb=2), (1, 2, 9, 9), (7, 7, 3, 4)) == (1, 2, 3, 4)
    assert top(L("Crop", nb=2, offset=[1, 2]), (1, 2, 9, 9), (1, 1, 8, 7)) == (1, 2, 8, 7)
    assert top(L("Crop", nb=2, axis=1, offset=[1]), (1, 4, 9, 9), (1, 3, 8, 8)) == (1, 3, 8, 8)
    with pytest.raises(ShapeMismatchError, match="does not fit"):
        top(L("Crop", nb=2, offset=[1, 3]), (1, 2, 9, 9), (1, 1, 8, 7))
    with pytest.raises(ShapeMismatchError, match="3 offsets for 2"):
        top(L("Crop", nb=2, offset=[1, 2, 3]), (1, 2, 9, 9), (1, 1, 8, 7))
    with pytest.raises(ShapeMismatchError, match="same number of axes"):
        top(L("Crop", nb=2), (1, 2, 9, 9), (8, 7))


def test_tile_permute() -> None:
    assert top(L("Tile", tiles=3), (2, 3, 4)) == (2, 9, 4)
    assert top(L("Tile", axis=-1, tiles=2), (2, 3, 4)) == (2, 3, 8)
    with pytest.raises(ShapeMismatchError, match="tiles"):
        top(L("Tile"), (2, 3))
    assert top(L("Permute", order=[0, 2, 3, 1]), (1, 12, 19, 19)) == (1, 19, 19, 12)
    assert top(L("Permute", order=[0, 2]), (1, 12, 19, 5)) == (1, 19, 12, 5)
    assert top(L("Permute"), (1, 12, 19, 5)) == (1, 12, 19, 5)
    with pytest.raises(ShapeMismatchError, match="order"):
        top(L("Permute", order=[0, 0]), (1, 2))


# -- losses, metrics, reductions --------------------------------------------------------------
def test_losses() -> None:
    assert tops(L("SoftmaxWithLoss", nb=2), (4, 10), (4,)) == [()]
    assert tops(L("SoftmaxWithLoss", nb=2, nt=2), (4, 10, 3, 3), (4, 1, 3, 3)) == [
        (),
        (4, 10, 3, 3),
    ]
    assert tops(L("EuclideanLoss", nb=2), (4, 10), (4, 2, 5)) == [()]
    assert tops(L("SigmoidCrossEntropyLoss", nb=2), (4, 10), (4, 10)) == [()]
    with pytest.raises(ShapeMismatchError, match="same first axis"):
        tops(L("SoftmaxWithLoss", nb=2), (4, 10), (3,))
    with pytest.raises(ShapeMismatchError, match="label count"):
        tops(L("SoftmaxWithLoss", nb=2), (4, 10, 2), (4,))
    with pytest.raises(ShapeMismatchError, match="count per item"):
        tops(L("EuclideanLoss", nb=2), (4, 10), (4, 9))


def test_accuracy_argmax_reduction() -> None:
    assert tops(L("Accuracy", nb=2), (4, 10), (4,)) == [()]
    assert tops(L("Accuracy", nb=2, nt=2, top_k=5), (4, 10), (4,)) == [(), (10,)]
    with pytest.raises(ShapeMismatchError, match="top_k"):
        tops(L("Accuracy", nb=2, top_k=11), (4, 10), (4,))
    with pytest.raises(ShapeMismatchError, match="number of labels"):
        tops(L("Accuracy", nb=2), (4, 10), (5,))
    assert top(L("ArgMax"), (2, 10)) == (2, 1, 1)
    assert top(L("ArgMax", top_k=3), (2, 10)) == (2, 1, 3)
    assert top(L("ArgMax", top_k=3, out_max_val=True), (2, 10)) == (2, 2, 3)
    assert top(L("ArgMax", top_k=3), (2, 10, 4, 4)) == (2, 1, 3, 1)
    assert top(L("ArgMax", axis=1, top_k=2), (2, 10, 4)) == (2, 2, 4)
    assert top(L("ArgMax", axis=-1, out_max_val=True), (2, 10, 4)) == (2, 10, 1)
    with pytest.raises(ShapeMismatchError, match="top_k"):
        top(L("ArgMax", axis=2, top_k=5), (2, 10, 4))
    assert top(L("Reduction"), (2, 3, 4)) == ()
    assert top(L("Reduction", axis=2, operation="MEAN"), (2, 3, 4)) == (2, 3)
    assert top(L("Reduction", axis=-1), (2, 3, 4)) == (2, 3)


def test_parameter_layer() -> None:
    layer = L("Parameter", nb=0, shape={"dim": [3, 4]})
    assert tops(layer) == [(3, 4)]
    assert param_shapes(layer, []) == [(3, 4)]


# -- data layers ------------------------------------------------------------------------------
def test_data_layers() -> None:
    inp = L("Input", nb=0, nt=2, shape=[{"dim": [1, 3, 8, 8]}, {"dim": [1]}])
    assert tops(inp) == [(1, 3, 8, 8), (1,)]
    assert tops(L("Input", nb=0, nt=2, shape=[{"dim": [2, 3]}])) == [(2, 3), (2, 3)]
    assert tops(L("Input", nb=0)) == [None]
    with pytest.raises(ShapeMismatchError, match="2 shapes for 3 tops"):
        tops(L("Input", nb=0, nt=3, shape=[{"dim": [1]}, {"dim": [2]}]))
    dummy = L("DummyData", nb=0, nt=2, shape=[{"dim": [2, 3]}, {"dim": [2]}])
    assert tops(dummy) == [(2, 3), (2,)]
    legacy = L("DummyData", nb=0, nt=2, num=[5], channels=[3, 1], height=[4, 1], width=[4, 1])
    assert tops(legacy) == [(5, 3, 4, 4), (5, 1, 1, 1)]
    mem = L("MemoryData", nb=0, nt=2, batch_size=4, channels=3, height=5, width=6)
    assert tops(mem) == [(4, 3, 5, 6), (4,)]
    for t in ("Data", "ImageData", "HDF5Data", "AnnotatedData", "Python"):
        assert tops(L(t, nb=0, nt=2)) == [None, None]


# -- SSD and fork layers ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attrs", "priors"),
    [
        (dict(min_size=[30.0], max_size=[60.0], aspect_ratio=[2.0]), 4),
        (dict(min_size=[30.0], max_size=[60.0], aspect_ratio=[2.0, 3.0]), 6),
        (dict(min_size=[30.0], aspect_ratio=[2.0, 3.0], flip=False), 3),
        (dict(min_size=[30.0], aspect_ratio=[2.0, 0.5]), 3),  # 0.5 already there by flip
        (dict(min_size=[30.0], aspect_ratio=[0.5, 2.0]), 3),
        (dict(min_size=[30.0], aspect_ratio=[1.0, 1.0000001]), 1),
        (dict(min_size=[30.0, 60.0], max_size=[60.0, 90.0], aspect_ratio=[2.0]), 8),
        (dict(min_size=[60.0]), 1),
    ],
)
def test_prior_box(attrs: dict, priors: int) -> None:
    layer = L("PriorBox", nb=2, **attrs)
    assert shapes.num_priors(layer) == priors
    assert top(layer, (1, 512, 38, 19), (1, 3, 300, 300)) == (1, 2, 38 * 19 * priors * 4)


def test_prior_box_errors() -> None:
    with pytest.raises(ShapeMismatchError, match="min_size"):
        top(L("PriorBox", nb=2), (1, 5, 3, 3), (1, 3, 30, 30))
    with pytest.raises(ShapeMismatchError, match="greater than"):
        top(L("PriorBox", nb=2, min_size=[30.0], max_size=[20.0]), (1, 5, 3, 3), (1, 3, 9, 9))
    with pytest.raises(ShapeMismatchError, match="one max_size per min_size"):
        top(L("PriorBox", nb=2, min_size=[3.0, 4.0], max_size=[20.0]), (1, 5, 3, 3), (1, 3, 9, 9))


def test_detection_output() -> None:
    p = 1917  # MobileNet-SSD's priors
    bottoms = [(1, p * 4), (1, p * 21), (1, 2, p * 4)]
    keep = L("DetectionOutput", nb=3, num_classes=21, keep_top_k=100, nms_param={"top_k": 100})
    assert top(keep, *bottoms) == (1, 1, 100, 7)
    nokeep = L("DetectionOutput", nb=3, num_classes=21, nms_param={"top_k": 10})
    assert top(nokeep, *bottoms) == (1, 1, 200, 7)
    batch = [(2, p * 4), (2, p * 21), (1, 2, p * 4)]
    assert top(keep, *batch) == (1, 1, 200, 7)
    with pytest.raises(ShapeMismatchError, match="num_classes"):
        top(L("DetectionOutput", nb=3, num_classes=20), *bottoms)
    with pytest.raises(ShapeMismatchError, match="location predictions"):
        top(L("DetectionOutput", nb=3, num_classes=21, share_location=False), *bottoms)


def test_upsample_interp() -> None:
    assert top(L("Upsample", scale=2), (1, 3, 4, 5)) == (1, 3, 8, 10)
    assert top(L("Upsample", nb=2, scale=2), (1, 3, 4, 5), (1, 3, 4, 5)) == (1, 3, 8, 10)
    explicit = L("Upsample", nb=2, upsample_h=7, upsample_w=9)
    assert top(explicit, (1, 3, 4, 5), (1, 3, 4, 5)) == (1, 3, 7, 9)
    assert top(L("Upsample", nb=2, pad_out_h=True), (1, 3, 4, 5), (1, 3, 4, 5)) == (1, 3, 7, 10)
    with pytest.raises(ShapeMismatchError, match="mask"):
        top(L("Upsample", nb=2), (1, 3, 4, 5), (1, 3, 4, 4))
    assert top(L("Interp", zoom_factor=2), (1, 3, 5, 6)) == (1, 3, 9, 11)
    assert top(L("Interp", shrink_factor=2), (1, 3, 5, 6)) == (1, 3, 3, 3)
    assert top(L("Interp", height=17, width=19), (1, 3, 5, 6)) == (1, 3, 17, 19)
    assert top(L("Interp", shrink_factor=2, zoom_factor=3), (1, 3, 9, 9)) == (1, 3, 13, 13)
    assert top(L("Interp", zoom_factor=2, pad_beg=-1, pad_end=-1), (1, 3, 5, 6)) == (1, 3, 5, 7)
    assert top(L("Interp", nb=2), (1, 3, 5, 6), (1, 1, 60, 61)) == (1, 3, 60, 61)
    with pytest.raises(ShapeMismatchError, match="ambiguous"):
        top(L("Interp", nb=2, zoom_factor=2), (1, 3, 5, 6), (1, 1, 60, 61))
    with pytest.raises(ShapeMismatchError, match="no output size"):
        top(L("Interp"), (1, 3, 5, 6))
    with pytest.raises(ShapeMismatchError, match="cropping"):
        top(L("Interp", zoom_factor=2, pad_beg=1), (1, 3, 5, 6))


def test_roi_and_axpy() -> None:
    roi = L("ROIPooling", nb=2, pooled_h=7, pooled_w=6, spatial_scale=0.0625)
    assert top(roi, (1, 256, 38, 50), (300, 5)) == (300, 256, 7, 6)
    ps = L("PSROIPooling", nb=2, output_dim=21, group_size=7, spatial_scale=0.0625)
    assert top(ps, (1, 21 * 49, 38, 50), (300, 5)) == (300, 21, 7, 7)
    with pytest.raises(ShapeMismatchError, match="output_dim"):
        top(ps, (1, 21 * 48, 38, 50), (300, 5))
    assert top(L("Axpy", nb=3), (2, 8, 1, 1), (2, 8, 5, 5), (2, 8, 5, 5)) == (2, 8, 5, 5)
    with pytest.raises(ShapeMismatchError, match="Axpy"):
        top(L("Axpy", nb=3), (2, 8, 1, 1), (2, 8, 5, 5), (2, 8, 5, 4))


# -- table mechanics --------------------------------------------------------------------------
def test_registering_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        shapes.shape_rule("ReLU")(lambda layer, bottoms: bottoms)
    with pytest.raises(ValueError, match="already registered"):
        shapes.param_rule("Convolution")(lambda layer, bottoms: [])


def test_unknown_type_and_top_count() -> None:
    with pytest.raises(UnsupportedLayerError, match="MyForkLayer"):
        top(L("MyForkLayer"), (1, 2))
    assert param_shapes(L("MyForkLayer"), [(1, 2)]) == []
    with pytest.raises(ShapeMismatchError, match="gives 1 top"):
        tops(L("ReLU", nt=2), (1, 2))
    assert {"Convolution", "PriorBox", "Interp", "Axpy"} <= shapes.supported_types()


@pytest.mark.parametrize(
    ("type_", "bottoms", "want"),
    [
        ("Accuracy", [(4, 10)], "takes 2 bottom"),
        ("ReLU", [(1, 2), (1, 2)], "takes 1 bottom"),
        ("Eltwise", [(1, 2)], "2 or more"),
        ("Scale", [(1, 2)] * 3, "1 to 2"),
        ("Input", [(1, 2)], "takes 0 bottom"),
    ],
)
def test_bottom_counts(type_: str, bottoms: list, want: str) -> None:
    with pytest.raises(ShapeMismatchError, match=want):
        top_shapes(L(type_, nb=len(bottoms)), bottoms)


def test_blob_shape_matches() -> None:
    assert shapes.blob_shape_matches((10, 500), (1, 1, 10, 500))
    assert shapes.blob_shape_matches((20,), (1, 1, 1, 20))
    assert shapes.blob_shape_matches((20, 1, 5, 5), (20, 1, 5, 5))
    assert not shapes.blob_shape_matches((10, 500), (1, 1, 500, 10))
    assert not shapes.blob_shape_matches((1, 2, 3, 4, 5), (2, 3, 4, 5))


# -- whole nets -------------------------------------------------------------------------------
def _lay(name: str, type_: str, bottoms: list[str], tops_: list[str], **attrs: Any) -> Layer:
    return Layer(name=name, type=type_, bottoms=bottoms, tops=tops_, attrs=attrs)


def small_net() -> Net:
    return Net(
        "small",
        [
            _lay("data", "Input", [], ["data"], shape=[{"dim": [2, 3, 9, 9]}]),
            _lay("conv1", "Convolution", ["data"], ["conv1"], num_output=4, kernel_size=[3]),
            _lay("relu1", "ReLU", ["conv1"], ["conv1"]),
            _lay("pool1", "Pooling", ["conv1"], ["pool1"], kernel_size=2, stride=2),
            _lay("fc", "InnerProduct", ["pool1"], ["fc"], num_output=10),
            _lay("prob", "Softmax", ["fc"], ["prob"]),
        ],
    )


def test_infer_small_net() -> None:
    flow = resolve(small_net())
    info = infer(flow)
    assert info.blob_shapes() == {
        "data": (2, 3, 9, 9),
        "conv1": (2, 4, 7, 7),
        "pool1": (2, 4, 4, 4),
        "fc": (2, 10),
        "prob": (2, 10),
    }
    conv, relu = flow.node("conv1"), flow.node("relu1")
    assert info.tops(conv) == [(2, 4, 7, 7)]
    assert info.bottoms(relu) == [(2, 4, 7, 7)]
    assert info.shape(relu.outputs[0]) == (2, 4, 7, 7)
    assert info.params(conv) == [(4, 3, 3, 3), (4,)]
    assert info.params(flow.node("fc")) == [(10, 64), (10,)]
    assert info.macs(conv) == 2 * 4 * 49 * 27
    assert info.macs(flow.node("fc")) == 2 * 64 * 10
    assert info.total_macs == 2 * 4 * 49 * 27 + 2 * 64 * 10
    assert info.unknown_types == []
    # input_shapes overrides the Input layer's own shape
    bigger = infer(flow, {"data": (1, 3, 17, 17)})
    assert bigger.blob_shapes()["fc"] == (1, 10)
    assert bigger.params(flow.node("fc")) == [(10, 4 * 8 * 8), (10,)]


def test_infer_unknown_propagates() -> None:
    net = small_net()
    net.layers[0] = _lay("data", "Data", [], ["data", "label"])
    net.layers.insert(3, _lay("fork", "MyForkLayer", ["conv1"], ["conv1"]))
    flow = resolve(net)
    info = infer(flow)
    assert all(s is None for s in info.blob_shapes().values())
    assert info.params(flow.node("conv1")) == []
    assert info.macs(flow.node("conv1")) == 0
    assert [n.name for n in info.unknown_types] == ["fork"]
    # with the data shape given, shapes flow until the unknown fork layer
    info = infer(flow, {"data": (2, 3, 9, 9)})
    got = info.blob_shapes()
    assert got["data"] == (2, 3, 9, 9) and got["label"] is None
    assert info.tops(flow.node("relu1")) == [(2, 4, 7, 7)]
    assert got["conv1"] is None and got["prob"] is None
    assert info.params(flow.node("conv1")) == [(4, 3, 3, 3), (4,)]


def test_infer_phases_and_silence() -> None:
    net = small_net()
    net.layers.append(_lay("label", "Input", [], ["label"], shape=[{"dim": [2]}]))
    loss = _lay("loss", "SoftmaxWithLoss", ["fc", "label"], ["loss"])
    from surgery.net import Rule

    loss.include = [Rule(phase="TRAIN")]
    net.layers.append(loss)
    net.layers.append(_lay("silence", "Silence", ["label"], []))
    train = infer(resolve(net, NetState("TRAIN")))
    assert train.blob_shapes()["loss"] == ()
    test = infer(resolve(net, NetState("TEST")))
    assert "loss" not in test.blob_shapes()


def test_infer_errors_name_layer_and_shapes() -> None:
    net = small_net()
    net.layers[1].attrs["kernel_size"] = [11]
    with pytest.raises(ShapeMismatchError, match=r"'conv1'.*\(2, 3, 9, 9\)"):
        infer(resolve(net))


def test_infer_checks_loaded_weights() -> None:
    net = small_net()
    fc = net.layer("fc")
    fc.params = [Param(np.zeros((10, 63), np.float32)), Param(np.zeros(10, np.float32))]
    with pytest.raises(ShapeMismatchError, match=r"'fc'.*\(10, 63\).*\(10, 64\)"):
        infer(resolve(net))
    info = infer(resolve(net), check_weights=False)
    assert info.blob_shapes()["fc"] == (2, 10)
    # legacy V1 4-D blobs compare on trailing axes
    fc.params = [Param(np.zeros((1, 1, 10, 64), np.float32)), Param(np.zeros(10, np.float32))]
    infer(resolve(net))
    fc.params = [Param(np.zeros((10, 64), np.float32))]
    with pytest.raises(ShapeMismatchError, match="1 blob"):
        infer(resolve(net))
    # declared param specs without data are not weights
    fc.params = [Param(lr_mult=1.0), Param(lr_mult=2.0)]
    infer(resolve(net))


# -- goldens from the reference Caffe ---------------------------------------------------------
GOLDEN_DIRS = (
    sorted(p for p in GOLDEN.iterdir() if (p / "probes.json").exists()) if GOLDEN.exists() else []
)
_SPLIT = re.compile(r"_split_\d+$")  # blobs of the Split layers Caffe inserted itself


def _load(prototxt: Path, weights: Path | None) -> Net:
    caffe_io = pytest.importorskip("surgery.caffe_io")
    if not hasattr(caffe_io, "load"):
        pytest.skip("surgery.caffe_io.load is not available yet")
    return caffe_io.load(prototxt, weights)


@pytest.mark.parametrize("folder", GOLDEN_DIRS, ids=[p.name for p in GOLDEN_DIRS])
def test_golden_shapes(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    probes = json.loads((folder / "probes.json").read_text())
    weights = folder / meta["weights"] if meta.get("weights") else None
    if weights is not None and not weights.exists():
        weights = None
    net = _load(folder / "net.prototxt", weights)
    flow = resolve(net, NetState(meta.get("phase", "TEST")))
    info = infer(flow, {k: tuple(v) for k, v in meta["inputs"].items()})
    assert info.unknown_types == []
    ours = info.blob_shapes()
    compared = 0
    for blob, probe in probes.items():
        if blob not in ours:
            assert _SPLIT.search(blob), f"{blob} is in Caffe's net but not in ours"
            continue
        assert ours[blob] == tuple(probe["shape"]), blob
        compared += 1
    assert compared >= len([b for b in probes if not _SPLIT.search(b)])
    # learnable blob shapes equal the arrays Caffe saved
    checked = 0
    for node in flow.nodes:
        loaded = [p.data for p in node.layer.params if p.data is not None]
        if not loaded:
            continue
        want = info.params(node)
        assert len(want) == len(loaded), node.name
        for w, arr in zip(want, loaded, strict=True):
            assert shapes.blob_shape_matches(w, arr.shape), (node.name, w, arr.shape)
            checked += 1
    if weights is not None:
        assert checked > 0


def test_golden_coverage() -> None:
    """Every layer type of the goldens has a rule."""
    if not GOLDEN_DIRS:
        pytest.skip("no goldens")
    types = set()
    for folder in GOLDEN_DIRS:
        types |= set(json.loads((folder / "meta.json").read_text())["layer_types"])
    assert types <= shapes.supported_types()
