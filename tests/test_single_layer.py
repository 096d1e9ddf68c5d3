"""Single-layer nets with random weights and odd shapes: numpy reference vs torch (vs ONNX).

Each case is one Caffe layer behind ``Input`` layers. The numpy reference
(:mod:`surgery.export.reference`) is written from Caffe's loops; the PyTorch export and, when
importable, the ONNX export (run on onnxruntime) must agree with it.
"""

from __future__ import annotations

import importlib.util
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from surgery.dataflow import resolve  # noqa: E402
from surgery.export import reference  # noqa: E402
from surgery.export.torch import run_blobs, to_torch  # noqa: E402
from surgery.layers import param_field_for  # noqa: E402
from surgery.net import Layer, Net, Param  # noqa: E402
from surgery.shapes import infer  # noqa: E402

HAVE_ORT = (importlib.util.find_spec("onnxruntime") is not None
            and importlib.util.find_spec("onnx") is not None)
RTOL = 2e-5


@dataclass
class Case:
    """One single-layer test: a layer type with attrs, bottom shapes and input ranges."""

    id: str
    type: str
    attrs: dict[str, Any]
    shapes: list[tuple[int, ...]]
    ntops: int = 1
    positive: bool = False  # draw inputs in (0.1, 2) (Log, Power, STOCHASTIC)
    blobs: dict[int, Any] = field(default_factory=dict)  # fixed blob values by index
    onnx: bool = True  # the ONNX exporter is expected to lower it
    ints: dict[int, int] = field(default_factory=dict)  # bottom index -> exclusive int bound
    scale: float = 1.0  # inputs multiplied by it (eps placement, overflow)


