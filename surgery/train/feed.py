"""Batches for the data layers of a training or test net.

One :class:`Feed` per data layer yields, per forward pass, one tensor per top (in top order).
Where the batches come from, in order of preference:

1. the user's own data for that layer name (``datasets={"data": ds}``): a map-style
   ``Dataset`` (``ds[i]`` is a tuple of arrays, one per top, or one array for a one-top layer)
   read as Caffe reads a source -- sequentially, wrapping, sample ``k`` to rank
   ``k % world_size`` -- in batches of the layer's ``batch_size``; or a list, a
   ``DataLoader`` or any other iterable of ready batches (tuples of tensors in top order, or
   dicts by top name), re-iterated when it ends;
2. ``DummyData``: drawn from its fillers each pass (Caffe refills non-constant fillers);
3. every other data layer: :func:`surgery.data.loader` (Caffe's order and transforms).

``Input`` layers have no source: they need (1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..dataflow import resolve
from ..errors import NetError
from ..fillers import fill
from ..layers import attr, ints, is_data
from ..net import Layer, Net, NetState

__all__ = ["Feed", "source_layers", "make_feeds"]


def source_layers(net: Net, state: NetState) -> list[Layer]:
    """The layers that produce data for ``state`` (the export's graph inputs), in order."""
    out = []
    for node in resolve(net, state).nodes:
        lay = node.layer
        if lay.type == "Input" or is_data(lay) or (
                lay.type in ("DummyData", "MemoryData") and not lay.bottoms):
            out.append(lay)
    return out


class Feed:
    """Endless batches for one data layer: :meth:`next` gives one tensor per top."""

    def __init__(self, layer: Layer, batches: Iterator[Sequence[Any]], what: str) -> None:
        self.layer = layer
        self.tops = list(layer.tops)
        self.what = what
        self._it = batches
        self._pushed: list[list[torch.Tensor]] = []

    def next(self) -> list[torch.Tensor]:
        if self._pushed:
            return self._pushed.pop()
        batch = next(self._it)
        if isinstance(batch, Mapping):
            batch = [batch[t] for t in self.tops]
        elif isinstance(batch, torch.Tensor | np.ndarray):
            batch = [batch]
        out = [torch.as_tensor(b) for b in batch]
        if len(out) != len(self.tops):
            raise NetError(f"data layer {self.layer.name!r} ({self.what}) gave {len(out)} "
                           f"tensors per batch for its {len(self.tops)} tops {self.tops}")
        return out

    def peek(self) -> list[torch.Tensor]:
        """The next batch, left in place (for the shapes the export needs)."""
        b = self.next()
        self._pushed.append(b)
        return b


def _batch_size(layer: Layer) -> int | None:
    v = attr(layer, "batch_size", None)
    return int(v) if v else None


def _collate(items: list[Any], ntops: int) -> list[torch.Tensor]:
    if ntops == 1 and not isinstance(items[0], tuple | list):
        items = [(x,) for x in items]
    return [torch.as_tensor(np.stack([np.asarray(it[j]) for it in items]))
            for j in range(ntops)]


def _map_batches(ds: Any, batch_size: int, ntops: int, rank: int, world: int
                 ) -> Iterator[list[torch.Tensor]]:
    n = len(ds)
    if n == 0:
        raise NetError("the dataset given for a data layer is empty")
    k = rank
    while True:
        items = []
        for _ in range(batch_size):
            items.append(ds[k % n])
            k += world
        yield _collate(items, ntops)


def _cycle(it: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for b in it:
            empty = False
            yield b
        if empty:
            raise NetError("the batches given for a data layer are empty")


def _dummy(layer: Layer, rng: np.random.Generator) -> Iterator[list[torch.Tensor]]:
    a = layer.attrs
    shapes: list[tuple[int, ...]] = [tuple(ints(s.get("dim", []))) for s in a.get("shape", [])]
    if not shapes:
        legacy = [ints(a.get(k, [])) for k in ("num", "channels", "height", "width")]
        shapes = [tuple(d[i] if len(d) > 1 else d[0] for d in legacy)
                  for i in range(len(layer.tops))] if all(legacy) else []
    if len(shapes) == 1:
        shapes = shapes * len(layer.tops)
    if len(shapes) != len(layer.tops):
        raise NetError(f"DummyData {layer.name!r}: {len(shapes)} shapes for "
                       f"{len(layer.tops)} tops")
    fillers = list(a.get("data_filler", []))
    if len(fillers) <= 1:
        fillers = (fillers or [None]) * len(layer.tops)
    while True:
        yield [torch.from_numpy(fill(f, s, rng).astype(np.float32))
               for f, s in zip(fillers, shapes, strict=True)]


def make_feeds(net: Net, state: NetState, *, datasets: Mapping[str, Any] | None = None,
               rank: int = 0, world_size: int = 1, seed: int | None = None,
               workers: int = 0) -> list[Feed]:
    """One :class:`Feed` per data layer of ``net`` in ``state`` (see the module's rules).

    Raises:
        NetError: an ``Input`` layer without a dataset, or a dataset without a batch size.
        DataError, UnsupportedLayerError: from :func:`surgery.data.loader`.
    """
    datasets = dict(datasets or {})
    feeds: list[Feed] = []
    phase = state.phase.lower()
    for layer in source_layers(net, state):
        user = datasets.get(layer.name)
        if user is not None:
            if (hasattr(user, "__getitem__") and hasattr(user, "__len__")
                    and not isinstance(user, list | tuple | torch.utils.data.DataLoader)):
                bs = _batch_size(layer)
                if bs is None:
                    raise NetError(f"data layer {layer.name!r} has no batch_size: give a "
                                   "DataLoader (batches) instead of a Dataset")
                it = _map_batches(user, bs, len(layer.tops), rank, world_size)
            else:
                it = _cycle(user)
            feeds.append(Feed(layer, it, "your dataset"))
        elif layer.type == "DummyData":
            rng = np.random.default_rng([0 if seed is None else seed, rank, len(feeds)])
            feeds.append(Feed(layer, _dummy(layer, rng), "DummyData"))
        elif layer.type == "Input":
            raise NetError(f"layer {layer.name!r} is an Input layer: it has no data to train "
                           f"on; give it a dataset (Trainer(..., datasets={{{layer.name!r}: "
                           "ds}})) or replace it by a data layer")
        else:
            from ..data import loader

            ld = loader(net, layer.name, phase, workers=workers, rank=rank,
                        world_size=world_size, seed=seed)
            feeds.append(Feed(layer, iter(ld), layer.type))
    return feeds
