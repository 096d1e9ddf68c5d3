"""Rewiring consumers: make chosen readers of a value read a new blob, and prove nothing else
changed.

A net names blobs, not edges: which value a bottom reads depends on where its layer sits in the
file (a bottom refers to the most recent producer of its name). So every edit that moves layers
or renames bottoms is checked against the dataflow before the edit: an *edge* is a reader's
bottom, named by ``(reader layer, bottom index)``, and what it reads, named by ``(producer layer,
top index)`` (layer objects, so TRAIN/TEST twins and in-place chains stay apart).

Rules:

1. :func:`takeover` points each chosen ``(reader, bottom index)`` at the new blob. An in-place
   reader (a ReLU on the value) is *continued*: its top becomes the new blob too, and every
   reader of its output follows, transitively, exactly as Caffe's in-place chains work.
2. :func:`hoist` moves layers, in their relative order, to just before another layer; nothing
   else moves.
3. :func:`edges` / :func:`changed_edges`: after an edit, every edge outside the intended set must
   read the same producer output as before; anything else is reported by the op as an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..dataflow import Dataflow, Node
from ..net import Layer, Net

__all__ = ["Edit", "edges", "takeover", "apply_edits", "hoist", "changed_edges"]

# (id(layer), "bottom" | "top", index) -> (layer, new blob name)
Edit = dict[tuple[int, str, int], tuple[Layer, str]]
EdgeMap = dict[tuple[int, int], tuple[int, int]]


def edges(flow: Dataflow) -> EdgeMap:
    """``{(id(reader layer), bottom index): (id(producer layer), top index)}`` for one phase."""
    return {
        (id(node.layer), bi): (id(v.producer.layer), v.top_index)
        for node in flow.nodes
        for bi, v in enumerate(node.inputs)
    }


def takeover(flow: Dataflow, readers: Iterable[tuple[Node, int]], new_blob: str) -> Edit:
    """The edits that make each ``(reader node, bottom index)`` read ``new_blob`` (rule 1).

    Args:
        flow: the dataflow of one phase, before the edit.
        readers: the bottoms to take over.
        new_blob: the blob they read afterwards.

    Returns:
        The edits, keyed so that the same edit from several phases merges.
    """
    out: Edit = {}
    stack = list(readers)
    while stack:
        node, bi = stack.pop()
        out[(id(node.layer), "bottom", bi)] = (node.layer, new_blob)
        if bi < len(node.inplace) and node.inplace[bi]:
            out[(id(node.layer), "top", bi)] = (node.layer, new_blob)
            stack.extend(flow.consumers(node.outputs[bi]))
    return out


def apply_edits(net: Net, edits: Edit) -> list[dict[str, str]]:
    """Apply ``edits`` to ``net`` (the op's own copy), in net order.

    Returns:
        ``[{"layer": name, "what": "bottom 0: 'a' -> 'a_prod'"}]``, one per edit that changed
        a name.
    """
    order = {id(lay): i for i, lay in enumerate(net.layers)}
    done: list[dict[str, str]] = []
    for (_, kind, idx), (layer, blob) in sorted(
        edits.items(), key=lambda kv: (order.get(kv[0][0], -1), kv[0][1], kv[0][2])
    ):
        names = layer.tops if kind == "top" else layer.bottoms
        old = names[idx]
        names[idx] = blob
        if old != blob:
            done.append({"layer": layer.name, "what": f"{kind} {idx}: {old!r} -> {blob!r}"})
    return done


def hoist(net: Net, layers: Sequence[Layer], before: Layer) -> None:
    """Move ``layers`` (objects of ``net``), keeping their relative order, to just before
    ``before`` (rule 2). ``before`` must not be one of them."""
    moving = {id(lay) for lay in layers}
    assert id(before) not in moving
    rest = [lay for lay in net.layers if id(lay) not in moving]
    at = next(i for i, lay in enumerate(rest) if lay is before)
    moved = [lay for lay in net.layers if id(lay) in moving]
    net.layers[:] = rest[:at] + moved + rest[at:]


def changed_edges(before: EdgeMap, after: EdgeMap, allowed: Iterable[tuple[int, int]] = ()
                  ) -> list[tuple[int, int]]:
    """Edges of ``before`` that read something else (or vanished) in ``after``, except the
    ``allowed`` ones (rule 3)."""
    skip = set(allowed)
    return [k for k, v in before.items() if k not in skip and after.get(k) != v]
