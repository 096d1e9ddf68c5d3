"""Definitions written for Caffe forks load, edit and write back (issue 7 item 16).

Part 1: fields of the widely used forks that the schema now holds (SegNet's
``dense_image_data_param``, its ``bn_param`` form, ``upsample_param`` and class-weighted
``loss_param``; PSPNet's training fork / DeepLab v2 ``transform_param`` augmentation, ImageSegData
``image_data_param`` and ``seg_accuracy_param``). The snippets follow the forks' published
prototxts (alexgkendall/SegNet-Tutorial, hszhao/PSPNet).

Part 2: anything still unknown is kept verbatim, reported by ``check``/``info``, written back
where it was, and only the export of a layer that sets it is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import surgery
from surgery import caffe_io
from surgery.check import check
from surgery.cli import main
from surgery.errors import ParseError, UnsupportedLayerError

SEGNET_TRAIN = """
name: "segnet"
layer {
  name: "data"
  type: "DenseImageData"
  top: "data"
  top: "label"
  dense_image_data_param {
    source: "/SegNet/CamVid/train.txt"
    batch_size: 4
    shuffle: true
  }
}
layer {
  name: "conv1_1"
  type: "Convolution"
  bottom: "data"
  top: "conv1_1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 4
    kernel_size: 3
    pad: 1
    weight_filler { type: "msra" }
    bias_filler { type: "constant" }
  }
}
layer {
  name: "conv1_1_bn"
  type: "BN"
  bottom: "conv1_1"
  top: "conv1_1"
  bn_param {
    scale_filler { type: "constant" value: 1 }
    shift_filler { type: "constant" value: 0.001 }
    bn_mode: LEARN
  }
}
layer {
  name: "pool1"
  type: "Pooling"
  bottom: "conv1_1"
  top: "pool1"
  top: "pool1_mask"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layer {
  name: "upsample1"
  type: "Upsample"
  bottom: "pool1"
  bottom: "pool1_mask"
  top: "upsample1"
  upsample_param { scale: 2 upsample_w: 8 upsample_h: 8 }
}
layer {
  name: "conv_classifier"
  type: "Convolution"
  bottom: "upsample1"
  top: "conv_classifier"
  convolution_param { num_output: 3 kernel_size: 1 }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "conv_classifier"
  bottom: "label"
  top: "loss"
  softmax_param { engine: CAFFE }
  loss_param {
    weight_by_label_freqs: true
    ignore_label: 2
    class_weighting: 0.2595
    class_weighting: 0.1826
    class_weighting: 4.5640
  }
}
"""

PSPNET_TRAIN = """
name: "pspnet"
layer {
  name: "data"
  type: "ImageSegData"
  top: "data"
  top: "label"
  include { phase: TRAIN }
  transform_param {
    mirror: true
    crop_size: 473
    mean_value: 104.008
    mean_value: 116.669
    mean_value: 122.675
    rand_resize: 0.5
    rand_resize: 2.0
    rand_rotate: -10
    rand_rotate: 10
    gaussian_blur: true
  }
  image_data_param {
    root_folder: "/ADE20K/"
    source: "train.txt"
    batch_size: 1
    shuffle: true
    label_type: PIXEL
    ignore_label: 255
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer {
  name: "accuracy"
  type: "SegAccuracy"
  bottom: "conv1"
  bottom: "label"
  top: "accuracy"
  seg_accuracy_param { ignore_label: 255 }
}
"""

UNKNOWN = """
name: "fork"
fancy_net_flag: true
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } }
  transform_param {
    scale_factors: 0.5
    scale_factors: 0.75
    fork_aug { kind: "blur"  sigma: [0.5, 1.0] }
  }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 hole: 2 }
}
layer {
  name: "relu1"
  type: "ReLU"
  bottom: "conv1"
  top: "conv1"
  my_fork_param {
    mode: FAST
    nested { a: 1 }
  }
}
"""


def _write(tmp_path: Path, text: str, name: str = "net.prototxt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _round_trip(tmp_path: Path, path: Path) -> tuple[surgery.Net, str]:
    net = surgery.load(path)
    out = tmp_path / ("rt_" + path.name)
    surgery.save(net, out)
    again = surgery.load(out)
    text = out.read_text()
    assert caffe_io.net_to_text(again) == text  # stable: a second write changes nothing
    return again, text


# -- part 1: the forks' fields ----------------------------------------------------------------
def test_segnet_train_net_loads_and_round_trips(tmp_path):
    net, text = _round_trip(tmp_path, _write(tmp_path, SEGNET_TRAIN))
    assert not net.verbatim and not any(lay.verbatim for lay in net.layers)
    data, bn, up, loss = (net.layer(n) for n in ("data", "conv1_1_bn", "upsample1", "loss"))
    assert data.attrs == {"source": "/SegNet/CamVid/train.txt", "batch_size": 4,
                          "shuffle": True}
    assert bn.attrs["bn_mode"] == "LEARN"
    assert bn.attrs["shift_filler"]["value"] == pytest.approx(0.001)
    assert up.attrs == {"scale": 2, "upsample_w": 8, "upsample_h": 8}
    lp = loss.extra["loss_param"]
    assert lp["weight_by_label_freqs"] is True and lp["ignore_label"] == 2
    assert lp["class_weighting"] == pytest.approx([0.2595, 0.1826, 4.564], rel=1e-6)
    for needle in ("dense_image_data_param {", "bn_mode: LEARN", "upsample_w: 8",
                   "weight_by_label_freqs: true", "class_weighting: 4.564"):
        assert needle in text
    problems = [p for p in check(net) if p.severity == "error"]
    assert not problems, problems


def test_segnet_train_net_through_an_edit_verb(tmp_path, capsys):
    src = _write(tmp_path, SEGNET_TRAIN)
    out = tmp_path / "frozen.prototxt"
    assert main(["freeze", str(src), "--until", "conv1_1_bn", "-o", str(out)]) == 0
    capsys.readouterr()
    net = surgery.load(out)
    assert net.layer("conv1_1").params[0].lr_mult == 0
    assert net.layer("loss").extra["loss_param"]["weight_by_label_freqs"] is True
    assert net.layer("upsample1").attrs["upsample_h"] == 8


def test_segnet_bn_fields_decide_the_fork_layout(tmp_path):
    from surgery.layers import bn_layout

    net = surgery.load(_write(tmp_path, SEGNET_TRAIN))
    assert bn_layout(net.layer("conv1_1_bn")) == "segnet"


def test_pspnet_training_fork_fields(tmp_path):
    net, text = _round_trip(tmp_path, _write(tmp_path, PSPNET_TRAIN))
    data = net.layer("data")
    tp = data.extra["transform_param"]
    assert tp["rand_resize"] == [0.5, 2.0] and tp["rand_rotate"] == [-10.0, 10.0]
    assert tp["gaussian_blur"] is True and tp["crop_size"] == 473
    assert data.attrs["label_type"] == "PIXEL" and data.attrs["ignore_label"] == 255
    assert net.layer("accuracy").attrs == {"ignore_label": [255]}
    assert "rand_resize: 0.5" in text and "label_type: PIXEL" in text


def test_fork_field_numbers_do_not_clash_with_bvlc():
    from surgery._proto import caffe_pb2

    lp = caffe_pb2.LayerParameter.DESCRIPTOR
    numbers = [f.number for f in lp.fields]
    assert len(numbers) == len(set(numbers))
    # BVLC keeps its numbers: SegNet's 137/138 and PSPNet's 164 are renumbered
    assert lp.fields_by_name["embed_param"].number == 137
    assert lp.fields_by_name["tile_param"].number == 138
    assert lp.fields_by_name["upsample_param"].number == 1139
    assert lp.fields_by_name["dense_image_data_param"].number == 1138
    # where they do not clash, the fork's own numbers
    up = caffe_pb2.UpsampleParameter.DESCRIPTOR.fields_by_name
    assert [up[n].number for n in ("scale", "scale_h", "scale_w", "pad_out_h", "pad_out_w",
                                   "upsample_h", "upsample_w")] == [1, 2, 3, 4, 5, 6, 7]
    dense = caffe_pb2.DenseImageDataParameter.DESCRIPTOR.fields_by_name
    assert dense["root_folder"].number == 9 and dense["is_color"].number == 7
    image = caffe_pb2.ImageDataParameter.DESCRIPTOR.fields_by_name
    assert image["ignore_label"].number == 15 and image["label_type"].number == 16


# -- part 2: unknown fields kept verbatim ------------------------------------------------------
def test_unknown_fields_are_kept_where_they_were(tmp_path):
    path = _write(tmp_path, UNKNOWN)
    net = surgery.load(path)
    assert [(v.dotted, v.where.rsplit(":", 1)[1]) for v in net.verbatim] == [
        ("fancy_net_flag", "3")]
    data, conv, relu = net.layers
    assert [v.dotted for v in data.verbatim] == [
        "transform_param.scale_factors", "transform_param.scale_factors",
        "transform_param.fork_aug"]
    assert [v.text for v in conv.verbatim] == ["hole: 2"]
    assert relu.verbatim[0].text == "my_fork_param {\n  mode: FAST\n  nested { a: 1 }\n}"
    # the known fields around them are read as usual
    assert conv.attrs == {"num_output": 4, "kernel_size": [3]}
    again, text = _round_trip(tmp_path, path)
    assert "fancy_net_flag: true\n" in text
    assert ("  transform_param {\n    scale_factors: 0.5\n    scale_factors: 0.75\n"
            '    fork_aug { kind: "blur"  sigma: [0.5, 1.0] }\n  }') in text
    assert "    kernel_size: 3\n    hole: 2\n  }" in text
    assert "  my_fork_param {\n    mode: FAST\n    nested { a: 1 }\n  }\n}" in text
    assert [v.text for lay in again.layers for v in lay.verbatim] == [
        v.text for lay in net.layers for v in lay.verbatim]


def test_unknown_fields_are_reported(tmp_path, capsys):
    path = _write(tmp_path, UNKNOWN)
    warnings = [p for p in check(surgery.load(path)) if "not in our schema" in p.message]
    assert len(warnings) == 1 + 3 + 1 + 1
    assert all(p.severity == "warning" for p in warnings)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "'convolution_param.hole'" in out and f"{path}:20" in out.replace("\n  ", " ")


def test_unknown_fields_survive_edits_and_weights(tmp_path, capsys):
    path = _write(tmp_path, UNKNOWN)
    net = surgery.load(path)
    rng = np.random.default_rng(0)
    conv = net.layer("conv1")
    conv.params = [surgery.Param(data=rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                   surgery.Param(data=np.zeros(4, np.float32))]
    proto, weights = tmp_path / "w.prototxt", tmp_path / "w.caffemodel"
    surgery.save(net, proto, weights)
    out = tmp_path / "frozen.prototxt"
    assert main(["freeze", str(proto), "--layers", "conv1", "-o", str(out)]) == 0
    capsys.readouterr()
    back = surgery.load(out, weights)
    assert [v.text for v in back.layer("conv1").verbatim] == ["hole: 2"]
    assert back.layer("conv1").params[0].lr_mult == 0
    np.testing.assert_array_equal(back.layer("conv1").params[0].data, conv.params[0].data)
    assert "scale_factors: 0.75" in out.read_text()


def test_export_refuses_only_layers_with_unknown_fields(tmp_path, capsys):
    pytest.importorskip("onnx")
    path = _write(tmp_path, UNKNOWN)
    net = surgery.load(path)
    from surgery.export.common import plan
    from surgery.export.onnx import supported_types

    with pytest.raises(UnsupportedLayerError) as err:
        plan(net, "test", supported=supported_types())
    msg = str(err.value)
    assert "'conv1' (Convolution): convolution_param.hole" in msg and f"{path}:20" in msg
    assert "'relu1' (ReLU): my_fork_param" in msg
    assert "'data'" not in msg  # the Input layer is not lowered: its fields do not matter
    out = tmp_path / "m.onnx"
    assert main(["export", "onnx", str(path), "-o", str(out)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "convolution_param.hole" in err_lines[0]
    assert not out.exists()
    # without the layers that set them, the rest exports: the unknown data-layer fields stay
    for name in ("conv1", "relu1"):
        net.layer(name).verbatim.clear()
    plan(net, "test", supported=supported_types())


def test_real_syntax_errors_still_fail_with_their_line(tmp_path):
    bad = UNKNOWN.replace("num_output: 4", "num_output: }")
    with pytest.raises(ParseError) as err:
        surgery.load(_write(tmp_path, bad))
    assert ":20:" in str(err.value)
    # a known field with a wrong value next to an unknown one: the line is still right
    bad = UNKNOWN.replace("num_output: 4", "num_output: -x")
    with pytest.raises(ParseError) as err:
        surgery.load(_write(tmp_path, bad, "b.prototxt"))
    assert "b.prototxt:20:" in str(err.value)


def test_unknown_field_in_a_legacy_block_is_still_an_error(tmp_path):
    v1 = 'name: "old"\nlayers { name: "c" type: CONVOLUTION fork_knob: 3 }\n'
    with pytest.raises(ParseError) as err:
        surgery.load(_write(tmp_path, v1))
    assert "fork_knob" in str(err.value) and ":2:" in str(err.value)


def test_segnet_class_weighted_loss_is_refused_in_train_export(tmp_path):
    pytest.importorskip("torch")
    from surgery.export.torch import to_torch

    net = surgery.load(_write(tmp_path, SEGNET_TRAIN))
    shapes = {"data": (2, 3, 8, 8), "label": (2, 1, 8, 8)}
    with pytest.raises(UnsupportedLayerError, match="class-weighted loss"):
        to_torch(net, "train", shapes, missing="fill")
    del net.layer("loss").extra["loss_param"]["class_weighting"]
    net.layer("loss").extra["loss_param"]["weight_by_label_freqs"] = False
    to_torch(net, "train", shapes, missing="fill")  # the plain loss lowers
