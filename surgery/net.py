"""The editable network: Caffe's own model, without protobuf.

A :class:`Net` is an *ordered* list of :class:`Layer` objects whose ``bottoms``/``tops`` are blob
names exactly as written, so a file round-trips unchanged. The dataflow for one phase is derived
on demand by :func:`surgery.dataflow.resolve`; nothing here keeps back-pointers.

This module imports neither protobuf, nor onnx, nor torch (enforced by a test): serialization
lives in :mod:`surgery.caffe_io`.
"""

from __future__ import annotations

import copy as _copy
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import LayerNotFoundError, NetError, did_you_mean

__all__ = ["Param", "Rule", "NetState", "Layer", "Net", "Verbatim", "freeze_array"]


def freeze_array(a: Any) -> np.ndarray:
    """Return ``a`` as a read-only float array (no copy when it already is one)."""
    arr = np.asarray(a)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.flags.writeable:
        arr = arr.view()
        arr.setflags(write=False)
    return arr


@dataclass
class Param:
    """One learnable blob of a layer and its ``param { }`` spec.

    ``None`` means "not written in the file": Caffe's default applies (lr_mult 1, decay_mult 1),
    and nothing is written back.

    Attributes:
        data: the blob values (read-only float32 array), or None when no weights are loaded.
        lr_mult: learning-rate multiplier (0 freezes the blob).
        decay_mult: weight-decay multiplier.
        name: shared-parameter name (``param { name: ... }``).
        share_mode: ``"STRICT"`` or ``"PERMISSIVE"`` when written.
        declared: True when the definition had a ``param { }`` entry at this index.
    """

    data: np.ndarray | None = None
    lr_mult: float | None = None
    decay_mult: float | None = None
    name: str | None = None
    share_mode: str | None = None
    declared: bool = False

    @property
    def effective_lr_mult(self) -> float:
        return 1.0 if self.lr_mult is None else float(self.lr_mult)

    @property
    def effective_decay_mult(self) -> float:
        return 1.0 if self.decay_mult is None else float(self.decay_mult)

    @property
    def has_spec(self) -> bool:
        """True when a ``param { }`` entry must be written for this blob."""
        return self.declared or any(
            v is not None for v in (self.lr_mult, self.decay_mult, self.name, self.share_mode)
        )


@dataclass
class Rule:
    """A ``NetStateRule`` (``include { }`` / ``exclude { }``)."""

    phase: str | None = None  # "TRAIN" | "TEST"
    min_level: int | None = None
    max_level: int | None = None
    stage: list[str] = field(default_factory=list)
    not_stage: list[str] = field(default_factory=list)

    def matches(self, state: NetState) -> bool:
        """Caffe's ``Net::StateMeetsRule``."""
        if self.phase is not None and self.phase != state.phase:
            return False
        if self.min_level is not None and state.level < self.min_level:
            return False
        if self.max_level is not None and state.level > self.max_level:
            return False
        if any(s not in state.stages for s in self.stage):
            return False
        return not any(s in state.stages for s in self.not_stage)


@dataclass(frozen=True)
class NetState:
    """Caffe's ``NetState``: which phase, level and stages a net is instantiated for."""

    phase: str = "TEST"
    level: int = 0
    stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        phase = self.phase.upper()
        if phase not in ("TRAIN", "TEST"):
            raise ValueError(f"phase must be TRAIN or TEST, got {self.phase!r}")
        object.__setattr__(self, "phase", phase)
        object.__setattr__(self, "stages", tuple(self.stages))


@dataclass(frozen=True)
class Verbatim:
    """A field the definition set that our schema does not know (a fork's), kept as written.

    Attributes:
        path: the known message fields leading to it inside its layer, each with its
            occurrence (``(("transform_param", 0),)``); empty for a field of the layer itself
            (or of the net).
        name: the field's name.
        text: the field as written (name, value or ``{ }`` block), from column 0.
        where: ``FILE:LINE`` it came from.
    """

    path: tuple[tuple[str, int], ...]
    name: str
    text: str
    where: str = ""

    @property
    def dotted(self) -> str:
        """``transform_param.scale_factors``."""
        return ".".join([*(p for p, _ in self.path), self.name])