A4 = (2, 3, 7, 9)
CASES: list[Case] = [
    # convolution: pad, stride, groups, dilation, per-axis, no bias
    Case("conv_pad_stride", "Convolution", {"num_output": 4, "kernel_size": [3], "pad": [1],
                                            "stride": [2]}, [A4]),
    Case("conv_group_dilation", "Convolution", {"num_output": 6, "kernel_size": [3], "group": 3,
                                                "dilation": [2], "pad": [2]}, [(1, 6, 9, 8)]),
    Case("conv_hw_nobias", "Convolution", {"num_output": 2, "kernel_h": 3, "kernel_w": 1,
                                           "pad_h": 1, "pad_w": 0, "stride_h": 2,
                                           "stride_w": 1, "bias_term": False}, [A4]),
    Case("conv_depthwise", "Convolution", {"num_output": 3, "kernel_size": [3], "group": 3,
                                           "stride": [2], "pad": [1]}, [A4]),
    Case("deconv_upsample", "Deconvolution", {"num_output": 4, "kernel_size": [4],
                                              "stride": [2], "pad": [1]}, [(1, 3, 5, 6)]),
    Case("deconv_group", "Deconvolution", {"num_output": 4, "kernel_size": [3], "group": 2,
                                           "stride": [2]}, [(1, 4, 5, 5)]),
    # pooling: Caffe's ceil rounding, clip rule, AVE divisor
    Case("pool_max_overhang", "Pooling", {"pool": "MAX", "kernel_size": [3], "stride": [2]},
         [(2, 3, 6, 6)]),
    Case("pool_max_pad", "Pooling", {"pool": "MAX", "kernel_size": [3], "stride": [2],
                                     "pad": [1]}, [(1, 2, 7, 8)]),
    Case("pool_ave_pad_overhang", "Pooling", {"pool": "AVE", "kernel_size": [3], "stride": [2],
                                              "pad": [1]}, [(1, 2, 6, 7)]),
    Case("pool_ave_big_pad", "Pooling", {"pool": "AVE", "kernel_size": [3], "stride": [2],
                                         "pad": [2]}, [(1, 2, 7, 6)]),
    Case("pool_max_big_pad", "Pooling", {"pool": "MAX", "kernel_size": [3], "stride": [2],
                                         "pad": [2]}, [(1, 2, 7, 6)]),
    Case("pool_ave_hw", "Pooling", {"pool": "AVE", "kernel_h": 3, "kernel_w": 2, "stride_h": 2,
                                    "stride_w": 2, "pad_h": 1, "pad_w": 0}, [(1, 2, 8, 7)]),
    Case("pool_ave_stride_gt_kernel", "Pooling", {"pool": "AVE", "kernel_size": [2],
                                                  "stride": [3]}, [(1, 2, 8, 8)]),
    Case("pool_max_floor", "Pooling", {"pool": "MAX", "kernel_size": [3], "stride": [2],
                                       "round_mode": "FLOOR"}, [(1, 2, 8, 8)]),
    Case("pool_ave_global", "Pooling", {"pool": "AVE", "global_pooling": True}, [(2, 3, 5, 4)]),
    Case("pool_max_global", "Pooling", {"pool": "MAX", "global_pooling": True}, [(2, 3, 5, 4)]),
    Case("pool_stochastic_test", "Pooling", {"pool": "STOCHASTIC", "kernel_size": [2],
                                             "stride": [2]}, [(1, 2, 6, 6)], positive=True,
         onnx=False),
    # fully connected
    Case("ip_axis1", "InnerProduct", {"num_output": 5}, [(2, 3, 4, 5)]),
    Case("ip_axis2", "InnerProduct", {"num_output": 3, "axis": 2}, [(2, 3, 4, 5)]),
    Case("ip_transpose", "InnerProduct", {"num_output": 4, "transpose": True}, [(3, 6)]),
    Case("ip_nobias", "InnerProduct", {"num_output": 4, "bias_term": False}, [(3, 6)]),
    # activations
    Case("relu", "ReLU", {}, [A4]),
    Case("relu_leaky", "ReLU", {"negative_slope": 0.1}, [A4]),
    Case("prelu", "PReLU", {}, [A4]),
    Case("prelu_shared", "PReLU", {"channel_shared": True}, [A4]),
    Case("sigmoid", "Sigmoid", {}, [A4]),
    Case("tanh", "TanH", {}, [A4]),
    Case("elu", "ELU", {"alpha": 0.5}, [A4]),
    Case("absval", "AbsVal", {}, [A4]),
    Case("power", "Power", {"power": 2.0, "scale": 0.5, "shift": 3.0}, [A4], positive=True),
    Case("power_sqrt", "Power", {"power": 0.5}, [A4], positive=True),
    Case("exp_base", "Exp", {"base": 2.0, "scale": 0.5, "shift": 0.1}, [A4]),
    Case("exp_e", "Exp", {}, [A4]),
    Case("log", "Log", {"shift": 1.0}, [A4], positive=True),
    Case("log_base10", "Log", {"base": 10.0, "scale": 2.0}, [A4], positive=True),
    Case("bnll", "BNLL", {}, [A4]),
    Case("threshold", "Threshold", {"threshold": 0.2}, [A4]),
    Case("clip", "Clip", {"min": -0.5, "max": 0.5}, [A4]),
    Case("swish", "Swish", {"beta": 1.5}, [A4]),
    Case("dropout", "Dropout", {"dropout_ratio": 0.3}, [A4]),
    # normalization
    Case("batchnorm_factor", "BatchNorm", {}, [A4], blobs={2: np.array([8.0], np.float32)}),
    Case("batchnorm_factor0", "BatchNorm", {"eps": 1e-3}, [A4],
         blobs={2: np.array([0.0], np.float32)}),
    Case("batchnorm_2d", "BatchNorm", {}, [(4, 5)], blobs={2: np.array([2.0], np.float32)}),
    Case("lrn_across", "LRN", {"local_size": 5, "alpha": 0.1, "beta": 0.75, "k": 2.0},
         [(2, 7, 4, 5)]),
    Case("lrn_within", "LRN", {"local_size": 3, "alpha": 0.5, "beta": 0.6,
                               "norm_region": "WITHIN_CHANNEL"}, [(2, 3, 6, 5)]),
    Case("normalize_default", "Normalize", {}, [A4]),
    Case("normalize_per_channel", "Normalize", {"across_spatial": False,
                                                "channel_shared": False}, [A4]),
    Case("mvn", "MVN", {}, [A4]),
    Case("mvn_across_nonorm", "MVN", {"across_channels": True, "normalize_variance": False},
         [A4]),
    Case("softmax", "Softmax", {}, [A4]),
    Case("softmax_axis2", "Softmax", {"axis": 2}, [A4]),
    Case("softmax_axis_last", "Softmax", {"axis": -1}, [A4]),
    # scale, bias, eltwise
    Case("scale_bias", "Scale", {"bias_term": True}, [A4]),
    Case("scale_axes", "Scale", {"axis": 1, "num_axes": 2}, [A4]),
    Case("scale_two_bottoms", "Scale", {"axis": 1}, [A4, (3, 7)]),
    Case("bias", "Bias", {}, [A4]),
    Case("bias_two_bottoms", "Bias", {"axis": 2}, [A4, (7, 9)]),
    Case("eltwise_sum_coeff", "Eltwise", {"operation": "SUM", "coeff": [1.0, -0.5, 2.0]},
         [A4, A4, A4]),
    Case("eltwise_sum", "Eltwise", {}, [A4, A4]),
    Case("eltwise_prod", "Eltwise", {"operation": "PROD"}, [A4, A4, A4]),
    Case("eltwise_max", "Eltwise", {"operation": "MAX"}, [A4, A4]),
    # shape layers
    Case("concat_c", "Concat", {}, [(2, 3, 4, 5), (2, 2, 4, 5)]),
    Case("concat_axis2", "Concat", {"axis": 2}, [(2, 3, 4, 5), (2, 3, 1, 5)]),
    Case("slice_points", "Slice", {"slice_point": [1, 3]}, [(2, 5, 3, 3)], ntops=3),
    Case("slice_equal_axis2", "Slice", {"axis": 2}, [(2, 3, 4, 3)], ntops=2),
    Case("split", "Split", {}, [A4], ntops=2),
    Case("flatten", "Flatten", {}, [A4]),
    Case("flatten_range", "Flatten", {"axis": 2, "end_axis": 3}, [(2, 3, 4, 5, 6)]),
    Case("reshape_infer", "Reshape", {"shape": {"dim": [0, -1]}}, [A4]),
    Case("reshape_axis", "Reshape", {"shape": {"dim": [3, 3]}, "axis": 2, "num_axes": 1},
         [(2, 3, 9, 4)]),
    Case("crop_offsets", "Crop", {"axis": 2, "offset": [1, 2]}, [(2, 3, 8, 9), (1, 1, 5, 4)]),
    Case("crop_axis1", "Crop", {"axis": 1, "offset": [1]}, [(2, 5, 6, 6), (2, 3, 4, 4)]),
    Case("tile", "Tile", {"axis": 1, "tiles": 3}, [(2, 2, 3, 4)]),
    Case("permute", "Permute", {"order": [0, 2, 3, 1]}, [A4]),
    Case("argmax_axis", "ArgMax", {"axis": 1, "top_k": 2}, [A4]),
    Case("argmax_maxval", "ArgMax", {"out_max_val": True}, [(2, 10)]),
    Case("reduction_sum", "Reduction", {"axis": 1}, [A4]),
    Case("reduction_mean", "Reduction", {"operation": "MEAN", "axis": 2}, [A4]),
    Case("reduction_asum_coeff", "Reduction", {"operation": "ASUM", "coeff": 0.5, "axis": 1},
         [A4]),
    Case("reduction_sumsq", "Reduction", {"operation": "SUMSQ"}, [A4]),
    Case("upsample_nearest", "Upsample", {"scale": 2}, [(1, 2, 3, 4)]),
    # fork layers with one meaning: PSPNet Interp, ShuffleNet ShuffleChannel, SENet Axpy
    Case("interp_zoom", "Interp", {"zoom_factor": 3}, [(2, 3, 4, 5)]),
    Case("interp_size", "Interp", {"height": 7, "width": 3}, [(1, 2, 5, 6)]),
    Case("interp_shrink_crop", "Interp", {"shrink_factor": 2, "pad_beg": -1, "pad_end": -1},
         [(1, 2, 9, 8)]),
    Case("interp_to_one", "Interp", {"height": 1, "width": 4}, [(1, 2, 5, 6)]),
    Case("shuffle_channel", "ShuffleChannel", {"group": 3}, [(2, 12, 3, 2)]),
    # the forks' BN: PSPNet's 4 blobs (random stats), SegNet's 2 (bn_mode set through the API)
    Case("bn_pspnet", "BN", {"eps": 1e-3}, [A4]),
    Case("bn_pspnet_frozen", "BN", {"frozen": True, "momentum": 0.95}, [(1, 4, 5, 3)]),
    Case("bn_segnet_inference", "BN", {"bn_mode": "INFERENCE"}, [A4]),
    Case("bn_segnet_learn", "BN", {"bn_mode": "LEARN"}, [A4]),
    Case("axpy", "Axpy", {}, [(2, 3, 1, 1), A4, A4]),
    # semantics the goldens do not reach
    Case("pool_ave_clip_unpadded_axis", "Pooling", {"pool": "AVE", "kernel_h": 3, "kernel_w": 1,
                                                    "stride_h": 2, "stride_w": 3, "pad_h": 1,
                                                    "pad_w": 0}, [(1, 2, 6, 6)]),
    Case("pool_max_clip_unpadded_axis", "Pooling", {"pool": "MAX", "kernel_h": 1, "kernel_w": 3,
                                                    "stride_h": 3, "stride_w": 2, "pad_h": 0,
                                                    "pad_w": 1}, [(1, 2, 6, 6)]),
    Case("deconv_group_dilation", "Deconvolution", {"num_output": 6, "kernel_size": [3],
                                                    "group": 3, "stride": [2], "dilation": [2],
                                                    "pad": [1]}, [(1, 6, 4, 5)]),
    Case("scale_two_bottoms_bias", "Scale", {"axis": 1, "bias_term": True}, [A4, (3, 7)]),
    Case("scale_scalar_bias", "Scale", {"num_axes": 0, "bias_term": True}, [A4]),
    Case("scale_to_the_end", "Scale", {"axis": -2, "num_axes": -1}, [A4]),
    Case("bias_scalar_bottom", "Bias", {}, [A4, ()]),
    Case("reshape_negative_axis", "Reshape", {"shape": {"dim": [1, -1]}, "axis": -2,
                                              "num_axes": 1}, [A4]),
    Case("slice_equal_three", "Slice", {}, [(2, 6, 3, 3)], ntops=3),
    Case("crop_one_offset_for_all", "Crop", {"offset": [2]}, [(2, 3, 8, 9), (1, 1, 5, 4)]),
    Case("power_zero", "Power", {"power": 0.0, "scale": 2.0}, [A4]),
    Case("power_scale_zero", "Power", {"power": 2.0, "scale": 0.0, "shift": 3.0}, [A4]),
    Case("log_base2_shift", "Log", {"base": 2.0, "scale": 0.5, "shift": 1.0}, [A4],
         positive=True),
    Case("bnll_large", "BNLL", {}, [A4], scale=40.0),
    Case("threshold_at_value", "Threshold", {"threshold": 1.0}, [A4], ints={0: 3}),
    Case("elu_alpha", "ELU", {"alpha": 2.5}, [A4], scale=3.0),
    Case("dropout_no_scale_train", "Dropout", {"dropout_ratio": 0.3, "scale_train": False}, [A4]),
    Case("batchnorm_batch_stats", "BatchNorm", {"use_global_stats": False}, [A4],
         blobs={2: np.array([4.0], np.float32)}),
    Case("lrn_within_k_ignored", "LRN", {"local_size": 5, "alpha": 0.3, "beta": 0.75, "k": 3.0,
                                         "norm_region": "WITHIN_CHANNEL"}, [(1, 2, 6, 7)]),
    Case("mvn_eps_on_std", "MVN", {"eps": 0.5}, [A4], scale=0.1),
    Case("normalize_eps_per_position", "Normalize", {"eps": 0.5, "across_spatial": False},
         [A4], scale=0.1),
    Case("softmax_axis0", "Softmax", {"axis": 0}, [A4]),
    Case("argmax_ties_top1", "ArgMax", {"axis": 1}, [A4], ints={0: 2}),
    Case("argmax_ties_axis", "ArgMax", {"axis": 1, "top_k": 2}, [A4], ints={0: 3}),
    Case("argmax_ties_flat_maxval", "ArgMax", {"top_k": 3, "out_max_val": True}, [A4],
         ints={0: 3}),
    Case("argmax_axis_maxval", "ArgMax", {"axis": -1, "top_k": 2, "out_max_val": True}, [A4]),
    Case("reduction_mean_coeff_neg_axis", "Reduction", {"operation": "MEAN", "axis": -2,
                                                        "coeff": -2.5}, [A4]),
]


