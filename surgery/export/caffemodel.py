"""Trained PyTorch weights back to a Caffe caffemodel: the way back from :mod:`.torch`.

A module exported by :func:`surgery.export.to_torch` (or the ``CaffeNet`` of a generated
``model.py``, or just its state dict) maps every parameter and buffer to a Caffe layer and blob
index (``caffe_names``); :func:`weights_from_torch` puts the tensors back into those blobs and
:func:`to_caffemodel` writes the caffemodel, so Caffe and OpenCV compute what the module
computes in ``eval()``.

Rules:

1. Each ``caffe_names`` entry with a blob index gives that blob of every layer of that name
   (TRAIN/TEST twins alike); a shared blob (``param { name }``) goes to each layer sharing it.
   Tensors are reshaped to the blob's shape in the net (its loaded weights, else the tensor's
   own shape; the forks' ``BN`` blobs are ``1 x C x 1 x 1``) and stored as float32.
2. BatchNorm: the module holds the statistics already divided by Caffe's factor (blob 2).
   They are written back in Caffe's scaled form, ``[mean * f, var * f, f]``, with ``f`` the
   module's own factor when ``model`` is a module that tracked it (``caffe_factor``: Caffe's
   blob 2 as training in torch advanced it), else the factor the net had (its loaded blob 2,
   else the factor recorded at export), 1 when that was 0 or unknown, or ``bn_factor`` when
   given. Keeping the factor keeps Caffe's moving average where it was if training continues
   in Caffe; ``bn_factor=1`` writes the statistics exactly.
3. Layers of the net that the module does not hold (another phase's layers, layers cut off
   by the export) keep the net's own weights and are reported; without weights they are left
   out of the file (Caffe then initialises them from their fillers).
4. A state dict key from ``torch.compile`` (``_orig_mod.``) or DDP (``module.``) is read
   without its prefix; keys no entry names are reported and ignored; an entry whose tensor is
   missing, or a tensor of the wrong size, is an error naming every such blob.

The tensors are read through ``state_dict()`` (or a mapping of arrays), so this module needs
torch only when it is given a torch module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NetError, SurgeryError
from ..layers import LEARNABLE_TYPES
from ..net import Net, Param
from ..ops.report import Report

__all__ = ["weights_from_torch", "to_caffemodel", "read_torch_dir", "read_state_dict"]

_PREFIXES = ("_orig_mod.", "module.")


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor: a copy, never a view of live weights
        return np.array(value.detach().cpu().float().numpy(), dtype=np.float32, copy=True)
    return np.asarray(value, dtype=np.float32)


def _state_of(model: Any) -> dict[str, np.ndarray]:
    """The model's tensors by name, wrapper prefixes removed."""
    if hasattr(model, "state_dict") and not isinstance(model, Mapping):
        state = model.state_dict()
    else:
        state = model
    # converted lazily: only the tensors an entry names
    return {_unwrapped(str(key)): value for key, value in state.items()}


def _unwrapped(key: str) -> str:
    """``key`` without the prefixes torch.compile (``_orig_mod.``) and DDP (``module.``) add."""
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if key.startswith(pre):
                key, changed = key[len(pre):], True
    return key


