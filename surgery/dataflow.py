"""The dataflow of a net for one :class:`~surgery.net.NetState`, derived with Caffe's rules.

Caffe's ``Net::Init`` rules, reproduced here:

1. ``FilterNet``: a layer with include rules is kept when one matches the state; a layer
   without include rules is kept unless an exclude rule matches; both kinds on one layer is an
   error.
2. A bottom refers to the most recent producer of that blob name; an unknown name is an error.
3. A top is *in-place* when it equals the bottom at the same index (``AppendTop``); it then
   makes a new *version* of that blob. Any other top name that already exists is an error
   ("produced by multiple sources").
4. Net outputs are the blobs produced and not consumed afterwards (``available_blobs``).

The view is read-only and cheap to rebuild: values are linked by object, never kept in sync
by hand. An edge is named by *producer layer + top index* (:class:`Value`), not by blob name,
because blob names are ambiguous under in-place layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import NetError, did_you_mean
from .net import Layer, Net, NetState

__all__ = ["Value", "Node", "Dataflow", "Split", "resolve"]


@dataclass(eq=False)
class Value:
    """One version of a blob: the output ``top_index`` of ``producer``."""

    name: str
    producer: Node
    top_index: int
    version: int  # 0 for the first producer, +1 for each in-place layer after it

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def __repr__(self) -> str:
        return f"Value({self.name!r}#{self.version} from {self.producer.layer.name!r})"


@dataclass(eq=False)
class Node:
    """One included layer with its resolved input and output values."""

    layer: Layer
    index: int  # position among the included layers
    net_index: int  # position in ``net.layers``
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    inplace: list[bool] = field(default_factory=list)  # per top

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def type(self) -> str:
        return self.layer.type

    def __repr__(self) -> str:
        return f"Node({self.layer.name!r}, {self.layer.type})"


@dataclass
class Dataflow:
    """The resolved view of a net for one state."""

    net: Net
    state: NetState
    nodes: list[Node]
    outputs: list[Value]
    _consumers: dict[int, list[tuple[Node, int]]] = field(default_factory=dict, repr=False)
    _latest: dict[str, Value] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def values(self) -> list[Value]:
        return [v for n in self.nodes for v in n.outputs]

    def consumers(self, value: Value) -> list[tuple[Node, int]]:
        """(node, bottom index) pairs reading exactly this value."""
        return list(self._consumers.get(id(value), []))

    def latest(self, blob: str) -> Value:
        """The last version of a blob name (what Caffe's blob holds after a forward pass)."""
        try:
            return self._latest[blob]
        except KeyError:
            raise NetError(
                f"no blob named {blob!r} in the {self.state.phase} net"
                + did_you_mean(blob, self._latest)
            ) from None

    def node(self, layer_name: str) -> Node:
        for n in self.nodes:
            if n.layer.name == layer_name:
                return n
        raise NetError(
            f"layer {layer_name!r} is not in the {self.state.phase} net"
            + did_you_mean(layer_name, (n.layer.name for n in self.nodes))
        )

    def blob_names(self) -> list[str]:
        """Blob names in order of first production."""
        return list(self._latest)

    def ancestors(self, node: Node) -> list[Node]:
        """Every node ``node`` depends on (transitively), including itself, in net order."""
        seen: set[int] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.extend(v.producer for v in n.inputs)
        return [n for n in self.nodes if id(n) in seen]

    def descendants(self, node: Node) -> list[Node]:
        """Every node reading (transitively) an output of ``node``, including itself."""
        seen: set[int] = {id(node)}
        for n in self.nodes[node.index + 1 :]:
            if any(id(v.producer) in seen for v in n.inputs):
                seen.add(id(n))
        return [n for n in self.nodes if id(n) in seen]


@dataclass(frozen=True)
class Split:
    """A ``Split`` layer Caffe inserts (``InsertSplits``) where one value feeds several layers."""

    value: Value
    name: str  # <blob>_<producer>_<top index>_split
    tops: tuple[str, ...]  # <blob>_<producer>_<top index>_split_<k>, one per consumer

    @property
    def after(self) -> Node:
        return self.value.producer


def implicit_splits(flow: Dataflow) -> list[Split]:
    """The Split layers Caffe would insert for ``flow``, in the order it inserts them.

    Caffe names them after the *last* producer of the blob (an in-place layer included) and
    counts a top with a non-zero loss weight as one more consumer.
    """
    out: list[Split] = []
    for node in flow.nodes:
        weights = node.layer.extra.get("loss_weight", [])
        for j, value in enumerate(node.outputs):
            count = len(flow.consumers(value))
            if j < len(weights) and weights[j]:
                count += 1
            if count > 1:
                base = f"{value.name}_{node.layer.name}_{j}_split"
                out.append(Split(value, base, tuple(f"{base}_{k}" for k in range(count))))
    return out


def resolve(net: Net, state: NetState | None = None) -> Dataflow:
    """Build the dataflow of ``net`` for ``state`` (default TEST) with Caffe's rules.

    Raises:
        NetError: an unknown bottom, a top produced twice, or include+exclude on one layer.
    """
    state = state or NetState()
    where = f" in {net.source}" if net.source else ""
    nodes: list[Node] = []
    latest: dict[str, Value] = {}
    consumers: dict[int, list[tuple[Node, int]]] = {}
    # Caffe's available_blobs is a std::set (outputs in name order); we keep production order.
    available: dict[str, Value] = {}
    for net_index, layer in enumerate(net.layers):
        if not layer.is_included(state):  # rule 1
            continue
        node = Node(layer, len(nodes), net_index)
        for i, bottom in enumerate(layer.bottoms):  # rule 2
            if bottom not in latest:
                raise NetError(
                    f"layer {layer.name!r} ({layer.type}){where}: unknown bottom blob "
                    f"{bottom!r} in the {state.phase} net; no earlier layer produces it"
                    + did_you_mean(bottom, latest)
                    + ". Fix the bottom name or add the producing layer before it."
                )
            value = latest[bottom]
            node.inputs.append(value)
            consumers.setdefault(id(value), []).append((node, i))
            available.pop(bottom, None)
        for j, top in enumerate(layer.tops):  # rule 3
            inplace = j < len(layer.bottoms) and layer.bottoms[j] == top
            if inplace:
                version = latest[top].version + 1
            elif top in latest:
                first = latest[top].producer.layer.name
                raise NetError(
                    f"layer {layer.name!r} ({layer.type}){where}: top blob {top!r} is produced "
                    f"by multiple sources in the {state.phase} net (first by {first!r}). "
                    "Rename the top, or make it in-place by listing it as the bottom at the "
                    "same position."
                )
            else:
                version = 0
            value = Value(top, node, j, version)
            node.outputs.append(value)
            node.inplace.append(inplace)
            latest[top] = value
            available[top] = value
        nodes.append(node)
    flow = Dataflow(net, state, nodes, list(available.values()))  # rule 4
    flow._consumers = consumers
    flow._latest = latest
    return flow
