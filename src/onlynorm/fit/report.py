"""What a fit did: one :class:`Phase` per method run (held-out error before/after, wall time, iterations).

>>> r = FitReport(method="auto", train_samples=10, held_out_samples=5, initial_error=1.0)
>>> r.phases.append(Phase("layerwise", error_before=1.0, error_after=0.25, seconds=0.01, iterations=2))
>>> r.final_error
0.25
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Phase", "FitReport"]


@dataclass
class Phase:
    """One method's run: relative RMS error on the held-out points before and after it, wall time, iterations."""

    name: str
    error_before: float
    error_after: float
    seconds: float
    iterations: int
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    #: held-out error after each iteration (gauss-newton: after each *accepted* step)
    history: list[float] = field(default_factory=list)


@dataclass
class FitReport:
    """Outcome of :func:`onlynorm.fit_norms`."""

    method: str
    train_samples: int
    held_out_samples: int
    initial_error: float
    phases: list[Phase] = field(default_factory=list)
    exact: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def final_error(self) -> float:
        return self.phases[-1].error_after if self.phases else self.initial_error

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def iterations(self) -> int:
        return sum(p.iterations for p in self.phases)

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r} in this report; phases: {[p.name for p in self.phases]}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(final_error=self.final_error, seconds=self.seconds)
        return d

    def table(self) -> tuple[list[str], list[list[str]]]:
        header = ["phase", "held-out rel RMS before", "after", "seconds", "iterations"]
        rows = [
            [p.name, f"{p.error_before:.3e}", f"{p.error_after:.3e}", f"{p.seconds:.3f}", str(p.iterations)]
            for p in self.phases
        ]
        return header, rows

    def rows(self) -> list[tuple[str, str]]:
        out = [
            ("method", self.method),
            ("points (train / held-out)", f"{self.train_samples} / {self.held_out_samples}"),
            ("held-out rel RMS at start", f"{self.initial_error:.3e}"),
            ("held-out rel RMS at end", f"{self.final_error:.3e}"),
            ("exact", "yes" if self.exact else "no"),
            ("seconds", f"{self.seconds:.3f}"),
        ]
        return out + [("note", n) for n in self.notes + [n for p in self.phases for n in p.notes]]

    def __str__(self) -> str:
        header, rows = self.table()
        lines = ["  ".join(header)] + ["  ".join(r) for r in rows]
        w = max(len(k) for k, _ in self.rows())
        return "\n".join(lines + [f"{k:<{w}}  {v}" for k, v in self.rows()])