@dataclass
class Layer:
    """One Caffe layer.

    Attributes:
        name: the layer name.
        type: the layer type string (``"Convolution"``, ...), unknown fork types kept as written.
        bottoms: input blob names.
        tops: output blob names.
        params: learnable blobs with their ``param`` specs, in blob order.
        attrs: the fields of the layer's own ``*_param`` message that the file set, as plain
            Python values (nested dicts for messages, lists for repeated fields, enum names as
            strings).
        param_field: the name of that message field (``"convolution_param"``), or None.
        include: ``include { }`` rules.
        exclude: ``exclude { }`` rules.
        extra: every other ``LayerParameter`` field the file set (``loss_weight``,
            ``propagate_down``, ``transform_param``, fork fields, ...), written back untouched.
        verbatim: fields our schema does not know, kept as written and written back at the
            same place; exports refuse a layer that has any (its meaning is unknown).
    """

    name: str
    type: str
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    param_field: str | None = None
    include: list[Rule] = field(default_factory=list)
    exclude: list[Rule] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    verbatim: list[Verbatim] = field(default_factory=list)

    @property
    def blobs(self) -> list[np.ndarray | None]:
        """The learnable blob arrays (None where no weights are loaded)."""
        return [p.data for p in self.params]

    @property
    def has_weights(self) -> bool:
        return any(p.data is not None for p in self.params)

    def is_included(self, state: NetState) -> bool:
        """Caffe's ``FilterNet`` rule for one layer."""
        if self.include and self.exclude:
            raise NetError(
                f"layer {self.name!r} has both include and exclude rules; Caffe refuses this. "
                "Keep only one kind."
            )
        if self.include:
            return any(r.matches(state) for r in self.include)
        return not any(r.matches(state) for r in self.exclude)

    def copy(self) -> Layer:
        """A structural copy; weight arrays are shared (they are read-only)."""
        new = _copy.copy(self)
        new.bottoms = list(self.bottoms)
        new.tops = list(self.tops)
        new.params = [_copy.copy(p) for p in self.params]
        new.attrs = _copy.deepcopy(self.attrs)
        new.include = _copy.deepcopy(self.include)
        new.exclude = _copy.deepcopy(self.exclude)
        new.extra = _copy.deepcopy(self.extra)
        new.verbatim = list(self.verbatim)
        return new