def _names_of(model: Any, caffe_names: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if caffe_names is not None:
        return caffe_names
    inner = model
    for _ in range(4):
        found = getattr(inner, "caffe_names", None)
        if found is None:
            found = getattr(type(inner), "CAFFE_NAMES", None)
        if found:
            return found
        mods = getattr(inner, "_modules", {})
        inner = mods.get("_orig_mod") or mods.get("module")
        if inner is None:
            break
    raise SurgeryError(
        "the model carries no caffe_names (which parameter is which Caffe blob): pass "
        "caffe_names= (the 'caffe_names' of the export's caffe_names.json)"
    )


def _tracked_factors(model: Any) -> dict[str, float]:
    """Module path (wrapper prefixes removed) -> ``caffe_factor`` of each BatchNorm module."""
    if not hasattr(model, "named_modules"):
        return {}
    out: dict[str, float] = {}
    for name, mod in model.named_modules():
        factor = getattr(mod, "caffe_factor", None)
        if factor is None:
            continue
        out[_unwrapped(name + ".")[:-1]] = float(factor)
    return out


def _bn_factor(net: Net, layer: str, entry: Mapping[str, Any], bn_factor: float | None,
               tracked: float | None = None) -> float:
    if bn_factor is not None:
        return float(bn_factor)
    if tracked is not None and tracked > 0:
        return tracked
    for lay in net.layers_named(layer):
        if len(lay.params) > 2 and lay.params[2].data is not None:
            f = float(np.asarray(lay.params[2].data).reshape(-1)[0])
            return f if f > 0 else 1.0
    f = float(entry.get("factor") or 0.0)
    return f if f > 0 else 1.0


def weights_from_torch(
    model: Any,
    net: Net,
    *,
    caffe_names: Mapping[str, Any] | None = None,
    bn_factor: float | None = None,
) -> tuple[Net, Report]:
    """A copy of ``net`` holding the module's weights (the module's rules 1-4).

    Args:
        model: an exported module (``to_torch``, a generated ``model.py``'s, compiled or
            DDP-wrapped) or a state dict (tensors or arrays by name).
        net: the definition the module was exported from (with or without weights).
        caffe_names: parameter/buffer name -> ``{"layer", "blob", ...}``; default: the
            module's own (``caffe_names`` / ``CAFFE_NAMES``).
        bn_factor: BatchNorm's blob 2 to write (rule 2); default: keep the net's factor.

    Returns:
        ``(new net, report)``; ``report.data["counts"]`` counts layers ``written``, ``kept``
        (rule 3) and ``left_out``.

    Raises:
        SurgeryError: no ``caffe_names``.
        NetError: a tensor missing from the state dict, a layer not in the net, or a size
            that does not fit the blob (all named at once).
    """
    names = _names_of(model, caffe_names)
    state = _state_of(model)
    tracked = _tracked_factors(model)
    out = net.copy()
    report = Report("import_torch")
    # (layer, blob) -> (keys naming it, entry)
    wanted: dict[tuple[str, int], tuple[list[str], Mapping[str, Any]]] = {}
    shared: dict[str, list[str]] = {}  # param { name } -> every key holding it
    for key, entry in names.items():
        if entry.get("blob") is None:
            continue  # constants (PriorBox): not weights
        slot = wanted.setdefault((str(entry["layer"]), int(entry["blob"])), ([], entry))
        slot[0].append(key)
        if entry.get("shared"):
            shared.setdefault(str(entry["shared"]), []).append(key)
    problems: list[str] = []
    blobs: dict[str, dict[int, np.ndarray]] = {}
    for (layer, index), (keys, entry) in wanted.items():
        twins = out.layers_named(layer)
        if not twins:
            problems.append(f"layer {layer!r} is not in the net")
            continue
        # safetensors' save_model stores a shared tensor once, under one of its names
        keys = keys + shared.get(str(entry.get("shared") or ""), [])
        key = next((k for k in keys if k in state), None)
        if key is None:
            problems.append(f"{layer!r} blob {index}: no tensor {' / '.join(keys)}")
            continue
        arr = _to_numpy(state[key])
        lay = twins[0]
        if lay.type == "BatchNorm" and index in (0, 1):
            f = _bn_factor(net, layer, entry, bn_factor, tracked.get(key.rpartition(".")[0]))
            arr = (arr.reshape(-1) * np.float32(f)).astype(np.float32)
            blobs.setdefault(layer, {})[2] = np.array([f], np.float32)
        old = lay.params[index].data if index < len(lay.params) else None
        if old is not None:
            shape = tuple(np.shape(old))
        elif lay.type == "BN":
            shape = (1, arr.size, 1, 1)
        else:
            shape = arr.shape
        if int(np.prod(shape)) != arr.size:
            problems.append(f"{layer!r} blob {index}: {key} has {arr.size} values "
                            f"{tuple(arr.shape)}, the net's blob is {shape}")
            continue
        blobs.setdefault(layer, {})[index] = np.ascontiguousarray(arr.reshape(shape))
    if problems:
        raise NetError(f"{len(problems)} blob(s) cannot be written back: "
                       + "; ".join(problems))
    used = {k for keys, _ in wanted.values() for k in keys}
    extra = sorted(k for k in state if k not in used and k not in names)
    if extra:
        report.note(f"{len(extra)} tensor(s) name no Caffe blob and were ignored: "
                    + ", ".join(extra[:10]) + (" ..." if len(extra) > 10 else ""))
    counts = {"written": 0, "kept": 0, "left_out": 0}
    for layer, by_index in blobs.items():
        twins = out.layers_named(layer)
        n = max(max(by_index) + 1, len(twins[0].params))
        for lay in twins:
            while len(lay.params) < n:
                lay.params.append(Param())
            for i, arr in by_index.items():
                arr.setflags(write=False)
                lay.params[i].data = arr
        missing = [i for i in range(n) if twins[0].params[i].data is None]
        if missing:
            raise NetError(f"layer {layer!r}: the model gives blobs {sorted(by_index)} but "
                           f"not {missing}")
        counts["written"] += 1
        what = ", ".join(f"{i}: {'x'.join(map(str, a.shape)) or '1'}"
                         for i, a in sorted(by_index.items()))
        report.change(layer, f"blobs from torch ({what})")
    for name in dict.fromkeys(lay.name for lay in out.layers if lay.name not in blobs):
        first = out.layers_named(name)[0]
        if any(p.data is not None for p in first.params):
            counts["kept"] += 1
            report.leave(name, "not in the torch model: the net's weights kept")
        elif first.type in LEARNABLE_TYPES:
            counts["left_out"] += 1
            report.leave(name, "not in the torch model and no weights: left out (Caffe "
                               "fills it from its fillers)")
    report.data["counts"] = counts
    return out, report


def to_caffemodel(
    model: Any,
    net: Net,
    path: str | os.PathLike[str],
    *,
    caffe_names: Mapping[str, Any] | None = None,
    bn_factor: float | None = None,
) -> Report:
    """Write the module's weights as a caffemodel for ``net`` (atomically).

    See :func:`weights_from_torch` for the rules and arguments; the file holds every layer
    with weights, as Caffe's ``Net::ToProto`` writes it.

    Returns:
        The report (``data["output"]`` is the path written).

    Raises:
        SurgeryError, NetError: as :func:`weights_from_torch`, or the file cannot be written.
    """
    from ..caffe_io import save

    new, report = weights_from_torch(model, net, caffe_names=caffe_names, bn_factor=bn_factor)
    save(new, None, path)
    report.data["output"] = str(path)
    return report


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Tensors from ``.safetensors`` (no torch needed) or a torch file read with
    ``torch.load(weights_only=True)`` (a state dict, or a checkpoint holding one under
    ``state_dict``/``model``).

    Raises:
        SurgeryError: the file cannot be read, or holds no state dict.
    """
    from .._inputs import check_regular

    p = Path(path)
    check_regular(p, "state dict")  # a FIFO or device would block the readers below
    if p.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise SurgeryError("reading .safetensors needs the safetensors package: "
                               "pip install 'caffe-surgery[torch]'") from None
        try:
            return dict(load_file(str(p)))
        except Exception as exc:  # safetensors raises its own error types
            raise SurgeryError(f"{p}: not a safetensors file ({exc})") from None
    try:
        import torch
    except ImportError:
        raise SurgeryError(f"{p}: reading a torch file needs torch (or save the state dict "
                           "as .safetensors)") from None
    try:
        import warnings

        with warnings.catch_warnings():  # a hostile pickle is refused; one line says so
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SurgeryError(f"{p}: cannot read with torch.load(weights_only=True): "
                           f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise SurgeryError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def read_torch_dir(
    folder: str | os.PathLike[str],
    state_dict: str | os.PathLike[str] | None = None,
    net: str | os.PathLike[str] | None = None,
) -> tuple[Net, dict[str, Any], dict[str, Any]]:
    """What ``surgery export torch`` wrote: ``(net, state dict, caffe_names)``.

    ``model.py`` is never executed: the tensors come from ``weights.safetensors`` (or
    ``state_dict``), the mapping from ``caffe_names.json`` and the definition from
    ``net.prototxt`` (or ``net``, for folders written before it was saved there).

    Raises:
        SurgeryError: a missing or unreadable file.
    """
    from ..caffe_io import load

    d = Path(folder)
    meta_path = d / "caffe_names.json"
    if not meta_path.is_file():
        raise SurgeryError(f"{d}: no caffe_names.json (is it a folder `surgery export torch` "
                           "wrote?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        names = dict(meta["caffe_names"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SurgeryError(f"{meta_path}: unreadable ({exc})") from None
    net_path = Path(net) if net is not None else d / "net.prototxt"
    if not net_path.is_file():
        raise SurgeryError(f"{net_path}: no such file; give the definition the model was "
                           "exported from (--net NET.prototxt)")
    state = read_state_dict(state_dict if state_dict is not None
                            else d / "weights.safetensors")
    return load(net_path), state, names
