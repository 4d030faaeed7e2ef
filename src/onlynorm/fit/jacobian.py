"""Jacobians of a network's outputs with respect to (a block of) its γ, β, by ``torch.func``, within a byte budget.

Two modes, same result:

* ``"forward"`` — ``torch.func.jvp`` vmapped over the parameter basis: cost ∝ number of parameters ``P``;
* ``"reverse"`` — ``torch.func.jacrev`` vmapped over the samples (BatchNorm uses fixed statistics, so samples are
  independent): cost ∝ number of outputs ``m`` per sample.

``choose_mode`` takes forward mode when ``P ≤ 2 m`` (few norm parameters), reverse mode otherwise. The Jacobian
itself is ``rows·m × P`` numbers; the vmapped intermediates are bounded by evaluating in chunks.

>>> import torch
>>> from torch import nn
>>> from onlynorm import with_norms
>>> net = with_norms(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double())
>>> fn = NormFunction(net)
>>> x = torch.randn(5, 2, dtype=torch.float64)
>>> J_f = fn.jacobian(fn.vector(), x, mode="forward")
>>> J_r = fn.jacobian(fn.vector(), x, mode="reverse")
>>> J_f.shape, bool(torch.allclose(J_f, J_r))
(torch.Size([5, 8]), True)
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, jacrev, jvp, vmap

from ..nets.normnet import NormNet

__all__ = ["NormFunction", "choose_mode"]


def choose_mode(params: int, outputs: int) -> str:
    return "forward" if params <= 2 * outputs else "reverse"


class NormFunction:
    """``θ ↦ f(X; θ)`` for a flat vector ``θ`` of (a block of) the network's γ, β; other tensors fixed."""

    def __init__(self, net: NormNet, names: list[str] | None = None):
        self.net = net
        norm_ids = {id(p) for p in net.norm_parameters()}
        named = [(k, p) for k, p in net.named_parameters() if id(p) in norm_ids]
        self.all_names = [k for k, _ in named]
        self.names = list(names) if names is not None else list(self.all_names)
        lookup = dict(named)
        self.params = [lookup[k] for k in self.names]
        self.sizes = [p.numel() for p in self.params]
        self.size = sum(self.sizes)
        self.widest = max([p.shape[0] for p in net.parameters() if p.ndim >= 1] + [1])

    def vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def assign(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self.params, torch.split(theta, self.sizes)):
                p.copy_(chunk.reshape(p.shape).to(p))

    def _dict(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(theta, self.sizes)
        return {k: c.reshape(p.shape) for k, c, p in zip(self.names, chunks, self.params)}

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, self._dict(theta), (x,), strict=False)

    def floats_per_sample(self, x: torch.Tensor) -> int:
        """Floats one sample's forward pass keeps alive, per tangent (forward mode) or output (reverse mode): the
        vmapped intermediates of a chunk of ``k`` samples take about ``k · floats · item`` bytes per tangent/output.

        Measured as the sum of every stage's output size on one sample (a conv stage's output counts all of its
        ``C·H·W`` positions), doubled for the BatchNorm's and ReLU's temporaries; never below the MLP rule of thumb
        ``4 · widest · stages`` (which ignores positions: alone, it would undercount a CNN's ~10×)::

            floats = input + max(2 · Σ_stages numel(stage output), 4 · widest · stages)
        """
        h, outputs = x[:1], 0
        with torch.no_grad():
            for stage in self.net.layers:
                h = stage(h)
                outputs += h.numel()
        return x[0].numel() + max(2 * outputs, self.widest * max(1, 4 * len(self.net.layers)))

    def jacobian(
        self, theta: torch.Tensor, x: torch.Tensor, *, mode: str | None = None, scratch_bytes: int = 256 << 20
    ) -> torch.Tensor:
        """``∂ vec f(x; θ) / ∂θ``, shape ``(n·m, P)`` (row ``i·m + o`` is sample ``i``, output ``o``)."""
        theta = theta.to(self.params[0].dtype)
        n = x.shape[0]
        with torch.no_grad():
            m = self(theta, x[:1]).reshape(1, -1).shape[1]
        mode = mode or choose_mode(self.size, m)
        per_sample = self.floats_per_sample(x)
        item = theta.element_size()
        if mode == "forward":
            chunk = max(1, scratch_bytes // max(1, item * n * per_sample))
            basis = torch.eye(self.size, dtype=theta.dtype, device=theta.device)

            def column(t):
                return jvp(lambda th: self(th, x).reshape(-1), (theta,), (t,))[1]

            cols = vmap(column, chunk_size=min(chunk, self.size))(basis)  # (P, n·m)
            return cols.T.contiguous()
        chunk = max(1, scratch_bytes // max(1, item * m * per_sample))

        def single(th, xi):
            return self(th, xi.unsqueeze(0)).reshape(-1)

        J = vmap(jacrev(single), in_dims=(None, 0), chunk_size=min(chunk, n))(theta, x)  # (n, m, P)
        return J.reshape(n * m, self.size)


def jacobian_bytes(rows: int, outputs: int, params: int, item: int = 8) -> int:
    """Bytes of a ``rows·outputs × params`` Jacobian plus its ``params²`` normal matrix (float64)."""
    return rows * outputs * params * item + params * params * 8 + math.ceil(params * 8)
