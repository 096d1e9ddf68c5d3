"""Random initial weights from a net's own fillers: ``surgery init`` and ``--fill-missing``.

What Caffe does when it builds a net (every learnable blob drawn from its filler), written
into a caffemodel, so a net that has no weights at all -- or layers a caffemodel lacks --
can be exported, verified or fine-tuned without transplanting from an unrelated file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import NetError
from ..layers import WEIGHT_BIAS_TYPES
from ..net import Layer, Net, freeze_array
from . import _common as C
from .report import Report

__all__ = ["init_weights", "missing_weights", "ZERO_WEIGHT_FILLERS"]

# The zero-filler rule: a weight filler left at Caffe's default (constant 0) would start every
# output of the layer at the same value (and a whole net at exactly zero); such a weight gets
# this filler instead, reported. Biases keep constant 0, Caffe's usual start.
ZERO_WEIGHT_FILLERS: dict[str, dict[str, Any]] = {
    "InnerProduct": {"type": "gaussian", "std": 0.01},
    "Embed": {"type": "gaussian", "std": 0.01},
    "Convolution": {"type": "xavier"},
    "Deconvolution": {"type": "xavier"},
}


def missing_weights(net: Net) -> list[str]:
    """Learnable layers of ``net`` (names, net order) with no weights loaded."""
    named = net.by_name()
    return list(dict.fromkeys(
        lay.name for lay in net.layers
        if C.learnable_count(lay) > 0 and not any(t.has_weights for t in named[lay.name])
    ))


def _is_zero(filler: dict[str, Any] | None) -> bool:
    if filler is None:
        return True
    return filler.get("type", "constant") == "constant" and float(filler.get("value", 0)) == 0


def _blobs(lay: Layer, shapes: list[tuple[int, ...]], rng: np.random.Generator
           ) -> tuple[list[np.ndarray], str | None]:
    """Rules 2-3 for one layer: (blobs, what the rule changed or None)."""
    from ..fillers import fill, layer_fillers

    if lay.type == "BatchNorm":  # mean 0, variance 1, factor 1
        blobs = [np.zeros(shapes[0], np.float32), np.ones(shapes[1], np.float32),
                 np.ones(shapes[2], np.float32)]
        return [freeze_array(b) for b in blobs], "BatchNorm statistics: mean 0, variance 1"
    fillers = layer_fillers(lay)
    note = None
    if lay.type in WEIGHT_BIAS_TYPES and fillers and _is_zero(fillers[0]):
        fillers = [ZERO_WEIGHT_FILLERS.get(lay.type, {"type": "gaussian", "std": 0.01}),
                   *fillers[1:]]
        f = fillers[0]
        note = "weight filler constant 0 replaced by " + " ".join(
            [f["type"]] + [f"{k} {v:g}" for k, v in f.items() if k != "type"])
    blobs = [fill(fillers[i] if i < len(fillers) else None, s, rng) for i, s in enumerate(shapes)]
    if lay.type == "BN" and len(blobs) == 4:  # PSPNet's stored variance: 1
        blobs[3] = freeze_array(np.ones(shapes[3], np.float32))
    return blobs, note


def init_weights(
    net: Net,
    *,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    all_layers: bool = False,
    input_shapes: dict[str, Any] | None = None,
) -> tuple[Net, Report]:
    """Draw weights for the learnable layers of ``net`` that have none, as Caffe would.

    Rules:

    1. Each learnable layer without weights (every one when ``all_layers``) gets fresh blobs
       of the shapes shape inference gives (the first phase that infers), drawn in net order
       from its fillers with one seeded generator; TRAIN/TEST twins and blobs shared by
       ``param { name }`` get the same arrays.
    2. The zero-filler rule: a weight filler left at constant 0 (Caffe's default) becomes
       :data:`ZERO_WEIGHT_FILLERS` (gaussian std 0.01 for InnerProduct, xavier for
       convolutions), reported per layer; biases keep their filler.
    3. BatchNorm gets mean 0, variance 1, scale factor 1 (identity statistics, not Caffe's
       all-zero blobs, which OpenCV and a TEST-phase Caffe would read as variance 0).
    4. Layers that have weights keep them (the same arrays).

    Args:
        net: the net (not modified).
        seed: the seed (default :data:`surgery.fillers.DEFAULT_SEED`), reported.
        rng: a generator instead of ``seed``.
        all_layers: redraw layers that already have weights too.
        input_shapes: shapes of input/data tops by name (``--input-shape``); the others are
            what ``surgery info`` infers (:func:`surgery.shapes.starting_shapes`).

    Returns:
        ``(new net, report)``; ``report.data["filled"]`` lists the layers drawn.

    Raises:
        NetError: a layer's blob shapes cannot be inferred (the message says how to give an
            input shape).
    """
    out = net.copy()
    gen, used = C.make_rng(seed, rng)
    report = Report("init")
    report.seed = used
    names = (list(dict.fromkeys(lay.name for lay in out.layers if C.learnable_count(lay) > 0))
             if all_layers else missing_weights(out))
    cache = C._infos(out, input_shapes)
    shared: dict[str, np.ndarray] = {}
    filled: list[str] = []
    named = out.by_name()
    for name in names:
        twins = named.get(name, [])
        try:
            shapes = C.param_shapes(out, twins[0], _cache=cache)
        except NetError as exc:
            raise NetError(f"init: {exc}") from None
        blobs, note = _blobs(twins[0], shapes, gen)
        for i, b in enumerate(blobs):  # a blob shared by param name is one blob in Caffe
            key = twins[0].params[i].name if i < len(twins[0].params) else None
            if key and key in shared and shared[key].shape == b.shape:
                blobs[i] = shared[key]
            elif key:
                shared[key] = b
        for lay in twins:
            C.ensure_params(lay, len(blobs))
            del lay.params[len(blobs):]
            for p, b in zip(lay.params, blobs, strict=True):
                p.data = b
        filled.append(name)
        what = "random weights " + ", ".join("x".join(map(str, s)) or "scalar" for s in shapes)
        report.change(name, what + (f"; {note}" if note else ""))
    if not filled:
        report.note("every learnable layer already has weights: nothing drawn")
    report.data["filled"] = filled
    return C.finish(out, report)