def one_layer_net(case: Case, rng: np.random.Generator) -> Net:
    """An ``Input`` per bottom plus the layer under test, blobs drawn at random."""
    bottoms = [f"in{i}" for i in range(len(case.shapes))]
    layers = [
        Layer(f"input{i}", "Input", [], [b], attrs={"shape": [{"dim": list(s)}]},
              param_field="input_param")
        for i, (b, s) in enumerate(zip(bottoms, case.shapes, strict=True))
    ]
    tops = ["out"] if case.ntops == 1 else [f"out{i}" for i in range(case.ntops)]
    layer = Layer("layer/under-test", case.type, bottoms, tops, attrs=dict(case.attrs),
                  param_field=param_field_for(case.type))
    layers.append(layer)
    net = Net("single", layers)
    info = infer(resolve(net), check_weights=False)
    node = resolve(net).node(layer.name)
    shapes = info.node_params[next(n for n in info.node_params if n.layer is layer)]
    del node
    params = []
    for i, shape in enumerate(shapes):
        if i in case.blobs:
            data = np.asarray(case.blobs[i], np.float32).reshape(shape)
        elif (case.type, i) in (("BatchNorm", 1), ("BN", 3)):
            data = rng.uniform(0.5, 2.0, shape).astype(np.float32)  # variances
        else:
            data = rng.normal(0, 0.5, shape).astype(np.float32)
        params.append(Param(data=data))
    layer.params = params
    return net


