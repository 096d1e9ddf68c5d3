"""A net as a Graphviz graph (DOT), optionally coloured by its differences from another net.

Rules (:func:`to_dot`):

1. One node per layer of the chosen phase (Caffe's ``FilterNet``), in file order; an edge per
   blob read, from the layer whose output it reads (in-place chains followed, so a ReLU sits
   between its convolution and the next layer), labelled with the blob name and its shape.
   Caffe's ``draw_net.py`` draws blobs as octagon nodes; here they are edge labels, which halves
   the node count of a big net and keeps the same information.
2. A node shows the layer name, its type, the settings ``draw_net.py`` shows (kernel, stride,
   pad, pooling method, ``num_output``), its output shape and its learnable parameter count.
   Colours follow ``draw_net.py`` (convolutions red, pooling orange, inner products purple,
   in-place layers green, other layers blue).
3. Frozen layers (every learnable blob at ``lr_mult: 0``) are grey with a dashed border and
   marked ``frozen``.
4. With ``diff`` (a :class:`~surgery.diff.NetDiff` of another net against this one): added
   layers are drawn with a thick green border, changed or renamed layers thick orange (the
   change listed in the label), and removed layers as red dashed nodes attached to the blobs
   they read, so a surgery is reviewed at a glance.
5. Shapes come from the same inference as ``surgery info`` (dataset layers guessed from their
   parameters); a net whose shapes cannot be inferred is drawn without them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from .dataflow import Dataflow, resolve
from .diff import NetDiff
from .errors import SurgeryError
from .net import Layer, Net, NetState

__all__ = ["to_dot", "render", "GraphvizMissingError"]

_TYPE_COLOURS = {
    "Convolution": "#FF5050",
    "Deconvolution": "#FF5050",
    "ConvolutionDepthwise": "#FF5050",
    "Pooling": "#FF9900",
    "InnerProduct": "#CC33FF",
}
_INPLACE_COLOUR = "#90EE90"
_DEFAULT_COLOUR = "#6495ED"
_FROZEN_COLOUR = "#D3D3D3"


class GraphvizMissingError(SurgeryError):
    """SVG/PNG output needs Graphviz's ``dot``, which is not installed."""


def _esc(text: str) -> str:
    """Escape one label line for a DOT double-quoted string: quotes, backslashes and control
    characters (a newline in a layer name is shown as ``\\x0a``, never as a line break)."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _q(*lines: str) -> str:
    """A DOT string of one or more label lines (DOT's ``\\n`` between them)."""
    return '"' + "\\n".join(_esc(line) for line in lines) + '"'


def _fmt_shape(shape: Any) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape) or "scalar"


def _first(v: Any, default: Any) -> Any:
    if isinstance(v, list):
        return v[0] if v else default
    return default if v is None else v


def _settings(lay: Layer) -> list[str]:
    a = lay.attrs
    out: list[str] = []
    if lay.type in ("Convolution", "Deconvolution", "ConvolutionDepthwise"):
        k = a.get("kernel_h") or _first(a.get("kernel_size"), "?")
        kw = a.get("kernel_w") or _first(a.get("kernel_size"), "?")
        out.append(f"kernel {k}x{kw} stride {_first(a.get('stride'), 1)} "
                   f"pad {_first(a.get('pad'), 0)}")
        if "num_output" in a:
            out.append(f"num_output {a['num_output']}")
    elif lay.type == "Pooling":
        if a.get("global_pooling"):
            out.append(f"{a.get('pool', 'MAX')} global")
        else:
            kh = a.get("kernel_h") or a.get("kernel_size", "?")
            kw = a.get("kernel_w") or a.get("kernel_size", "?")
            out.append(f"{a.get('pool', 'MAX')} {kh}x{kw} stride {a.get('stride', 1)} "
                       f"pad {a.get('pad', 0)}")
    elif lay.type == "InnerProduct" and "num_output" in a:
        out.append(f"num_output {a['num_output']}")
    return out


def _shapes(net: Net, flow: Dataflow, input_shapes: dict[str, tuple[int, ...]] | None) -> Any:
    from .shapes import infer, starting_shapes

    try:
        return infer(flow, starting_shapes(flow, input_shapes)[0], check_weights=False)
    except SurgeryError:
        return None  # rule 5: drawn without shapes


def _param_count(lay: Layer, shapes: list[Any]) -> int:
    import math

    total = 0
    for i, p in enumerate(lay.params):
        if p.data is not None:
            total += int(p.data.size)
        elif i < len(shapes) and shapes[i] is not None:
            total += math.prod(shapes[i])
    if not lay.params:
        total = sum(math.prod(s) for s in shapes if s is not None)
    return total


