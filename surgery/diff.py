"""What differs between two nets: layers added, removed, renamed, retyped, rewired, parameters,
multipliers and, with weights, the per-blob change.

Rules, in order (:func:`diff_nets`):

1. Layers are matched by name; TRAIN/TEST twins (several layers of one name) pair up in file
   order, the k-th ``conv1`` of A with the k-th ``conv1`` of B.
2. The layers left over are matched by *position and shape*: the matched layers split both
   files into gaps; inside one gap, a leftover layer of A pairs with the first leftover layer
   of B of the same type with the same bottoms (or, failing that, the same type and learnable
   blob ranks). Such a pair is *renamed* (``loss3/classifier`` -> ``loss3/classifier_ft``).
3. Whatever is still unmatched is *removed* (only in A) or *added* (only in B).
4. For each pair: the type (retyped), bottoms and tops (rewired), the ``*_param`` fields and
   every other written field (include/exclude, loss_weight, transform_param ...) compared field
   by field as dotted paths, the multipliers per blob (Caffe's effective values), the learnable
   blob shapes and, when both have weights, ``|b - a| / |a|`` (L2) per blob.
5. Net-level fields (``name``, ``force_backward``, ``state`` ...) are compared too.

The result is plain data (:class:`NetDiff`), with a text rendering for the ``diff`` verb.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .net import Layer, Net, Rule

__all__ = ["LayerDiff", "NetDiff", "diff_nets"]


@dataclass
class LayerDiff:
    """How one matched pair of layers differs.

    Attributes:
        name: the layer's name in A.
        new_name: its name in B when it was renamed, else None.
        type: the layer type in A.
        changes: ``{"what": kind, "field": dotted path, "a": old, "b": new}`` entries; kinds are
            ``type``, ``bottoms``, ``tops``, ``param``, ``field``, ``lr_mult``, ``decay_mult``,
            ``blob_shape``, ``weights``.
    """

    name: str
    new_name: str | None
    type: str
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def renamed(self) -> bool:
        return self.new_name is not None and self.new_name != self.name

    def kinds(self) -> set[str]:
        return {c["what"] for c in self.changes} | ({"renamed"} if self.renamed else set())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "new_name": self.new_name,
            "type": self.type,
            "changes": list(self.changes),
        }


@dataclass
class NetDiff:
    """Everything that differs between net A and net B.

    Attributes:
        a, b: the sources (file names) of the two nets.
        added: ``{"name", "type", "bottoms", "tops"}`` of layers only in B.
        removed: the same for layers only in A.
        changed: one :class:`LayerDiff` per matched pair that differs (renamed ones included).
        net_fields: changes to net-level fields.
        weights_compared: True when both nets had weights.
    """

    a: str | None
    b: str | None
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[dict[str, Any]] = field(default_factory=list)
    changed: list[LayerDiff] = field(default_factory=list)
    net_fields: list[dict[str, Any]] = field(default_factory=list)
    weights_compared: bool = False

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed or self.net_fields)

    def layers_touched(self) -> set[str]:
        """Names (in A and in B) of every layer added, removed or changed."""
        out = {d["name"] for d in self.added} | {d["name"] for d in self.removed}
        for c in self.changed:
            out.add(c.name)
            if c.new_name:
                out.add(c.new_name)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "same": self.same,
            "added": list(self.added),
            "removed": list(self.removed),
            "renamed": [
                {"name": c.name, "new_name": c.new_name} for c in self.changed if c.renamed
            ],
            "changed": [c.as_dict() for c in self.changed],
            "net_fields": list(self.net_fields),
            "weights_compared": self.weights_compared,
        }

    def text(self) -> str:
        lines = [f"--- {self.a or 'A'}", f"+++ {self.b or 'B'}"]
        for d in self.removed:
            lines.append(f"- {d['name']} ({d['type']}: {_io(d)})")
        for d in self.added:
            lines.append(f"+ {d['name']} ({d['type']}: {_io(d)})")
        for c in self.changed:
            head = f"{c.name} -> {c.new_name}" if c.renamed else c.name
            lines.append(f"~ {head} ({c.type})" + ("  renamed" if c.renamed else ""))
            for ch in c.changes:
                lines.append(f"    {_change_text(ch)}")
        for ch in self.net_fields:
            lines.append(f"~ net: {_change_text(ch)}")
        n_ren = sum(1 for c in self.changed if c.renamed)
        n_chg = sum(1 for c in self.changed if c.changes)
        lines.append(
            "same" if self.same else
            f"{len(self.added)} added, {len(self.removed)} removed, {n_ren} renamed, "
            f"{n_chg} changed" + ("" if self.weights_compared else " (weights not compared)")
        )
        return "\n".join(lines)


def _io(d: dict[str, Any]) -> str:
    return f"{','.join(d['bottoms']) or '-'} -> {','.join(d['tops']) or '-'}"


def _short(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _change_text(ch: dict[str, Any]) -> str:
    what = ch["what"]
    if what == "weights":
        return f"{ch['field']}: relative change {ch['rel']:.3g}"
    label = ch.get("field") or what
    return f"{label}: {_short(ch.get('a'))} -> {_short(ch.get('b'))}"


# -- matching ---------------------------------------------------------------------------------
def _match(a: Net, b: Net) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Pairs of layer indices (A, B) by rules 1-2, then the leftover indices of A and B."""
    by_name_b: dict[str, list[int]] = {}
    for j, lay in enumerate(b.layers):
        by_name_b.setdefault(lay.name, []).append(j)
    seen: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, lay in enumerate(a.layers):
        k = seen.get(lay.name, 0)
        seen[lay.name] = k + 1
        js = by_name_b.get(lay.name, [])
        if k < len(js):
            pairs.append((i, js[k]))
    left_a = sorted(set(range(len(a.layers))) - {i for i, _ in pairs})
    left_b = sorted(set(range(len(b.layers))) - {j for _, j in pairs})
    # rule 2: the gap of a leftover layer = the number of name-matched A (B) layers before it,
    # measured on a monotone chain of pairs so that gaps line up in both files
    chain = _monotone(pairs)
    gap_a = _gaps([i for i, _ in chain], left_a)
    gap_b = _gaps([j for _, j in chain], left_b)
    buckets: dict[tuple[int, str], list[int]] = {}  # (gap, type) -> leftover B indices
    for j in left_b:
        buckets.setdefault((gap_b[j], b.layers[j].type), []).append(j)
    renamed: dict[int, int] = {}
    for strict in (True, False):
        for i in left_a:
            if i in renamed:
                continue
            la = a.layers[i]
            bucket = buckets.get((gap_a[i], la.type), [])
            for j in bucket:
                lb = b.layers[j]
                if strict and list(lb.bottoms) != list(la.bottoms):
                    continue
                if not strict and _ranks(la) != _ranks(lb):
                    continue
                renamed[i] = j
                bucket.remove(j)
                break
    pairs.extend(renamed.items())
    pairs.sort()
    left_a = [i for i in left_a if i not in renamed]
    used = set(renamed.values())
    left_b = [j for j in left_b if j not in used]
    return pairs, left_a, left_b


