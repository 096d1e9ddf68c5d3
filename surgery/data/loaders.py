"""Batches in Caffe's order: a ``torch.utils.data.DataLoader`` over a :class:`CaffeDataset`.

Caffe's data layers read their source with a cursor: sequentially from a start (``rand_skip``:
a random 0..rand_skip-1), wrapping to the first record at the end, forever. A shuffling layer
(ImageData and HDF5Data ``shuffle: true``) reorders each pass. With several solvers (multi-GPU),
the ``k``-th record the cursor reads goes to rank ``k % world_size`` (BVLC ``DataLayer::Skip``).
:class:`CaffeSampler` yields exactly that stream for one rank, as ``(index, k)`` pairs; the
dataset seeds sample ``k``'s random choices (crop, mirror) with ``(seed, k)``, so one seed gives
the same batches whatever the number of workers.

The sampler never ends, as Caffe's cursor: take as many batches as the solver needs
(``itertools.islice`` or ``next``). ``batches_per_pass`` says how many make one pass.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data

from ..errors import DataError, SurgeryError
from .datasets import CaffeDataset, _Failure, _Pixels
from .transform import Transformer

__all__ = ["CaffeSampler", "CaffeLoader", "collate", "make_loader"]


class CaffeSampler(torch.utils.data.Sampler):
    """Caffe's cursor for one rank: an endless stream of ``(source index, position)``.

    Args:
        dataset: the dataset (its source decides the order of each pass).
        rank: this process's rank.
        world_size: the number of processes sharing the stream.
        seed: seeds ``rand_skip`` and the shuffles.
    """

    def __init__(self, dataset: CaffeDataset, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        self.n = len(dataset)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.source = dataset.source
        self.shuffle = dataset.shuffle
        self.skip = 0
        if dataset.rand_skip:
            self.skip = int(np.random.default_rng([seed, 2]).integers(dataset.rand_skip))
            if self.skip >= self.n:
                raise DataError(f"{dataset.where}rand_skip {dataset.rand_skip} drew {self.skip}, "
                                f"past the end of the source ({self.n} samples): lower rand_skip")
        self._orders: dict[int, np.ndarray | None] = {}

    def order(self, epoch: int) -> np.ndarray | None:
        """The source indices of pass ``epoch`` (None: in source order)."""
        if not self.shuffle:
            return None
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = self.source.epoch_order(epoch, self.seed)
        return self._orders[epoch]

    def index(self, position: int) -> int:
        """The source index of the stream's ``position``-th sample."""
        epoch, r = divmod(self.skip + position, self.n)
        order = self.order(epoch)
        return r if order is None else int(order[r])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.rank
        while True:
            yield self.index(k), k
            k += self.world_size


@dataclass
class _PixelBatch:
    """A batch whose first top is uint8 crops still to finish in the main process."""

    pixels: torch.Tensor
    draws: torch.Tensor
    rest: tuple[torch.Tensor, ...]

    def pin_memory(self) -> _PixelBatch:
        """Called by the DataLoader's pinning thread: the other tops are pinned there, the
        finished data top in :meth:`CaffeLoader.__iter__`."""
        return _PixelBatch(self.pixels, self.draws, tuple(t.pin_memory() for t in self.rest))


def collate(items: list[Any], transformer: Transformer | None = None
            ) -> tuple[torch.Tensor, ...] | _PixelBatch | _Failure:
    """Stack items into one tensor per top (a failed item's error passes through).

    Samples of different shapes cannot share a batch (Caffe reshapes to the first and then
    fails a CHECK): that is an error naming the shapes. Items still holding uint8 pixels
    (:class:`~surgery.data.datasets._Pixels`) make a :class:`_PixelBatch`.
    """
    for it in items:
        if isinstance(it, _Failure):
            return it
    pixels = [isinstance(it, _Pixels) for it in items]
    if any(pixels) and not all(pixels):  # uint8 and float sources mixed: finish here
        assert transformer is not None
        items = [_finished(it, transformer) if p else it
                 for it, p in zip(items, pixels, strict=True)]
    if all(pixels):
        first = _stack([it.pixels for it in items], torch.uint8)
        if isinstance(first, _Failure):
            return first
        rest = [_stack([it.rest[j] for it in items], torch.float32)
                for j in range(len(items[0].rest))]
        draws = torch.tensor([it.draw for it in items], dtype=torch.int64)
        return _PixelBatch(first, draws, tuple(rest))  # type: ignore[arg-type]
    out = []
    for j in range(len(items[0])):
        t = _stack([it[j] for it in items], torch.float32)
        if isinstance(t, _Failure):
            return t
        out.append(t)
    return tuple(out)