def inputs_for(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i, s in enumerate(case.shapes):
        if i in case.ints:  # small integers: ties and values exactly at a threshold
            x = rng.integers(0, case.ints[i], s).astype(np.float32)
        elif case.positive:
            x = rng.uniform(0.1, 2.0, s).astype(np.float32)
        else:
            x = rng.normal(0, 1, s).astype(np.float32)
        out[f"in{i}"] = (x * np.float32(case.scale)).astype(np.float32)
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a.astype(np.float64) - b))) / max(scale, 1e-30) if b.size else 0.0


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_vs_torch(case: Case) -> None:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    net = one_layer_net(case, rng)
    feed = inputs_for(case, rng)
    layer = net.layers[-1]
    want = reference.forward(layer, [feed[b] for b in layer.bottoms])
    gm = to_torch(net)
    got = run_blobs(gm, feed)
    for top, w in zip(layer.tops, want, strict=True):
        assert rel_err(got[top], w) <= RTOL, (case.id, top, rel_err(got[top], w))


@pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed")
@pytest.mark.parametrize("case", [c for c in CASES if c.onnx], ids=[c.id for c in CASES if c.onnx])
def test_reference_vs_onnxruntime(case: Case) -> None:
    onnx_export = pytest.importorskip("surgery.export.onnx")
    from surgery.errors import UnsupportedLayerError

    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    net = one_layer_net(case, rng)
    feed = inputs_for(case, rng)
    layer = net.layers[-1]
    want = reference.forward(layer, [feed[b] for b in layer.bottoms])
    try:
        model = onnx_export.to_onnx(net)
    except UnsupportedLayerError as e:
        pytest.fail(f"ONNX cannot lower {case.id}: {e}")
    got = onnx_export.run_onnx(model, feed, device="cpu")
    for top, w in zip(layer.tops, want, strict=True):
        assert rel_err(got[top], w) <= RTOL, (case.id, top, rel_err(got[top], w))


