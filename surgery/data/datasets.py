"""One ``torch.utils.data.Dataset`` per Caffe data layer, built from the layer as written.

An item is what the layer puts into its tops for one sample, as a tuple in top order:
``Data`` -> (data,) or (data, label); ``ImageData`` -> (data, label); ``HDF5Data`` -> one array
per top, read from the HDF5 dataset of the top's name. Every top is float32, as Caffe's blobs
(labels too: Caffe stores them as float).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from ..errors import DataError, SurgeryError, UnsupportedLayerError
from ..layers import attr
from ..net import Layer, Net, NetState
from .source import Resolved, Source, resolve_path
from .transform import Transformer, TransformParam

__all__ = ["CaffeDataset", "build_dataset", "find_layer", "FEED_TYPES"]

# Layers whose tops the user feeds: they have shapes but no source.
FEED_TYPES = ("Input", "DummyData", "MemoryData")
# data_param / image_data_param copies of transform fields that only V0/V1 nets use (Caffe's
# upgrade moves them; in a V2 net Caffe ignores them).
_LEGACY_TRANSFORM = ("scale", "mean_file", "crop_size", "mirror")


@dataclass
class _Pixels:
    """One sample whose image top is still uint8 pixels, cropped and mirrored: the loader's
    workers send these (a quarter of float32's bytes through shared memory) and the main
    process finishes ``(pixels - mean) * scale`` (:meth:`Transformer.finish_batch`)."""

    pixels: np.ndarray
    draw: tuple[bool, int, int]
    rest: tuple


@dataclass
class _Failure:
    """An error raised in a DataLoader worker, carried to the main process as a value so it
    is re-raised there as the same one-line error (not a worker traceback)."""

    error: SurgeryError


class CaffeDataset(torch.utils.data.Dataset):
    """A Caffe data layer's samples, indexable; ``len()`` is the source's size.

    ``ds[i]`` transforms sample ``i`` (source order: database keys, list lines, HDF5 rows)
    with random choices (TRAIN crop, mirror) from this process's generator, seeded from
    ``seed`` and the DataLoader worker id. ``ds[(i, k)]`` -- what :func:`surgery.data.loader`
    asks for -- draws them from a generator seeded by ``(seed, k)``, ``k`` the sample's place
    in Caffe's stream, so a seed gives the same samples whatever the worker count.

    Attributes:
        layer: the data layer.
        phase: ``"TRAIN"`` or ``"TEST"``.
        tops: the top names, the order of an item's arrays.
        source: the data source (:class:`~surgery.data.source.Source`).
        transformer: Caffe's DataTransformer for image sources, else None.
        batch_size: the layer's batch size.
        rand_skip: the layer's ``rand_skip`` (the loader skips a seeded 0..rand_skip-1).
        shuffle: whether the layer reshuffles each pass (ImageData, HDF5Data).
        resolved: the paths the prototxt names and the files used.
        notes: facts worth reporting (fields Caffe ignores, ...).
        seed: the seed of the random choices.
    """

    def __init__(self, *, layer: Layer, phase: str, tops: list[str], source: Source,
                 transformer: Transformer | None, batch_size: int, rand_skip: int = 0,
                 shuffle: bool = False, resolved: list[Resolved] | None = None,
                 notes: list[str] | None = None, where: str = "", seed: int | None = None
                 ) -> None:
        self.layer = layer
        self.phase = phase
        self.tops = list(tops)
        self.source = source
        self.transformer = transformer
        self.batch_size = batch_size
        self.rand_skip = rand_skip
        self.shuffle = shuffle
        self.resolved = list(resolved or [])
        self.notes = list(notes or [])
        self.where = where
        self.seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else int(seed)
        self.defer_errors = False  # set by the loader: errors travel as values to the main
        self.defer_float = False  # set by the loader with workers: uint8 crops travel
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[np.ndarray, ...] | Any:
        if not isinstance(index, tuple):
            i = int(index)
            if not 0 <= i < len(self):
                raise IndexError(f"sample {i} out of range ({len(self)} samples)")
            return self.item(i, self._process_rng() if self._random else None)
        # the loader's request: (index, position in Caffe's stream)
        i, position = index
        rng = self.rng_for(position) if self._random else None
        try:
            if self.defer_float:
                return self._pixels(i, rng)
            return self.item(i, rng)
        except SurgeryError as exc:
            if self.defer_errors:
                return _Failure(exc)
            raise

    @property
    def _random(self) -> bool:
        return self.transformer is not None and self.transformer.random

    def rng_for(self, position: int) -> np.random.Generator:
        """The generator of the ``position``-th sample of the stream."""
        return np.random.default_rng([self.seed, 1, position])

    def _process_rng(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            self._rng = np.random.default_rng([self.seed, 0, 0 if info is None else info.id + 1])
            self._rng_pid = os.getpid()
        return self._rng

    def item(self, index: int, rng: np.random.Generator | None = None
             ) -> tuple[np.ndarray, ...]:
        """The tops for sample ``index``, random choices drawn from ``rng``.

        Raises:
            DataError: the sample cannot be read or does not fit the transform.
        """
        raw = self.source.read(index)
        if self.transformer is None:
            return tuple(np.asarray(a, np.float32) for a in raw)
        image, rest = raw[0], tuple(raw[1:len(self.tops)])
        return (self.transformer(image, rng, item=self.source.describe(index)), *rest)

    def _pixels(self, index: int, rng: np.random.Generator | None) -> _Pixels | tuple:
        """Like :meth:`item`, but a uint8 image comes back cropped and mirrored only."""
        raw = self.source.read(index)
        t = self.transformer
        if t is None:
            return tuple(np.asarray(a, np.float32) for a in raw)
        image, rest = raw[0], tuple(raw[1:len(self.tops)])
        if image.dtype != np.uint8:  # float_data: finished here
            return (t(image, rng, item=self.source.describe(index)), *rest)
        t.check(image.shape, self.source.describe(index))
        draw = t.draw(image.shape, rng)
        rows, cols = t.window(*draw)
        return _Pixels(np.ascontiguousarray(image[:, rows, cols]), draw, rest)

    def describe(self) -> str:
        """One line: layer, phase, source and size."""
        return (f"layer {self.layer.name!r} ({self.layer.type}, {self.phase}): "
                f"{self.source.path}, {len(self)} samples")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rng"] = None
        return state


# -- building from the prototxt ---------------------------------------------------------------
def find_layer(net: Net, layer_name: str, phase: str | NetState) -> Layer:
    """The layer called ``layer_name`` in the ``phase`` net (TRAIN/TEST twins share names;
    a :class:`~surgery.net.NetState` also decides level and stage rules).

    Raises:
        LayerNotFoundError: no layer of that name.
        DataError: the layer exists but is excluded from ``phase``.
    """
    state = phase if isinstance(phase, NetState) else NetState(phase)
    layers = net.layers_named(layer_name)
    if not layers:
        net.layer(layer_name)  # raises with "did you mean"
    included = [lay for lay in layers if lay.is_included(state)]
    if not included:
        what = state.phase if state == NetState(state.phase) else str(state)
        raise DataError(f"{net.source or 'net'}: layer {layer_name!r} is not in the "
                        f"{what} net (its include/exclude rules leave it out); "
                        f"choose the other phase (or the stages/level that include it)")
    return included[0]


def build_dataset(net: Net, layer_name: str, phase: str | NetState, *,
                  seed: int | None = None) -> CaffeDataset:
    """See :func:`surgery.data.dataset`."""
    layer = find_layer(net, layer_name, phase)
    phase = phase.phase if isinstance(phase, NetState) else NetState(phase).phase
    where = f"{net.source or 'net'}: layer {layer.name!r} ({layer.type}): "
    if layer.type in FEED_TYPES:
        raise DataError(f"{where}this layer type has no data source: feed its tops "
                        f"({_feed_shapes(layer)}) yourself")
    builders = {"Data": _build_data, "ImageData": _build_image_data,
                "HDF5Data": _build_hdf5}
    if layer.type not in builders:
        raise UnsupportedLayerError(
            f"{where}no dataset for {layer.type} layers (supported: Data, ImageData, HDF5Data; "
            f"{', '.join(FEED_TYPES)} are fed by the user)")
    return builders[layer.type](net, layer, phase, where, seed)


def _feed_shapes(layer: Layer) -> str:
    """``data 1x3x224x224, label 1`` for a layer the user feeds (shapes as written)."""
    from ..errors import SurgeryError as _Err
    from ..shapes import top_shapes

    try:
        shapes = top_shapes(layer, [])
    except _Err:
        shapes = [None] * len(layer.tops)
    return ", ".join(t if sh is None else f"{t} {'x'.join(str(d) for d in sh)}"
                     for t, sh in zip(layer.tops, shapes, strict=True))


def _transformer(net: Net, layer: Layer, phase: str, where: str, resolved: list[Resolved]
                 ) -> Transformer:
    from .mean import read_mean

    param = TransformParam.from_dict(layer.extra.get("transform_param"), where)
    mean = None
    if param.mean_file is not None:
        r = resolve_path(param.mean_file, "transform_param.mean_file", net_source=net.source,
                         where=where, must_be="file")
        resolved.append(r)
        mean = read_mean(r.path)
    return Transformer(param, phase, mean=mean, where=where)


def _legacy_notes(layer: Layer) -> list[str]:
    legacy = [k for k in _LEGACY_TRANSFORM if k in layer.attrs]
    if not legacy:
        return []
    return [f"{layer.param_field}.{', '.join(legacy)} ignored, as Caffe ignores them in a "
            "V2 net: set them in transform_param"]


def _tops(layer: Layer, where: str, allowed: tuple[int, ...]) -> list[str]:
    if len(layer.tops) not in allowed:
        raise DataError(f"{where}has {len(layer.tops)} tops; a {layer.type} layer has "
                        f"{' or '.join(str(n) for n in allowed)}")
    return list(layer.tops)


def _batch_size(layer: Layer, where: str) -> int:
    bs = int(attr(layer, "batch_size"))
    if bs <= 0:
        raise DataError(f"{where}batch_size must be positive (found {bs})")
    return bs


def _build_data(net: Net, layer: Layer, phase: str, where: str, seed: int | None
                ) -> CaffeDataset:
    from .datum import DatumSource

    tops = _tops(layer, where, (1, 2))
    backend = str(attr(layer, "backend"))
    resolved = [resolve_path(str(attr(layer, "source")), "data_param.source",
                             net_source=net.source, where=where)]
    transformer = _transformer(net, layer, phase, where, resolved)
    source = DatumSource(resolved[0].path, backend, force_color=transformer.param.force_color,
                         force_gray=transformer.param.force_gray, where=where)
    return CaffeDataset(layer=layer, phase=phase, tops=tops, source=source,
                        transformer=transformer, batch_size=_batch_size(layer, where),
                        rand_skip=int(attr(layer, "rand_skip")), resolved=resolved,
                        notes=_legacy_notes(layer), where=where, seed=seed)


def _build_image_data(net: Net, layer: Layer, phase: str, where: str, seed: int | None
                      ) -> CaffeDataset:
    from .image_list import ImageListSource

    tops = _tops(layer, where, (2,))
    resolved = [resolve_path(str(attr(layer, "source")), "image_data_param.source",
                             net_source=net.source, where=where, must_be="file")]
    transformer = _transformer(net, layer, phase, where, resolved)
    source = ImageListSource(
        resolved[0].path, root_folder=str(attr(layer, "root_folder")),
        new_height=int(attr(layer, "new_height")), new_width=int(attr(layer, "new_width")),
        is_color=bool(attr(layer, "is_color")), net_source=net.source, where=where)
    resolved.extend(source.resolved)
    return CaffeDataset(layer=layer, phase=phase, tops=tops, source=source,
                        transformer=transformer, batch_size=_batch_size(layer, where),
                        rand_skip=int(attr(layer, "rand_skip")),
                        shuffle=bool(attr(layer, "shuffle")), resolved=resolved,
                        notes=_legacy_notes(layer), where=where, seed=seed)


def _build_hdf5(net: Net, layer: Layer, phase: str, where: str, seed: int | None
                ) -> CaffeDataset:
    from .hdf5 import HDF5Source

    if "transform_param" in layer.extra:
        raise DataError(f"{where}HDF5Data does not transform data (Caffe refuses "
                        "transform_param here); preprocess the arrays when writing the files")
    if not layer.tops:
        raise DataError(f"{where}has no tops; each top names an HDF5 dataset")
    resolved = [resolve_path(str(attr(layer, "source")), "hdf5_data_param.source",
                             net_source=net.source, where=where, must_be="file")]
    source = HDF5Source(resolved[0].path, list(layer.tops), net_source=net.source,
                        where=where)
    resolved.extend(source.resolved)
    return CaffeDataset(layer=layer, phase=phase, tops=list(layer.tops), source=source,
                        transformer=None, batch_size=_batch_size(layer, where),
                        shuffle=bool(attr(layer, "shuffle")), resolved=resolved,
                        where=where, seed=seed)


def as_net(net: Net | str | os.PathLike[str]) -> Net:
    """A Net, loading a prototxt path when given one."""
    if isinstance(net, Net):
        return net
    from ..caffe_io import load

    return load(Path(net))