def _finished(it: _Pixels, transformer: Transformer) -> tuple[np.ndarray, ...]:
    data = transformer.finish_batch(it.pixels[None], np.asarray([it.draw]))[0]
    return (data, *it.rest)


def _stack(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor | _Failure:
    shapes = sorted({np.shape(a) for a in arrays})
    if len(shapes) > 1:
        return _Failure(DataError(
            f"samples of one batch differ in shape ({', '.join(map(str, shapes))}); Caffe "
            "needs equal shapes: set crop_size, or new_height/new_width for ImageData"))
    t = _empty((len(arrays), *shapes[0]), dtype)
    np.stack(arrays, out=t.numpy())
    return t


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor for a batch; in a worker, allocated in shared memory as torch's own
    ``default_collate`` does, so sending it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    try:
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    except (AttributeError, RuntimeError):  # pragma: no cover - private API moved
        return torch.empty(shape, dtype=dtype).share_memory_()


def _worker_init(worker_id: int) -> None:
    # OpenCV's own thread pool inside a worker only competes with the other workers: give it
    # one thread, but only when this worker imports OpenCV itself. A pool inherited through
    # fork (the parent had used cv2) must not be reconfigured: setNumThreads then destroys a
    # condition variable that the parent's pool threads were waiting on, and glibc waits
    # forever for those threads, which do not exist in the child (seen as a hung test).
    if "cv2" in sys.modules:
        return
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


class CaffeLoader(torch.utils.data.DataLoader):
    """A DataLoader that yields tuples of tensors in top order, endlessly.

    An error in a worker (unreadable image, bad record) is raised in the main process as the
    same one-line :class:`~surgery.errors.DataError`.

    Attributes:
        tops: the top names, the order of each batch's tensors.
        batches_per_pass: batches for this rank to see every sample once.
    """

    tops: list[str]
    batches_per_pass: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:  # type: ignore[override]
        transformer = self.dataset.transformer  # type: ignore[attr-defined]
        for batch in super().__iter__():
            if isinstance(batch, _Failure):
                raise batch.error
            if isinstance(batch, _PixelBatch):
                data = torch.from_numpy(transformer.finish_batch(batch.pixels.numpy(),
                                                                 batch.draws.numpy()))
                if self.pin_memory:
                    data = data.pin_memory()
                batch = (data, *batch.rest)
            yield batch

    def __len__(self) -> int:
        raise TypeError("a Caffe data loader is endless (Caffe's cursor wraps); use "
                        "batches_per_pass, or take batches with itertools.islice")


def make_loader(dataset: CaffeDataset, *, batch_size: int | None = None, workers: int = 0,
                rank: int = 0, world_size: int = 1, seed: int | None = None,
                pin_memory: bool | None = None) -> CaffeLoader:
    """See :func:`surgery.data.loader`."""
    if seed is not None:
        dataset.seed = int(seed)
    bs = dataset.batch_size if batch_size is None else int(batch_size)
    if bs <= 0:
        raise DataError(f"batch_size must be positive (found {bs})")
    if workers < 0:
        raise DataError(f"workers must be 0 or more (found {workers})")
    if workers and getattr(dataset.source, "backend", "") == "LEVELDB":
        raise DataError(f"{dataset.where}{dataset.source.path} is a LevelDB database, which "
                        "one process at a time may open: use workers=0, or convert to LMDB")
    sampler = CaffeSampler(dataset, rank=rank, world_size=world_size, seed=dataset.seed)
    dataset.defer_errors = True
    # workers send uint8 crops (4x fewer bytes to move between processes than float32);
    # the main process finishes (pixel - mean) * scale with the same float32 operations
    dataset.defer_float = workers > 0 and dataset.transformer is not None
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    try:
        dataset.source.close()  # workers open their own handles
    except SurgeryError:  # pragma: no cover
        pass
    loader = CaffeLoader(dataset, batch_size=bs, sampler=sampler,
                         collate_fn=functools.partial(collate, transformer=dataset.transformer),
                         num_workers=workers, pin_memory=pin_memory,
                         worker_init_fn=_worker_init if workers else None,
                         prefetch_factor=4 if workers else None)
    loader.tops = list(dataset.tops)
    loader.batches_per_pass = math.ceil(math.ceil(len(dataset) / world_size) / bs)
    return loader
