"""Copy weights from a caffemodel into a net by layer name, as Caffe's
``Net::CopyTrainedLayersFrom`` does (``caffe train -weights``), with a report and options for
what Caffe treats as fatal.

The source is scanned, not parsed: its blobs are read-only views of the memory-mapped file, the
copied arrays stay views, and :func:`transplant_file` streams them to the output caffemodel, so a
550 MB transplant runs at about the speed of copying the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

from .. import _wire
from ..errors import LayerNotFoundError, NetError, ShapeMismatchError, SurgeryError, did_you_mean
from ..fillers import fill_layer, layer_fillers
from ..net import Layer, Net, Param, freeze_array
from ._common import finish, flows, learnable_count, make_rng
from .report import Report

__all__ = ["transplant", "transplant_file", "ON_MISMATCH"]

ON_MISMATCH = ("error", "reinit", "skip")
PathLike = str | os.PathLike[str]
Shape = tuple[int, ...]
_WEIGHTED = ("Convolution", "Deconvolution", "InnerProduct", "ConvolutionDepthwise",
             "DepthwiseConvolution", "Embed")


def _expected(
    net: Net, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[dict[int, list[Shape] | None], list[str]]:
    """Per target layer (by identity): the learnable blob shapes Caffe would create, or None
    when they cannot be known (unknown fork type, or unknown input shapes); and the input
    shape assumptions made (as ``surgery info`` makes them)."""
    from ..layers import LEARNABLE_TYPES
    from ..shapes import infer, starting_shapes, supported_types

    known = supported_types()
    out: dict[int, list[Shape] | None] = {}
    assumptions: list[str] = []
    for flow in flows(net).values():
        start, notes = starting_shapes(flow, input_shapes)
        try:
            info = infer(flow, start, check_weights=False)
        except SurgeryError:
            info = None
        else:
            assumptions += notes.values()
        for node in flow.nodes:
            lay = node.layer
            if out.get(id(lay)) is not None:
                continue
            if lay.type not in LEARNABLE_TYPES:
                # a known type without learnable blobs takes none; an unknown fork type: anything
                out[id(lay)] = [] if lay.type in known else None
                continue
            shapes = None
            if info is not None and node in info.node_params:
                try:
                    shapes = [tuple(int(d) for d in s) for s in info.params(node)]
                except SurgeryError:
                    shapes = None
            out[id(lay)] = shapes
    return out, assumptions


def _fmt(shapes: list[Shape] | None) -> str:
    if shapes is None:
        return "unknown"
    return "[" + ", ".join("x".join(str(d) for d in s) or "scalar" for s in shapes) + "]"


def _matches(blob: _wire.BlobRecord, want: Shape) -> bool:
    """Caffe's ``Blob::ShapeEquals``: legacy num/channels/height/width blobs compare on trailing
    axes (``1x1xNxK`` equals ``NxK``), others exactly."""
    from ..shapes import blob_shape_matches

    found = tuple(int(d) for d in blob.data.shape)
    if blob.legacy_4d:
        return blob_shape_matches(want, found)
    return found == tuple(want)


def transplant(
    net: Net,
    source: _wire.WeightFile | PathLike,
    map: Mapping[str, str] | None = None,
    on_mismatch: str = "error",
    *,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[Net, Report]:
    """Give ``net`` the weights of ``source``, matched by layer name.

    Rules (Caffe's ``CopyTrainedLayersFrom``, ``../shared/CAFFE_RULES.md``):

    1. Source layers named ``<blob>_<layer>_<i>_split`` (``Split`` layers Caffe inserted and
       saved) are ignored.
    2. Each source layer goes to the target layer(s) of the same name -- all TRAIN/TEST twins
       -- after ``map`` (``{source name: target name}``); a mapped source layer no longer goes
       to its own name. Every ``map`` key must be a source layer and every value a target
       layer. With duplicate source names the later one wins (Caffe copies both in order).
    3. Source layers with no target are left unused and listed (those without blobs, such as
       data and loss layers, are only counted).
    4. The blob count and every blob shape must equal what the target's definition creates
       (shape inference, from the input shapes ``surgery info`` infers: dataset layers'
       shapes read off the definition, each assumption reported as a note, unless
       ``input_shapes`` gives them); legacy 4-D blobs (V1 num/channels/height/width)
       compare on trailing axes and are reshaped to the target shape (a V1 InnerProduct
       weight ``1x1xNxK`` becomes ``NxK``). Copied arrays are zero-copy views of the source file.
    5. A mismatch is, by ``on_mismatch``: ``"error"`` (default, Caffe's behaviour) one
       :class:`ShapeMismatchError` naming every mismatched layer with both shapes and the fixes;
       ``"reinit"`` fresh values from the layer's fillers (``rng``/``seed``, reported);
       ``"skip"`` not copied: the layer keeps the weights it has, else is filled as in rule 6.
    6. A target layer with learnable blobs and no source keeps the weights ``net`` already has
       (as with ``caffe train -weights a,b``, later files override), else gets fresh values from
       its fillers; a weight filler left at Caffe's default (constant 0) adds a warning note.
    7. Layers of a type shape inference does not know take the source blobs as they are.

    Args:
        net: the target net (not modified); its weights, if any, are the starting point.
        source: a scanned caffemodel (:func:`surgery.caffe_io.read_weights`) or its path.
        map: source layer name -> target layer name.
        on_mismatch: ``"error"``, ``"reinit"`` or ``"skip"``.
        rng: generator for fresh values (wins over ``seed``).
        seed: seed for fresh values (default :data:`surgery.fillers.DEFAULT_SEED`).
        input_shapes: shapes of input/data tops by name (``--input-shape``), overriding what
            the definition implies.

    Returns:
        ``(new net, report)``; ``report.data`` has ``counts`` (copied, reinitialised, skipped,
        filled, kept, unused, splits_ignored, no_blobs) and ``bytes`` (copied, reinitialised,
        filled, unused), and the layer lists ``copied``, ``reinitialised``, ``skipped``,
        ``filled``, ``kept``, ``unused``.

    Raises:
        ParseError: ``source`` cannot be read as a caffemodel.
        LayerNotFoundError: a ``map`` entry names no source or no target layer.
        ShapeMismatchError: blob count or shape mismatch with ``on_mismatch="error"``.
        NetError: bad ``on_mismatch``, or fresh values needed where shapes cannot be inferred.
    """
    if on_mismatch not in ON_MISMATCH:
        raise NetError(f"on_mismatch must be one of {', '.join(ON_MISMATCH)}, got {on_mismatch!r}")
    if not isinstance(source, _wire.WeightFile):
        from ..caffe_io import read_weights

        source = read_weights(source)
    src_name = os.fspath(source.path) if source.path else "the source caffemodel"
    out = net.copy()
    report = Report("transplant")
    mapping = dict(map or {})
    records = [r for r in source.layers if not r.is_split]  # rule 1
    splits = len(source.layers) - len(records)
    src_names = list(dict.fromkeys(r.name for r in records))
    tgt_names = list(dict.fromkeys(lay.name for lay in out.layers))
    for s, d in mapping.items():  # rule 2
        if s not in src_names:
            raise LayerNotFoundError(
                f"--map {s}={d}: {src_name} has no layer {s!r}" + did_you_mean(s, src_names)
            )
        if d not in tgt_names:
            where = f" {out.source}" if out.source else " the net"
            raise LayerNotFoundError(
                f"--map {s}={d}: {where.strip()} has no layer {d!r}" + did_you_mean(d, tgt_names)
            )
    by_target: dict[str, _wire.LayerRecord] = {}
    unused: list[_wire.LayerRecord] = []
    no_blobs = 0
    dupes: list[str] = []
    targets = set(tgt_names)  # membership per record: a set, or this loop is quadratic
    for rec in records:
        dst = mapping.get(rec.name, rec.name)
        if dst not in targets:  # rule 3
            if rec.blobs:
                unused.append(rec)
            else:
                no_blobs += 1
            continue
        if dst in by_target:
            dupes.append(rec.name)
        by_target[dst] = rec
    if unused and not any(r.blobs for r in by_target.values()):
        names = [r.name for r in unused]
        raise SurgeryError(
            f"{src_name}: none of its {len(names)} layer(s) with weights "
            f"({', '.join(repr(n) for n in names[:3])}{', ...' if len(names) > 3 else ''}) "
            f"is named like a layer of {out.source or 'the net'}; is this the right "
            "caffemodel? Map names with --map SRC=DST"
        )
    for name in dict.fromkeys(dupes):
        report.note(f"source has several layers named {name!r}: the last one was copied")
    expected, assumptions = _expected(out, input_shapes)
    for line in dict.fromkeys(assumptions):
        report.note(f"assumed: {line}")
    gen: np.random.Generator | None = None

    def draw() -> np.random.Generator:
        nonlocal gen
        if gen is None:
            gen, report.seed = make_rng(seed, rng)
        return gen

    lists: dict[str, list[str]] = {k: [] for k in
                                   ("copied", "reinitialised", "skipped", "filled", "kept")}
    nbytes = {"copied": 0, "reinitialised": 0, "filled": 0,
              "unused": sum(b.data.nbytes for r in unused for b in r.blobs)}
    mismatches: list[str] = []
    zero_fillers: list[str] = []
    named = out.by_name()
    for name in tgt_names:
        twins = named.get(name, [])
        rec = by_target.get(name)
        want = next((expected[id(t)] for t in twins if expected.get(id(t)) is not None), None)
        if rec is not None:
            problem = _compare(rec, want, twins[0])
            if problem is None and not rec.blobs and not want:
                no_blobs += 1  # matched, nothing to copy (ReLU, Pooling...)
                continue
            if problem is None:  # rule 4
                blobs = _adopt(rec, want)
                for t in twins:
                    _set_blobs(t, blobs)
                lists["copied"].append(name)
                nbytes["copied"] += sum(b.nbytes for b in blobs)
                if want is None and rec.blobs:
                    report.note(f"{name}: type {twins[0].type} has no shape rule; its "
                                f"{len(rec.blobs)} source blob(s) were copied unchecked")
                continue
            if on_mismatch == "error":  # rule 5
                mismatches.append(f"{name!r} ({problem})")
                continue
            if on_mismatch == "reinit":
                blobs = _fresh(twins[0], want, draw, name)
                for t in twins:
                    _set_blobs(t, blobs)
                lists["reinitialised"].append(name)
                nbytes["reinitialised"] += sum(b.nbytes for b in blobs)
                report.change(name, f"re-initialised from its fillers ({problem})")
                zero_fillers += _zero_filler(twins[0])
                continue
            lists["skipped"].append(name)
            report.leave(name, f"not copied ({problem})")
            # fall through: keep or fill as a layer without source (rule 6)
        n_blobs = len(want) if want is not None else learnable_count(twins[0])
        if n_blobs == 0:
            continue
        if all(p.data is not None for p in twins[0].params[:n_blobs]) and len(
                twins[0].params) >= n_blobs:
            if rec is None:
                lists["kept"].append(name)
                report.leave(name, "not in the source: kept its current weights")
            continue
        blobs = _fresh(twins[0], want, draw, name)
        for t in twins:
            _set_blobs(t, blobs)
        if rec is None:
            lists["filled"].append(name)
            report.change(name, f"not in the source: filled from its fillers {_fmt(want)}")
        nbytes["filled"] += sum(b.nbytes for b in blobs)
        zero_fillers += _zero_filler(twins[0])
    if mismatches:
        raise ShapeMismatchError(
            f"cannot copy {src_name} into {out.source or 'the net'}: "
            + "; ".join(mismatches[:5])
            + (f"; and {len(mismatches) - 5} more" if len(mismatches) > 5 else "")
            + ". Rename the target layer to learn it from scratch, map the source layer to "
            "another one with --map SRC=DST, or pass --on-mismatch reinit (fresh values from "
            "the fillers) or skip"
        )
    for name in zero_fillers:
        report.note(
            f"warning: {name}: its weight filler is constant 0 (Caffe's default when none is "
            "given), so it starts at zero and a product with it stops learning; set a "
            "weight_filler (xavier, msra or gaussian)"
        )
    for rec in unused:
        report.leave(rec.name, f"source layer ({rec.type}) with no target layer: unused")
    if lists["copied"]:
        report.note(f"copied {len(lists['copied'])} layer(s), {nbytes['copied']:,} bytes, "
                    f"from {src_name}")
    if splits:
        report.note(f"ignored {splits} split layer(s) Caffe inserted")
    report.data.update(
        source=src_name,
        counts={
            "copied": len(lists["copied"]),
            "reinitialised": len(lists["reinitialised"]),
            "skipped": len(lists["skipped"]),
            "filled": len(lists["filled"]),
            "kept": len(lists["kept"]),
            "unused": len(unused),
            "splits_ignored": splits,
            "no_blobs": no_blobs,
        },
        bytes=nbytes,
        unused=[r.name for r in unused],
        map=mapping,
        on_mismatch=on_mismatch,
        **lists,
    )
    return finish(out, report)


def _compare(rec: _wire.LayerRecord, want: list[Shape] | None, layer: Layer) -> str | None:
    """None when ``rec``'s blobs fit ``want``, else what differs (both shapes)."""
    found = [tuple(int(d) for d in b.data.shape) for b in rec.blobs]
    if want is None:
        return None
    if len(found) != len(want):
        return (f"{len(found)} blob(s) {_fmt(found)} in the source, {layer.type} needs "
                f"{len(want)} {_fmt(want)}")
    bad = [i for i, (b, w) in enumerate(zip(rec.blobs, want, strict=True)) if not _matches(b, w)]
    if bad:
        return f"source blobs {_fmt(found)}, target needs {_fmt(want)}"
    return None


def _adopt(rec: _wire.LayerRecord, want: list[Shape] | None) -> list[np.ndarray]:
    """The source arrays, reshaped (as views) to the target's shapes."""
    out = []
    for i, b in enumerate(rec.blobs):
        a = b.data
        if want is not None and tuple(a.shape) != tuple(want[i]):
            a = a.reshape(want[i])
        out.append(freeze_array(a))
    return out


def _fresh(layer: Layer, want: list[Shape] | None, draw: Callable[[], np.random.Generator],
           name: str) -> list[np.ndarray]:
    if want is None:
        raise NetError(
            f"layer {name!r} ({layer.type}): needs fresh values but its blob shapes cannot be "
            "inferred; give the net an input shape (--input-shape BLOB=N,C,H,W, or an Input "
            "layer)"
        )
    return fill_layer(layer, want, draw())


def _set_blobs(layer: Layer, blobs: list[np.ndarray]) -> None:
    while len(layer.params) < len(blobs):
        layer.params.append(Param())
    del layer.params[len(blobs):]
    for p, b in zip(layer.params, blobs, strict=True):
        p.data = b


def _zero_filler(layer: Layer) -> list[str]:
    if layer.type not in _WEIGHTED:
        return []
    f = layer_fillers(layer)[0]
    if f.get("type", "constant") == "constant" and float(f.get("value", 0.0)) == 0.0:
        return [layer.name]
    return []


def transplant_file(
    net: Net | PathLike,
    source: _wire.WeightFile | PathLike,
    output: PathLike,
    map: Mapping[str, str] | None = None,
    on_mismatch: str = "error",
    *,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """:func:`transplant`, then stream the result to the caffemodel ``output`` (atomically).

    Source blobs are memory-mapped views; :func:`surgery.caffe_io.save` writes each one's
    bytes without copying, so this runs at about file-copy speed.

    Args:
        net: the target net, or the path of its ``.prototxt``.
        source: the source caffemodel (scanned or path).
        output: the caffemodel to write (may be the source: it is replaced atomically).
        map: source layer name -> target layer name.
        on_mismatch: ``"error"``, ``"reinit"`` or ``"skip"``.
        rng: generator for fresh values.
        seed: seed for fresh values.
        progress: called with (bytes written, total) while writing.

    Returns:
        The report; ``data["output"]`` and ``data["bytes_written"]`` are added.

    Raises:
        Everything :func:`transplant` raises; SurgeryError when the file cannot be written.
    """
    from ..caffe_io import load, save

    target = net if isinstance(net, Net) else load(net)
    new, report = transplant(target, source, map, on_mismatch, rng=rng, seed=seed)
    save(new, weights=output, progress=progress)
    report.data["output"] = os.fspath(output)
    report.data["bytes_written"] = os.path.getsize(output)
    return report
