"""Snapshots as Caffe writes them: ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``.

The caffemodel is the train net with the trained weights (:func:`surgery.caffe_io.save`), so
Caffe, OpenCV and ``surgery`` load it. The solverstate is Caffe's own ``SolverState``: ``iter``,
``learned_net`` (the caffemodel's path), ``current_step`` and one history blob per learnable
blob in Caffe's order -- ``Net::learnable_params()``: layers in order, each layer's blobs in
order, a blob shared by name counted once, at its first owner -- then, for AdaDelta and Adam, a
second one per blob. Frozen blobs (``lr_mult: 0``, BatchNorm statistics) have a history too
(zeros here: their rate is 0). Both files are written atomically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataflow import resolve
from ..errors import SolverError
from ..net import Net, NetState

__all__ = ["BlobRef", "blob_table", "learnable_order", "net_with_weights", "snapshot_paths",
           "history_blobs", "restore_history", "check_writable"]


@dataclasses.dataclass
class BlobRef:
    """A Caffe blob (layer, index) as a tensor of the torch module."""

    layer: str
    blob: int
    tensor: torch.Tensor
    is_param: bool
    transform: str | None


def blob_table(model: torch.nn.Module) -> dict[tuple[str, int], BlobRef]:
    """Caffe ``(layer, blob index)`` -> the module's parameter or buffer holding it."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)  # DistributedDataParallel
    names: dict[str, dict[str, Any]] = getattr(inner, "caffe_names", {})
    tensors = dict(inner.named_parameters(remove_duplicate=False))
    params = set(tensors)
    tensors.update(inner.named_buffers(remove_duplicate=False))
    out: dict[tuple[str, int], BlobRef] = {}
    for key, entry in names.items():
        if entry.get("blob") is None or key not in tensors:
            continue
        ref = (entry["layer"], int(entry["blob"]))
        out.setdefault(ref, BlobRef(ref[0], ref[1], tensors[key], key in params,
                                    entry.get("transform")))
    return out


def net_with_weights(net: Net, model: torch.nn.Module) -> Net:
    """A copy of ``net`` whose blobs are the module's current values
    (:func:`surgery.export.caffemodel.weights_from_torch`: every layer of that name, shared
    blobs, BatchNorm in Caffe's scaled form)."""
    from ..export.caffemodel import weights_from_torch

    new, _ = weights_from_torch(model, net)
    return new


def learnable_order(net: Net, state: NetState) -> list[tuple[str, int, tuple[int, ...]]]:
    """Caffe's ``learnable_params()`` for ``net`` in ``state``: (layer, blob, shape)."""
    out: list[tuple[str, int, tuple[int, ...]]] = []
    shared: set[str] = set()
    for node in resolve(net, state).nodes:
        lay = node.layer
        for i, p in enumerate(lay.params):
            if p.data is None:
                continue
            if p.name:
                if p.name in shared:
                    continue
                shared.add(p.name)
            out.append((lay.name, i, tuple(p.data.shape)))
    return out


def snapshot_paths(prefix: str, iteration: int) -> tuple[Path, Path]:
    """Caffe's ``SnapshotFilename``: ``<prefix>_iter_<N>.caffemodel`` / ``.solverstate``."""
    return (Path(f"{prefix}_iter_{iteration}.caffemodel"),
            Path(f"{prefix}_iter_{iteration}.solverstate"))


def check_writable(prefix: str) -> None:
    """Caffe's ``CheckSnapshotWritePermissions``: probe the snapshot folder before training.

    Raises:
        SolverError: the folder is missing or not writable.
    """
    import tempfile

    folder = Path(f"{prefix}_iter_0").parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".surgery-probe-"):
            pass
    except OSError as exc:
        raise SolverError(f"cannot write snapshots with snapshot_prefix {prefix!r}: folder "
                          f"{folder.resolve()}: {exc.strerror or exc}; create it or change "
                          "snapshot_prefix") from None


def history_blobs(optimizer: Any, model: torch.nn.Module, net: Net,
                  state: NetState) -> list[np.ndarray]:
    """The optimizer's history as Caffe's ``history_`` list (solverstate order)."""
    table = blob_table(model)
    order = learnable_order(net, state)
    keys = ["history", "update_history"][: getattr(optimizer, "histories", 1)]
    out: list[np.ndarray] = []
    for key in keys:
        for layer, i, shape in order:
            ref = table.get((layer, i))
            st = optimizer.state.get(ref.tensor, {}) if ref is not None and ref.is_param else {}
            h = st.get(key)
            if h is None:
                out.append(np.zeros(shape, np.float32))
            else:
                out.append(h.detach().to("cpu", torch.float32).numpy().reshape(shape))
    return out


def restore_history(optimizer: Any, model: torch.nn.Module, net: Net, state: NetState,
                    history: list[np.ndarray], where: str) -> None:
    """Load Caffe history blobs into the optimizer's state.

    Raises:
        SolverError: the count or a shape disagrees with the net (Caffe: "Incorrect length of
            history blobs").
    """
    table = blob_table(model)
    order = learnable_order(net, state)
    k = getattr(optimizer, "histories", 1)
    if len(history) != k * len(order):
        raise SolverError(
            f"{where}: {len(history)} history blobs, but this net has {len(order)} learnable "
            f"blobs and the {type(optimizer).__name__} solver keeps {k} per blob "
            f"({k * len(order)}); the solverstate is from another net or solver type")
    keys = ["history", "update_history"][:k]
    bad: list[str] = []
    for j, key in enumerate(keys):
        for (layer, i, shape), h in zip(order, history[j * len(order):(j + 1) * len(order)],
                                        strict=True):
            if h.size != int(np.prod(shape)):
                bad.append(f"{layer!r} blob {i}: {tuple(h.shape)} vs {shape}")
                continue
            ref = table.get((layer, i))
            if ref is None or not ref.is_param:
                continue
            t = torch.from_numpy(np.array(h, np.float32).reshape(ref.tensor.shape))
            optimizer.state[ref.tensor][key] = t.to(ref.tensor.device)
    if bad:
        raise SolverError(f"{where}: history shapes disagree with the net: {'; '.join(bad)}")
