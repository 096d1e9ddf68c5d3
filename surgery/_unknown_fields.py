"""Fields a definition sets that our schema does not know: cut out verbatim, put back on write.

Caffe forks add fields to ``caffe.proto``; the schema (``protos/caffe.proto``) holds the widely
used ones, but a file from a fork we have never seen must still load, edit and write back
(issue 7 item 16). Protobuf's text parser can only refuse such a field or drop it, so
:func:`split_unknown` walks the text alongside the message descriptors first: every field
the descriptor does not name -- with its whole value, a scalar, a list or a ``{ }`` block --
is cut out (blanked, so line numbers stay) and returned with where it was:

- ``layer``: the index of the ``layer { }`` block (``None`` for a net-level field);
- ``path``: the known message fields leading to it inside that layer, each with its
  occurrence (``(("transform_param", 0),)`` for ``transform_param { scale_factors: 1 }``);
- ``text``: the field as written, re-indented to start at column 0.

:func:`insert_unknown` puts such texts back into the printed text of a layer. Only V2
``layer`` blocks and net-level fields are handled; an unknown field elsewhere (a legacy
``layers`` block) is left in the text, so the parser's own error reports it.

The walker needs the descriptors only (``fields_by_name``, ``message_type``); it imports no
protobuf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Unknown", "split_unknown", "insert_unknown"]

_TOKEN = re.compile(
    r"""\s+|#[^\n]*|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'"""
    r"""|[{}<>\[\]:;,]|[^\s{}<>\[\]:;,"'#]+"""
)
_OPEN = {"{": "}", "<": ">", "[": "]"}


@dataclass(frozen=True)
class Unknown:
    """One field the schema does not know, as written."""

    layer: int | None
    path: tuple[tuple[str, int], ...]
    name: str
    text: str
    line: int


class _Bail(Exception):
    """The text is not what the walker understands; let the real parser report it."""


def _tokens(text: str) -> list[tuple[str, int, int]]:
    out = []
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok[0].isspace() or tok[0] == "#":
            continue
        out.append((tok, m.start(), m.end()))
    return out


def _skip_value(toks: list[tuple[str, int, int]], i: int) -> int:
    """Index after the value starting at ``toks[i]`` (a scalar, strings, a block or a list)."""
    if i >= len(toks):
        raise _Bail
    tok = toks[i][0]
    if tok in _OPEN:
        depth = 0
        while i < len(toks):
            t = toks[i][0]
            if t in _OPEN:
                depth += 1
            elif t in ("}", ">", "]"):
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise _Bail
    if tok in ("}", ">", "]", ":", ";", ","):
        raise _Bail
    i += 1
    while tok[0] in "\"'" and i < len(toks) and toks[i][0][0] in "\"'":
        i += 1  # adjacent strings concatenate
    return i


def _dedent(text: str, column: int) -> str:
    lines = text.split("\n")
    rest = []
    for line in lines[1:]:
        lead = len(line) - len(line.lstrip(" \t"))
        rest.append(line[min(lead, column):])
    return "\n".join([lines[0], *rest]).rstrip()


def split_unknown(text: str, descriptor: Any) -> tuple[str, list[Unknown]]:
    """Cut every field ``descriptor`` (a ``NetParameter`` descriptor) does not know.

    Returns:
        The text with those fields blanked (newlines kept, so line numbers hold) and the
        fields cut, in file order. On text the walker does not understand (a syntax error,
        extension syntax), the fields found before that point: the parser then reports the
        error itself, with its line (or the next unknown field, which then stays an error).
    """
    toks = _tokens(text)
    found: list[tuple[int, int, Unknown]] = []

    def walk(i: int, desc: Any, layer: int | None, path: tuple[tuple[str, int], ...],
             top: bool) -> int:
        seen: dict[str, int] = {}
        while i < len(toks) and toks[i][0] not in ("}", ">"):
            name, start, _ = toks[i]
            if name in _OPEN or name in (":", ";", ",", "]"):
                raise _Bail
            j = i + 1
            if j < len(toks) and toks[j][0] == ":":
                j += 1
            fd = desc.fields_by_name.get(name)
            if fd is None:
                end_i = _skip_value(toks, j)
                if top and name != "layer" or layer is not None:
                    col = start - (text.rfind("\n", 0, start) + 1)
                    raw = text[start:toks[end_i - 1][2]]
                    line = text.count("\n", 0, start) + 1
                    found.append((start, toks[end_i - 1][2],
                                  Unknown(layer, path, name, _dedent(raw, col), line)))
                i = end_i
            elif fd.message_type is not None and j < len(toks) and toks[j][0] in ("{", "<"):
                k = seen.get(name, 0)
                seen[name] = k + 1
                if top and name == "layer":
                    end = walk(j + 1, fd.message_type, k, (), False)
                elif top:  # another net-level message (state, input_shape): not handled
                    end = walk(j + 1, fd.message_type, None, ((name, k),), False) \
                        if name != "layers" else _skip_value(toks, j) - 1
                else:
                    end = walk(j + 1, fd.message_type, layer, (*path, (name, k)), False)
                if end >= len(toks) or toks[end][0] != _OPEN[toks[j][0]]:
                    raise _Bail
                i = end + 1
            else:
                i = _skip_value(toks, j)
            while i < len(toks) and toks[i][0] in (";", ","):
                i += 1
        return i

    try:
        walk(0, descriptor, None, (), True)
    except _Bail:
        pass  # cut what was found before it: the parser then reports the real error's line
    # keep only what we can put back: layer fields and plain net-level fields
    keep = [(s, e, u) for s, e, u in found if u.layer is not None or not u.path]
    if not keep:
        return text, []
    out = []
    last = 0
    for s, e, _u in keep:
        out.append(text[last:s])
        out.append(re.sub(r"[^\n]", " ", text[s:e]))
        last = e
    out.append(text[last:])
    return "".join(out), [u for _s, _e, u in keep]


def insert_unknown(body: str, items: list[tuple[tuple[tuple[str, int], ...], str]],
                   indent: int) -> str:
    """Put verbatim field texts back into the printed body of one message.

    Args:
        body: protobuf's text for the message's fields, each line indented by ``indent``
            spaces and nested blocks by 2 more (``text_format.MessageToString(msg,
            indent=indent)``).
        items: ``(path, text)`` pairs: the known message fields leading to the place (with
            occurrence) and the field as written.
        indent: the indentation of ``body``'s own fields.

    Returns:
        The body with each text at the end of its block; a block that no longer exists is
        written anew around it.
    """
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for path, text in items:
        lo, hi, ind = 0, len(lines), indent
        missing: list[str] = []
        for pos, (name, occ) in enumerate(path):
            head, seen, start = " " * ind + name + " {", -1, None
            for n in range(lo, hi):
                if lines[n] == head:
                    seen += 1
                    if seen == occ:
                        start = n
                        break
            if start is None:
                missing = [p for p, _ in path[pos:]]
                break
            close = " " * ind + "}"
            end = next(n for n in range(start + 1, hi) if lines[n] == close)
            lo, hi, ind = start + 1, end, ind + 2
        new: list[str] = []
        for depth, name in enumerate(missing):
            new.append(" " * (ind + 2 * depth) + name + " {")
        inner = ind + 2 * len(missing)
        new.extend(" " * inner + t if t else t for t in text.split("\n"))
        for depth in reversed(range(len(missing))):
            new.append(" " * (ind + 2 * depth) + "}")
        lines[hi:hi] = new
    return "\n".join(lines) + "\n"
