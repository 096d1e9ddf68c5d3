"""Naming one value of a net: ``LAYER``, ``LAYER:i`` or a blob name (the rules every op that
takes a value follows: insert-eltwise, insert-gate, cut).

1. ``LAYER`` -- a layer name -- means that layer's own output, top 0: ``conv1`` is what
   ``conv1`` computes, *before* an in-place ``relu1`` that follows it. ``LAYER:i`` picks top
   ``i``. To mean the value after the in-place chain, name the last in-place layer (``relu1``).
2. Otherwise the name is a blob name and means the blob's *last* version (its value at the end
   of the in-place chain, what Caffe's blob holds after a forward pass).
3. A layer name wins over a blob of the same name (rule 1 keeps every value reachable).
"""

from __future__ import annotations

from ..dataflow import Dataflow, Value
from ..errors import LayerNotFoundError, NetError, did_you_mean
from ..net import Net

__all__ = ["split_spec", "resolve_value"]


def split_spec(net: Net, spec: str) -> tuple[str | None, int, str]:
    """(layer name or None, top index, blob name) for a bottom spec (module rules 1-3)."""
    if net.layers_named(spec):
        return spec, 0, spec
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and net.layers_named(head):
        return head, int(tail), spec
    if any(spec in lay.tops for lay in net.layers):
        return None, 0, spec
    names = [lay.name for lay in net.layers] + [t for lay in net.layers for t in lay.tops]
    where = f" in {net.source}" if net.source else ""
    raise LayerNotFoundError(
        f"no layer or blob named {spec!r}{where}" + did_you_mean(spec, dict.fromkeys(names))
    )


def resolve_value(flow: Dataflow, net: Net, spec: str) -> Value | None:
    """The value ``spec`` names in ``flow`` (None when it is not in this phase)."""
    layer, top, blob = split_spec(net, spec)
    if layer is None:
        return flow._latest.get(blob)
    nodes = [n for n in flow.nodes if n.layer.name == layer]
    if not nodes:
        return None
    node = nodes[-1]
    if top >= len(node.outputs):
        raise NetError(
            f"layer {layer!r} has {len(node.outputs)} top(s); {spec!r} asks for top {top}. "
            f"Use {layer}:0 .. {layer}:{len(node.outputs) - 1}"
        )
    return node.outputs[top]


