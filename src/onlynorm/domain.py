"""Input boxes and interval bound propagation (IBP).

A :class:`Box` ``D = [low, high]`` is where equivalence is claimed. IBP pushes a box through an affine map:
for ``z = W h + b`` with ``h ∈ [l, u]``::

    min z = W⁺ l + W⁻ u + b,    max z = W⁺ u + W⁻ l + b,    W⁺ = max(W, 0), W⁻ = min(W, 0)

and a ReLU clamps both ends at 0. The bounds are exact for a single affine layer (attained at box vertices).

>>> box = Box(-1.0, 1.0, dim=3)
>>> box.low.shape, box.dim
(torch.Size([3]), 3)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InvalidDomainError
from .finite import all_finite

__all__ = ["Box", "affine_bounds", "interval_bounds", "resolve_domain"]

#: largest accepted |bound|: far beyond any real input scale, far below where products of weights and bounds
#: overflow float64 (≈ 1.8e308)
_MAX_BOUND = 1e100


class Box:
    """An axis-aligned box ``[low, high]``; ``low``/``high`` are scalars or per-coordinate sequences/tensors.

    With scalar bounds and no ``dim`` the box is *unsized* and takes the target's input dimension when used.
    Bounds of image shape ``(c, H, W)`` describe a CNN's input box (per pixel) and supply its ``in_shape``; they
    are kept flat (``dim = c·H·W``) with :attr:`shape` remembering the image shape. Bounds are kept in float64 on
    the CPU (they are tiny) and moved where needed.

    >>> Box(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).shape, Box(0.0, 1.0, dim=3).dim
    ((1, 2, 2), 3)
    """

    def __init__(
        self,
        low: float | Sequence[float] | torch.Tensor = -1.0,
        high: float | Sequence[float] | torch.Tensor = 1.0,
        dim: int | None = None,
    ):
        try:
            lo = torch.as_tensor(low, dtype=torch.float64).detach().cpu().clone()
            hi = torch.as_tensor(high, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidDomainError(
                f"expected numbers for the box bounds, found low={low!r}, high={high!r} ({exc})"
            ) from None
        shapes = {tuple(t.shape) for t in (lo, hi) if t.ndim > 1}
        if len(shapes) > 1 or any(len(s) != 3 for s in shapes):
            raise InvalidDomainError(
                f"expected scalar, 1-D or image-shaped (c, H, W) bounds, found shapes "
                f"{tuple(lo.shape)} and {tuple(hi.shape)}"
            )
        self.shape: tuple[int, ...] | None = shapes.pop() if shapes else None
        if self.shape is not None:
            lo, hi = lo.expand(self.shape).reshape(-1), hi.expand(self.shape).reshape(-1)
        sizes = {t.numel() for t in (lo, hi) if t.ndim == 1}
        if dim is not None:
            if dim < 1:
                raise InvalidDomainError(f"expected a box dimension >= 1, found dim={dim}")
            sizes.add(dim)
        if len(sizes) > 1:
            raise InvalidDomainError(f"box bounds disagree on the dimension: found sizes {sorted(sizes)}")
        if sizes:
            n = sizes.pop()
            if n == 0:
                raise InvalidDomainError("expected a non-empty box, found 0-dimensional bounds")
            lo, hi = lo.expand(n).clone(), hi.expand(n).clone()
        if not (all_finite(lo) and all_finite(hi)):
            raise InvalidDomainError("expected finite box bounds, found NaN or Inf; use a bounded domain")
        if not all_finite(hi - lo) or float(torch.maximum(lo.abs(), hi.abs()).max()) > _MAX_BOUND:
            raise InvalidDomainError(
                f"box bounds overflow: expected |low|, |high| ≤ {_MAX_BOUND:g} so that interval "
                "bounds and β stay finite in float64; rescale the inputs"
            )
        if not (lo < hi).all():
            bad = int(torch.nonzero(~(lo < hi).reshape(-1))[0]) if lo.ndim else 0
            raise InvalidDomainError(
                f"expected low < high in every coordinate, found low={float(lo.reshape(-1)[bad])!r} >= "
                f"high={float(hi.reshape(-1)[bad])!r} (coordinate {bad}); swap or widen the bounds"
            )
        self.low, self.high = lo, hi

    @property
    def dim(self) -> int | None:
        """Number of coordinates, or ``None`` for an unsized box of scalar bounds."""
        return None if self.low.ndim == 0 else self.low.numel()

    def expand(self, dim: int) -> Box:
        """This box in ``dim`` coordinates; an error if it is already sized differently."""
        if self.dim is None:
            return Box(self.low, self.high, dim=dim)
        if self.dim != dim:
            if self.shape is not None:
                raise InvalidDomainError(
                    f"expected a box of {dim} coordinates (the target's input size), found an "
                    f"image box of shape {self.shape}"
                )
            raise InvalidDomainError(
                f"expected a box of dimension {dim} (the target's input width), found dimension {self.dim}"
            )
        return self

    def sample(
        self, n: int, seed: int = 0, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``n`` points of the box: a quarter uniform inside, a quarter on faces, a quarter vertices, a quarter
        near vertices (where IBP bounds are attained and units would first switch off).

        Deterministic for a seed. Returns shape ``(n, dim)``.
        """
        if self.dim is None:
            raise InvalidDomainError("cannot sample an unsized box; call box.expand(dim) first")
        if n < 1:
            raise InvalidDomainError(f"expected at least 1 sample, found {n}")
        gen = torch.Generator().manual_seed(int(seed))
        d = self.dim
        u = torch.rand(n, d, generator=gen, dtype=torch.float64)
        q = n // 4
        # faces: pin one random coordinate per point to low or high
        face_rows = torch.arange(q, 2 * q)
        face_cols = torch.randint(0, d, (q,), generator=gen)
        u[face_rows, face_cols] = torch.randint(0, 2, (q,), generator=gen, dtype=torch.float64)
        # vertices
        u[2 * q : 3 * q] = torch.randint(0, 2, (q, d), generator=gen, dtype=torch.float64)
        # near vertices: vertex pulled inwards by a small random amount
        vert = torch.randint(0, 2, (n - 3 * q, d), generator=gen, dtype=torch.float64)
        jitter = 1e-3 * torch.rand(n - 3 * q, d, generator=gen, dtype=torch.float64)
        u[3 * q :] = vert - jitter * (2 * vert - 1)
        x = self.low + u * (self.high - self.low)
        return x.to(dtype=dtype, device=device)

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.low.to(x), self.high.to(x)
        return ((x >= lo) & (x <= hi)).all(dim=-1)

    def to_dict(self) -> dict:
        out = {"low": self.low.tolist(), "high": self.high.tolist()}
        if self.shape is not None:
            out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Box:
        box = cls(d["low"], d["high"])
        shape = d.get("shape")
        if shape is not None:
            if not (
                isinstance(shape, list)
                and len(shape) == 3
                and all(isinstance(v, int) and v > 0 for v in shape)
                and box.dim == shape[0] * shape[1] * shape[2]
            ):
                raise InvalidDomainError(f"expected 'shape' to be (c, H, W) matching the bounds, found {shape!r}")
            box.shape = tuple(shape)
        return box

    def __repr__(self) -> str:
        def fmt(t: torch.Tensor) -> str:
            if t.ndim == 0:
                return f"{float(t):g}"
            if bool((t == t[0]).all()):
                return f"{float(t[0]):g}"
            return str([round(v, 6) for v in t.tolist()])

        return f"Box(low={fmt(self.low)}, high={fmt(self.high)}, dim={self.dim})"


