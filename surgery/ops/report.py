"""The report every surgery op returns: what changed, what was left alone, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Report"]


@dataclass
class Report:
    """What an op did.

    Attributes:
        op: the op name (``"rename_heads"``).
        changed: one entry per change: ``{"layer": name, "what": description, ...}``.
        left: things deliberately not changed: ``{"layer": name, "why": reason}``.
        notes: free-form remarks (seed used, upgrades, warnings).
        seed: the random seed used for new values, when any were drawn.
        data: op-specific figures (counts, bytes, multipliers table...).
    """

    op: str
    changed: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def change(self, layer: str | None, what: str, **kw: Any) -> None:
        self.changed.append({"layer": layer, "what": what, **kw})

    def leave(self, layer: str | None, why: str, **kw: Any) -> None:
        self.left.append({"layer": layer, "why": why, **kw})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def merge(self, other: Report) -> None:
        """Append another report's entries (used by recipes)."""
        for c in other.changed:
            self.changed.append({"op": other.op, **c})
        for c in other.left:
            self.left.append({"op": other.op, **c})
        self.notes.extend(f"{other.op}: {n}" for n in other.notes)
        self.data.setdefault("steps", []).append(other.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "changed": list(self.changed),
            "left": list(self.left),
            "notes": list(self.notes),
            "seed": self.seed,
            "data": dict(self.data),
        }

    def text(self) -> str:
        lines = [f"{self.op}: {len(self.changed)} change(s)"]
        for c in self.changed:
            where = f"{c['layer']}: " if c.get("layer") else ""
            lines.append(f"  changed  {where}{c['what']}")
        for c in self.left:
            where = f"{c['layer']}: " if c.get("layer") else ""
            lines.append(f"  left     {where}{c['why']}")
        for n in self.notes:
            lines.append(f"  note     {n}")
        if self.seed is not None:
            lines.append(f"  seed     {self.seed}")
        return "\n".join(lines)
