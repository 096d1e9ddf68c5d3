"""Caffe's data layers as PyTorch datasets, equal to Caffe's.

- :func:`dataset`: one ``torch.utils.data.Dataset`` for a ``Data`` (LMDB/LevelDB ``Datum``s,
  raw or encoded), ``ImageData`` (list file) or ``HDF5Data`` layer, built from the layer as
  written; an item is the layer's tops for one sample, in top order.
- :func:`loader`: a ``DataLoader`` in Caffe's order (sequential, wrapping, shuffled per pass
  where the layer says so), split round-robin across ranks as Caffe's multi-GPU data layers,
  with seeded random crops and mirrors.
- :mod:`surgery.data.transform`: Caffe's ``DataTransformer``; :mod:`surgery.data.mean`: mean
  files.

Needs the ``train`` extra (torch, lmdb, h5py, opencv-python-headless; plyvel for LevelDB).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..net import Net, NetState
    from .datasets import CaffeDataset
    from .loaders import CaffeLoader

__all__ = ["dataset", "loader", "read_mean", "write_mean", "Transformer", "TransformParam"]



def dataset(net: Net | str | os.PathLike[str], layer_name: str,
            phase: str | NetState = "train", *,
            seed: int | None = None) -> CaffeDataset:
    """The samples of a data layer as a ``torch.utils.data.Dataset``.

    Paths (``source``, ``mean_file``, list entries) are looked up relative to the working
    directory, then to the prototxt's folder; ``ds.resolved`` says which file was used.

    Args:
        net: a loaded :class:`~surgery.net.Net` or the path of its prototxt.
        layer_name: the data layer's name (TRAIN/TEST twins are told apart by ``phase``).
        phase: ``"train"`` or ``"test"``, any case, or a :class:`~surgery.net.NetState` (a
            solver's ``test_state`` with stages and level).
        seed: seeds the random crop/mirror of ``ds[i]`` (None: a fresh random seed).

    Returns:
        A :class:`~surgery.data.datasets.CaffeDataset`: ``len()`` is the source's size,
        ``ds[i]`` the tuple of float32 arrays the layer's tops get for sample ``i``.

    Raises:
        LayerNotFoundError: no such layer.
        DataError: a missing or empty source, a layer left out of ``phase``, an ``Input``-like
            layer (no source: the user feeds it), an unreadable mean file.
        UnsupportedLayerError: a data layer type without a dataset (WindowData, Python...).
    """
    from .datasets import as_net, build_dataset

    return build_dataset(as_net(net), layer_name, phase, seed=seed)


def loader(net: Net | str | os.PathLike[str], layer_name: str,
           phase: str | NetState = "train", *,
           batch_size: int | None = None, workers: int = 0, rank: int = 0,
           world_size: int = 1, seed: int | None = None) -> CaffeLoader:
    """A DataLoader over a data layer, in Caffe's order, endless as Caffe's cursor.

    Each batch is a tuple of tensors in top order (``loader.tops``), e.g. ``(data, label)``
    with data ``(N, C, H, W)`` float32 and label ``(N,)`` float32.

    Args:
        net: a loaded :class:`~surgery.net.Net` or the path of its prototxt.
        layer_name: the data layer's name.
        phase: ``"train"`` or ``"test"``, any case, or a :class:`~surgery.net.NetState`.
        batch_size: samples per batch (default: the layer's ``batch_size``).
        workers: DataLoader worker processes (0: read in this process).
        rank: this process's rank; it gets samples ``k`` with ``k % world_size == rank``.
        world_size: processes sharing the stream (Caffe's solver count).
        seed: seeds rand_skip, shuffles and the random crop/mirror (None: random); the same
            seed gives the same batches, whatever ``workers``.

    Returns:
        A :class:`~surgery.data.loaders.CaffeLoader` (pinned memory when CUDA is available).

    Raises:
        DataError: as :func:`dataset`, and bad batch_size/workers/rank; errors met while
            reading are raised by the iteration, naming the file and the item.
    """
    from .datasets import as_net, build_dataset
    from .loaders import make_loader

    ds = build_dataset(as_net(net), layer_name, phase, seed=seed)
    return make_loader(ds, batch_size=batch_size, workers=workers, rank=rank,
                       world_size=world_size, seed=seed)


def __getattr__(name: str) -> Any:
    if name in ("read_mean", "write_mean"):
        from . import mean

        return getattr(mean, name)
    if name in ("Transformer", "TransformParam"):
        from . import transform

        return getattr(transform, name)
    raise AttributeError(f"module 'surgery.data' has no attribute {name!r}")