class Net:
    """An ordered list of layers plus net-level fields.

    Attributes:
        name: the net's ``name``.
        layers: the layers in file order.
        extra: other ``NetParameter`` fields the file set (``force_backward``, ``state``...).
        source: the file it was read from, for messages.
        upgrades: notes on the legacy upgrades applied when reading.
        weights_source: the caffemodel the weights came from, if any.
        verbatim: net-level fields our schema does not know, kept as written.
    """

    def __init__(
        self,
        name: str = "",
        layers: Iterable[Layer] | None = None,
        extra: dict[str, Any] | None = None,
        source: str | None = None,
        upgrades: list[str] | None = None,
        weights_source: str | None = None,
    ) -> None:
        self.name = name
        self.layers: list[Layer] = list(layers or [])
        self.extra: dict[str, Any] = dict(extra or {})
        self.source = source
        self.upgrades: list[str] = list(upgrades or [])
        self.verbatim: list[Verbatim] = []
        self.weights_source = weights_source

    def __repr__(self) -> str:
        return f"Net(name={self.name!r}, layers={len(self.layers)})"

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # -- lookup -------------------------------------------------------------------------------
    def layers_named(self, name: str) -> list[Layer]:
        """Every layer called ``name`` (TRAIN/TEST twins share names)."""
        return [lay for lay in self.layers if lay.name == name]

    def by_name(self) -> dict[str, list[Layer]]:
        """Every layer by name, in net order: ``layers_named`` for all names in one pass.

        A snapshot (O(layers)): loops over many names use it instead of calling
        :meth:`layers_named` per name, which would be quadratic.
        """
        table: dict[str, list[Layer]] = {}
        for lay in self.layers:
            table.setdefault(lay.name, []).append(lay)
        return table

    def layer(self, name: str) -> Layer:
        """The first layer called ``name``.

        Raises:
            LayerNotFoundError: no such layer (the message suggests close names).
        """
        for lay in self.layers:
            if lay.name == name:
                return lay
        where = f" in {self.source}" if self.source else ""
        raise LayerNotFoundError(
            f"no layer named {name!r}{where}"
            + did_you_mean(name, (lay.name for lay in self.layers))
        )

    def index(self, name: str) -> int:
        """Position of the first layer called ``name``.

        Raises:
            LayerNotFoundError: no such layer.
        """
        target = self.layer(name)
        return next(i for i, lay in enumerate(self.layers) if lay is target)

    def select(self, patterns: Iterable[str], *, what: str = "--layers") -> list[Layer]:
        """Layers whose name matches any glob pattern, in net order.

        Raises:
            LayerNotFoundError: a pattern matched no layer.
        """
        chosen: list[Layer] = []
        seen: set[int] = set()
        for pat in patterns:
            hits = [lay for lay in self.layers if fnmatch.fnmatchcase(lay.name, pat)]
            if not hits:
                raise LayerNotFoundError(
                    f"{what} pattern {pat!r} matches no layer"
                    + did_you_mean(pat, (lay.name for lay in self.layers))
                )
            for lay in hits:
                if id(lay) not in seen:
                    seen.add(id(lay))
                    chosen.append(lay)
        order = {id(lay): i for i, lay in enumerate(self.layers)}
        return sorted(chosen, key=lambda lay: order[id(lay)])

    def producers(self, blob: str) -> list[Layer]:
        """Layers with ``blob`` among their tops, in net order (all phases)."""
        return [lay for lay in self.layers if blob in lay.tops]

    def consumers(self, blob: str) -> list[Layer]:
        """Layers with ``blob`` among their bottoms, in net order (all phases)."""
        return [lay for lay in self.layers if blob in lay.bottoms]

    @property
    def has_weights(self) -> bool:
        return any(lay.has_weights for lay in self.layers)

    # -- editing primitives -------------------------------------------------------------------
    def copy(self) -> Net:
        """A structural copy; weight arrays are shared (they are read-only)."""
        new = Net(
            self.name,
            [lay.copy() for lay in self.layers],
            _copy.deepcopy(self.extra),
            self.source,
            list(self.upgrades),
            self.weights_source,
        )
        new.verbatim = list(self.verbatim)
        return new

    def _check_new_name(self, layer: Layer) -> None:
        if self.layers_named(layer.name):
            raise NetError(f"a layer named {layer.name!r} already exists; choose another name")

    def insert(self, index: int, layer: Layer) -> Layer:
        """Insert ``layer`` at ``index``.

        Raises:
            NetError: a layer named like ``layer`` already exists.
        """
        self._check_new_name(layer)
        self.layers.insert(index, layer)
        return layer

    def insert_after(self, name: str, layer: Layer) -> Layer:
        """Insert ``layer`` right after the last layer called ``name``.

        Raises:
            LayerNotFoundError: no layer called ``name``.
            NetError: a layer named like ``layer`` already exists.
        """
        self.layer(name)  # raises with a did-you-mean
        idx = max(i for i, lay in enumerate(self.layers) if lay.name == name)
        return self.insert(idx + 1, layer)

    def insert_before(self, name: str, layer: Layer) -> Layer:
        """Insert ``layer`` right before the first layer called ``name``.

        Raises:
            LayerNotFoundError: no layer called ``name``.
            NetError: a layer named like ``layer`` already exists.
        """
        return self.insert(self.index(name), layer)

    def remove(self, name: str) -> list[Layer]:
        """Remove every layer called ``name``; returns them.

        Raises:
            LayerNotFoundError: no such layer.
        """
        self.layer(name)
        gone = self.layers_named(name)
        self.layers = [lay for lay in self.layers if lay.name != name]
        return gone

    def rename_layer(self, old: str, new: str) -> None:
        """Rename every layer called ``old`` (TRAIN/TEST twins together).

        Raises:
            LayerNotFoundError: no layer called ``old``.
            NetError: ``new`` is already the name of another layer.
        """
        self.layer(old)
        if old != new and self.layers_named(new):
            raise NetError(f"cannot rename {old!r} to {new!r}: that name is taken")
        for lay in self.layers_named(old):
            lay.name = new