def _ranks(lay: Layer) -> list[int | None]:
    return [None if p.data is None else p.data.ndim for p in lay.params]


def _monotone(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest chain of pairs increasing in both indices (patience sorting, n log n)."""
    import bisect

    pairs = sorted(pairs)
    tails: list[int] = []  # smallest B index ending a chain of length k+1
    tail_idx: list[int] = []
    prev: list[int] = [-1] * len(pairs)
    for k, (_, j) in enumerate(pairs):
        pos = bisect.bisect_left(tails, j)
        if pos == len(tails):
            tails.append(j)
            tail_idx.append(k)
        else:
            tails[pos] = j
            tail_idx[pos] = k
        prev[k] = tail_idx[pos - 1] if pos else -1
    out: list[tuple[int, int]] = []
    k = tail_idx[-1] if tail_idx else -1
    while k >= 0:
        out.append(pairs[k])
        k = prev[k]
    return out[::-1]


def _gaps(anchors: list[int], left: list[int]) -> dict[int, int]:
    import bisect

    anchors = sorted(anchors)
    return {i: bisect.bisect_left(anchors, i) for i in left}


# -- comparing --------------------------------------------------------------------------------
def _flatten(prefix: str, v: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(v, dict):
        for k in sorted(v):
            yield from _flatten(f"{prefix}.{k}" if prefix else str(k), v[k])
    else:
        yield prefix, v


def _rules(rules: list[Rule]) -> list[dict[str, Any]]:
    return [{k: v for k, v in vars(r).items() if v not in (None, [], ())} for r in rules]


def _fields(lay: Layer) -> dict[str, Any]:
    out = dict(_flatten(lay.param_field or "param", lay.attrs)) if lay.attrs else {}
    out.update(_flatten("", {k: v for k, v in lay.extra.items()}))
    if lay.include:
        out["include"] = _rules(lay.include)
    if lay.exclude:
        out["exclude"] = _rules(lay.exclude)
    return out


def _compare(la: Layer, lb: Layer, weights: bool) -> list[dict[str, Any]]:
    ch: list[dict[str, Any]] = []
    if la.type != lb.type:
        ch.append({"what": "type", "field": "type", "a": la.type, "b": lb.type})
    for what in ("bottoms", "tops"):
        if list(getattr(la, what)) != list(getattr(lb, what)):
            ch.append({"what": what, "field": what, "a": list(getattr(la, what)),
                       "b": list(getattr(lb, what))})
    fa, fb = _fields(la), _fields(lb)
    pfield = (la.param_field or "param", lb.param_field or "param")
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key), fb.get(key)
        if va != vb:
            kind = "param" if key.split(".")[0] in pfield else "field"
            ch.append({"what": kind, "field": key, "a": va, "b": vb})
    for k in range(max(len(la.params), len(lb.params))):
        pa = la.params[k] if k < len(la.params) else None
        pb = lb.params[k] if k < len(lb.params) else None
        for attr in ("lr_mult", "decay_mult"):
            va = 1.0 if pa is None else getattr(pa, f"effective_{attr}")
            vb = 1.0 if pb is None else getattr(pb, f"effective_{attr}")
            if va != vb:
                ch.append({"what": attr, "field": f"blob{k}.{attr}", "a": va, "b": vb})
        da = None if pa is None else pa.data
        db = None if pb is None else pb.data
        if da is None or db is None:
            continue
        if da.shape != db.shape:
            ch.append({"what": "blob_shape", "field": f"blob{k}.shape", "a": list(da.shape),
                       "b": list(db.shape)})
        elif weights and da is not db:
            a64 = np.asarray(da, dtype=np.float64)
            diff = float(np.linalg.norm(np.asarray(db, dtype=np.float64) - a64))
            if diff:
                base = float(np.linalg.norm(a64))
                rel = diff / base if base else float("inf")
                ch.append({"what": "weights", "field": f"blob{k}", "rel": rel, "abs": diff})
    return ch


def _describe(lay: Layer) -> dict[str, Any]:
    return {"name": lay.name, "type": lay.type, "bottoms": list(lay.bottoms),
            "tops": list(lay.tops)}


def diff_nets(a: Net, b: Net) -> NetDiff:
    """Compare two nets (rules in the module docstring).

    Args:
        a: the first net (upgraded as loaded), with or without weights.
        b: the second net.

    Returns:
        A :class:`NetDiff`; ``.same`` is True when nothing differs. Weights are compared only
        when both nets hold them for a blob.
    """
    pairs, left_a, left_b = _match(a, b)
    out = NetDiff(a.source, b.source, weights_compared=a.has_weights and b.has_weights)
    out.removed = [_describe(a.layers[i]) for i in left_a]
    out.added = [_describe(b.layers[j]) for j in left_b]
    for i, j in pairs:
        la, lb = a.layers[i], b.layers[j]
        changes = _compare(la, lb, out.weights_compared)
        if changes or la.name != lb.name:
            out.changed.append(
                LayerDiff(la.name, lb.name if lb.name != la.name else None, la.type, changes)
            )
    if a.name != b.name:
        out.net_fields.append({"what": "field", "field": "name", "a": a.name, "b": b.name})
    fa, fb = dict(_flatten("", a.extra)), dict(_flatten("", b.extra))
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key) != fb.get(key):
            out.net_fields.append({"what": "field", "field": key, "a": fa.get(key),
                                   "b": fb.get(key)})
    return out