def resolve_domain(domain: Box | tuple | None, dim: int) -> Box:
    """``None`` → ``[-1, 1]^dim``; a ``(low, high)`` pair or a Box → a Box of dimension ``dim``."""
    if domain is None:
        return Box(-1.0, 1.0, dim=dim)
    if isinstance(domain, Box):
        return domain.expand(dim)
    if isinstance(domain, (tuple, list)) and len(domain) == 2:
        return Box(domain[0], domain[1]).expand(dim)
    raise InvalidDomainError(f"expected a Box, a (low, high) pair or None, found {type(domain).__name__}")


def affine_bounds(
    weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact range of ``z = W h + b`` over ``h ∈ [low, high]`` (componentwise min and max):
    ``z ∈ W c ± |W| r`` with the box's centre ``c`` and radius ``r`` — one ``|W|`` pass and two products (the
    ``W⁺ l + W⁻ u`` form needs two clamped copies and four), and a point box gives ``zmin = zmax`` exactly.

    >>> zmin, zmax = affine_bounds(torch.tensor([[1.0, -2.0]]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
    >>> zmin.tolist(), zmax.tolist()
    ([-2.0], [1.0])
    """
    mid = weight @ ((high + low) / 2)
    spread = weight.abs() @ ((high - low) / 2)
    zmin, zmax = mid - spread, mid + spread
    if bias is not None:
        zmin, zmax = zmin + bias, zmax + bias
    return zmin, zmax


def interval_bounds(target, domain: Box) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Boxes ``[l_i, u_i] ⊇ h_i(D)`` of the *input* of every target layer ``i = 0..L-1`` (``h_0 = x``),
    followed by the box of the output ``g(D)``; ``L + 1`` entries in all, in the target's dtype.
    """
    dtype, device = target.weights[0].dtype, target.weights[0].device
    lo = domain.low.to(dtype=dtype, device=device)
    hi = domain.high.to(dtype=dtype, device=device)
    boxes = [(lo, hi)]
    for i, (w, b) in enumerate(zip(target.weights, target.biases)):
        lo, hi = affine_bounds(w, lo, hi, b)
        if i < len(target.weights) - 1:
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        boxes.append((lo, hi))
    return boxes
