"""``NetSummary``: the size facts of a network next to its target (what ``NormNet.summary()`` returns and the CLI
prints)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["NetSummary"]


@dataclass
class NetSummary:
    """Size facts of a NormNet next to its target (``summary()``)."""

    method: str
    target_dims: list[int]
    depth: int  # normalization layers along the longest path
    widths: list[int]  # width of every normalization layer
    frozen_parameters: int
    frozen_nonzeros: int
    tunable_parameters: int  # all γ and β
    target_parameters: int
    solved: bool
    exact: bool | None
    max_relative_residual: float | None
    notes: list[str] = field(default_factory=list)
    in_shape: list[int] | None = None  # image targets: (c, H, W)
    target_name: str | None = None  # sequence models (transformers): the model's class

    @property
    def max_width(self) -> int:
        return max(self.widths) if self.widths else 0

    def ratio(self, numerator: str) -> float:
        return getattr(self, numerator) / max(self.target_parameters, 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            max_width=self.max_width,
            frozen_to_target=self.ratio("frozen_parameters"),
            nonzeros_to_target=self.ratio("frozen_nonzeros"),
            tunable_to_target=self.ratio("tunable_parameters"),
        )
        return d

    def rows(self) -> list[tuple[str, str]]:
        exact = "n/a (not solved)" if not self.solved else ("yes" if self.exact else "no (approximate)")
        rows = [
            ("method", self.method),
            ("target", f"{self.target_name} (sequence model)")
            if self.target_name is not None
            else ("target dims", " → ".join(map(str, self.target_dims)))
            if self.in_shape is None
            else (
                "target",
                f"input {'×'.join(map(str, self.in_shape))}, output channels/features "
                f"{', '.join(map(str, self.target_dims[len(self.in_shape) :]))}",
            ),
            ("normalization layers (depth)", str(self.depth)),
            ("max width", str(self.max_width)),
            ("frozen parameters", f"{self.frozen_parameters:,} ({self.ratio('frozen_parameters'):.1f}× target)"),
            ("frozen nonzeros", f"{self.frozen_nonzeros:,} ({self.ratio('frozen_nonzeros'):.1f}× target)"),
            ("tunable γ, β", f"{self.tunable_parameters:,} ({self.ratio('tunable_parameters'):.2f}× target)"),
            ("target parameters", f"{self.target_parameters:,}"),
            ("exact", exact),
        ]
        if self.max_relative_residual is not None:
            rows.append(("max relative residual of solves", f"{self.max_relative_residual:.2e}"))
        rows += [("note", n) for n in self.notes]
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())