def to_dot(
    net: Net,
    phase: str = "TEST",
    *,
    diff: NetDiff | None = None,
    other: Net | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    rankdir: str = "TB",
) -> str:
    """The DOT text of ``net`` in ``phase`` (rules in the module docstring).

    Args:
        net: the net to draw.
        phase: ``"TRAIN"`` or ``"TEST"``.
        diff: ``diff_nets(other, net)``: colours added, changed and removed layers.
        other: the net ``diff`` was computed against, to draw removed layers' inputs.
        input_shapes: shapes by blob name for the data layers (as ``--input-shape``).
        rankdir: Graphviz ``rankdir`` (``TB``, ``LR``, ``BT``).

    Raises:
        NetError: the net cannot be resolved in ``phase`` (unknown bottoms...).
    """
    flow = resolve(net, NetState(phase.upper()))
    info = _shapes(net, flow, input_shapes)
    added = {d["name"] for d in diff.added} if diff else set()
    changed: dict[str, Any] = {}
    if diff:
        for c in diff.changed:
            changed[c.new_name or c.name] = c
    ids: dict[int, str] = {}
    lines = [
        f"digraph {_q(net.name or 'net')} {{",
        f"  rankdir={rankdir};",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for node in flow.nodes:
        lay = node.layer
        nid = f"n{node.index}"
        ids[id(node)] = nid
        label = [lay.name, f"({lay.type})", *_settings(lay)]
        if info is not None:
            tops = info.tops(node)
            if tops:
                label.append("-> " + " ".join(_fmt_shape(s) for s in tops))
            n_params = _param_count(lay, info.params(node)) if lay.params or info.params(node) \
                else 0
        else:
            n_params = sum(int(p.data.size) for p in lay.params if p.data is not None)
        if n_params:
            label.append(f"{n_params:,} params")
        learnable = bool(lay.params) or (info is not None and bool(info.params(node)))
        frozen = learnable and bool(lay.params) and all(
            p.effective_lr_mult == 0 for p in lay.params
        ) and (info is None or len(lay.params) >= len(info.params(node)))
        attrs = []
        colour = _TYPE_COLOURS.get(lay.type, _DEFAULT_COLOUR)
        if node.inplace and all(node.inplace):
            colour = _INPLACE_COLOUR
        if frozen:
            label.append("frozen (lr_mult 0)")
            colour = _FROZEN_COLOUR
            attrs.append('style="rounded,filled,dashed"')
        if lay.name in added:
            attrs += ['color="#00A000"', "penwidth=3"]
            label.append("[added]")
        elif lay.name in changed:
            c = changed[lay.name]
            attrs += ['color="#FF8C00"', "penwidth=3"]
            if c.renamed:
                label.append(f"[renamed from {c.name}]")
            kinds = sorted({ch.get("field") or ch["what"] for ch in c.changes})
            if kinds:
                label.append("[changed: " + ", ".join(kinds[:4])
                             + (", ..." if len(kinds) > 4 else "") + "]")
        attrs.insert(0, f'fillcolor="{colour}"')
        lines.append(f"  {nid} [label={_q(*label)}, {', '.join(attrs)}];")
    for node in flow.nodes:
        for v in node.inputs:
            src = ids.get(id(v.producer))
            if src is None:
                continue
            shape = info.shape(v) if info is not None else None
            text = [v.name] + ([] if shape is None else [_fmt_shape(shape)])
            lines.append(f"  {src} -> {ids[id(node)]} [label={_q(*text)}];")
    if diff and diff.removed:
        latest = {}
        for node in flow.nodes:
            for v in node.outputs:
                latest[v.name] = ids[id(node)]
        for k, d in enumerate(diff.removed):
            rid = f"r{k}"
            lines.append(
                f"  {rid} [label={_q(d['name'], '(' + d['type'] + ')', '[removed]')}"
                ', fillcolor="#FFE0E0", color="#D00000", style="rounded,filled,dashed", '
                "penwidth=3];"
            )
            for blob in d["bottoms"]:
                if blob in latest:
                    lines.append(f'  {latest[blob]} -> {rid} [style=dashed, color="#D00000"];')
    if diff:
        lines.append(
            '  legend [shape=plaintext, style="", label="green: added   orange: changed'
            '   red dashed: removed   grey dashed: frozen"];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text: str, fmt: str) -> bytes:
    """Run Graphviz's ``dot`` to turn DOT text into ``fmt`` (``svg`` or ``png``) bytes.

    Raises:
        GraphvizMissingError: ``dot`` is not on PATH.
        SurgeryError: ``dot`` failed.
    """
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizMissingError(
            f"{fmt.upper()} output needs Graphviz's `dot`, which is not installed: install it "
            "(apt-get install graphviz, brew install graphviz or conda install graphviz), or "
            "write DOT with -o NAME.dot"
        )
    res = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                         timeout=600, check=False)
    if res.returncode != 0:
        msg = res.stderr.decode(errors="replace").strip().splitlines()
        raise SurgeryError(f"graphviz dot failed: {msg[-1] if msg else res.returncode}")
    return res.stdout


def output_format(path: str | Path) -> str:
    """``dot``, ``svg`` or ``png`` from an output file name.

    Raises:
        SurgeryError: another suffix.
    """
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("dot", "gv"):
        return "dot"
    if suffix in ("svg", "png"):
        return suffix
    raise SurgeryError(f"-o {path}: write .dot, .gv, .svg or .png")