def test_every_table_entry_has_a_case() -> None:
    """Each type the torch table lowers (bar TRAIN-only losses and aliases) has a case here."""
    from surgery.export.torch import torch_supported_types

    covered = {c.type for c in CASES}
    exempt = {"SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss",  # test_export_torch
              "PriorBox",  # golden SSD nets, exactly
              "ConvolutionDepthwise", "DepthwiseConvolution"}  # aliases of Convolution
    assert torch_supported_types() - exempt <= covered


def test_reference_table_covers_the_cases() -> None:
    assert {c.type for c in CASES} <= reference.supported_types()


@pytest.mark.parametrize(("attrs", "want"), [
    ({"axis": 1, "top_k": 2}, [2.0, 1.0]),
    ({"axis": 1}, [2.0]),
    ({"top_k": 3, "out_max_val": True}, [2.0, 1.0, 3.0, 5.0, 5.0, 3.0]),
])
def test_argmax_ties_take_the_higher_index(attrs: dict[str, Any], want: list[float]) -> None:
    """Caffe sorts (value, index) pairs with std::greater: among equal values the higher index
    comes first (torch.topk and ONNX TopK put the lower one first)."""
    case = Case("argmax_tie", "ArgMax", attrs, [(1, 4, 1, 1)])
    net = one_layer_net(case, np.random.default_rng(0))
    feed = {"in0": np.array([3, 5, 5, 3], np.float32).reshape(1, 4, 1, 1)}
    layer = net.layers[-1]
    outs = {"reference": reference.forward(layer, [feed["in0"]])[0],
            "torch": run_blobs(to_torch(net), feed)["out"]}
    if HAVE_ORT:
        from surgery.export.onnx import run_onnx, to_onnx

        outs["onnxruntime"] = run_onnx(to_onnx(net), feed, device="cpu")["out"]
    for name, got in outs.items():
        assert got.reshape(-1).tolist() == want, name
