"""Truncate a net after one value: ``surgery cut NET --at BLOB``.

The feature-extractor recipe: keep what computes ``pool5`` (or ``fc7``), drop the classifier,
the losses and every branch the value does not need.
"""

from __future__ import annotations

from ..errors import NetError
from ..net import Net
from . import _common as C
from .report import Report
from .values import resolve_value

__all__ = ["cut"]


def cut(net: Net, at: str) -> tuple[Net, Report]:
    """Keep only the layers the value ``at`` depends on.

    ``at`` is named as for the insert ops (:mod:`surgery.ops.values`): ``LAYER`` is that
    layer's own output (``fc7`` before an in-place ``relu7``; name ``relu7`` for the value
    after it), ``LAYER:i`` its top i, a blob name that is no layer the blob's last version.

    Rules:

    1. In each phase (TRAIN, TEST) where ``at`` exists, the layers it depends on (its
       producer and their ancestors, with the data layers) are kept; every other layer is
       dropped: later layers, in-place layers that would overwrite ``at`` after its producer,
       side branches (auxiliary heads), losses and Accuracy layers. A layer only in phases
       where ``at`` does not exist is dropped too.
    2. Kept layers are unchanged (definition, rules, param specs, the same weight arrays); the
       file order is kept. ``at`` becomes an output of the net; other tops no kept layer reads
       (a data layer's ``label``) stay unread outputs, as Caffe allows.
    3. The result passes :func:`surgery.check.check`.

    Args:
        net: the net (not modified).
        at: the value to end with.

    Returns:
        ``(new net, report)``; ``report.data`` holds ``at`` (the blob name), ``kept`` and
        ``dropped`` (layer names).

    Raises:
        LayerNotFoundError: ``at`` names no layer and no blob (with a did-you-mean).
        NetError: ``at`` is in no phase of the net, or the result is invalid.
    """
    report = Report("cut")
    keep: set[int] = set()
    blob = None
    phases = []
    for phase, flow in C.flows(net).items():
        value = resolve_value(flow, net, at)
        if value is None:
            continue
        phases.append(phase)
        blob = value.name
        keep.update(id(n.layer) for n in flow.ancestors(value.producer))
    if blob is None:
        raise NetError(f"cut: {at!r} is not computed in any phase of "
                       f"{net.source or 'the net'}; name a value the net produces")
    out = net.copy()
    kept = [o for lay, o in zip(net.layers, out.layers, strict=True) if id(lay) in keep]
    dropped = [lay.name for lay in net.layers if id(lay) not in keep]
    out.layers = kept
    report.change(None, f"dropped {len(dropped)} layer(s) after or beside {at!r}: "
                  + ", ".join(dropped), layers=dropped)
    report.note(f"the net now ends with blob {blob!r} ({len(kept)} layer(s) kept, phases "
                f"{', '.join(phases)})")
    report.data.update(at=blob, kept=[lay.name for lay in kept], dropped=dropped,
                       phases=phases)
    return C.finish(out, report)
