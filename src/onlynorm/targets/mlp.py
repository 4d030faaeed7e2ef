"""The target network: a ReLU MLP given by its weights and biases.

``g`` has ``L`` affine layers: ``h_0 = x``, ``h_i = relu(W_i h_{i-1} + b_i)`` for ``i < L`` and
``g(x) = W_L h_{L-1} + b_L`` with ``W_i`` of shape ``(m_i, n_i)`` and ``n_i = m_{i-1}``.

>>> import torch
>>> from torch import nn
>>> spec = MLPSpec.from_module(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)))
>>> spec.dims, spec.depth, spec.num_parameters
([3, 5, 2], 2, 32)
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import _io
from ..errors import InvalidTargetError
from .layers import check_target_tensor

__all__ = ["MLPSpec"]

# Layers that are the identity at inference and may sit anywhere in a target Sequential.
_INFERENCE_IDENTITY = (nn.Identity, nn.Dropout)


@dataclass(frozen=True, eq=False)
class MLPSpec:
    """Weights and biases of a ReLU MLP (validated: finite, 2-D/1-D, chaining shapes).

    Tensors are stored detached as given (dtype and device preserved); use :meth:`to` to convert.
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        weights = tuple(torch.as_tensor(w).detach() for w in self.weights)
        if len(weights) == 0:
            raise InvalidTargetError("expected a target with at least one Linear layer, found none")
        for i, w in enumerate(weights):  # shapes first: a 0-d "weight" has no rows to size a bias by
            if w.ndim != 2:
                raise InvalidTargetError(f"layer {i}: expected a 2-D weight (out, in), found shape {tuple(w.shape)}")
        biases = tuple(
            torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else torch.as_tensor(b).detach()
            for w, b in zip(weights, _pad(self.biases, len(weights)))
        )
        if len(self.biases) not in (0, len(weights)):
            raise InvalidTargetError(f"expected one bias per weight ({len(weights)}), found {len(self.biases)} biases")
        for i, (w, b) in enumerate(zip(weights, biases)):
            if w.ndim != 2:
                raise InvalidTargetError(f"layer {i}: expected a 2-D weight (out, in), found shape {tuple(w.shape)}")
            if w.shape[0] == 0 or w.shape[1] == 0:
                raise InvalidTargetError(f"layer {i}: weight has an empty dimension, shape {tuple(w.shape)}")
            if b.shape != (w.shape[0],):
                raise InvalidTargetError(
                    f"layer {i}: expected bias of shape ({w.shape[0]},) to match weight {tuple(w.shape)}, "
                    f"found {tuple(b.shape)}"
                )
            if i > 0 and w.shape[1] != weights[i - 1].shape[0]:
                raise InvalidTargetError(
                    f"layer {i}: shapes do not chain: layer {i - 1} outputs {weights[i - 1].shape[0]} features "
                    f"but layer {i} expects {w.shape[1]} inputs (weight shape {tuple(w.shape)})"
                )
            for name, t in (("weight", w), ("bias", b)):
                check_target_tensor(t, f"layer {i}: {name}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "biases", biases)

    # ------------------------------------------------------------------ shape facts
    @property
    def depth(self) -> int:
        """Number of affine layers ``L``."""
        return len(self.weights)

    @property
    def dims(self) -> list[int]:
        """``[n_1, m_1, m_2, ..., m_L]``: input width followed by every layer's output width."""
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    @property
    def in_features(self) -> int:
        return self.weights[0].shape[1]

    @property
    def out_features(self) -> int:
        return self.weights[-1].shape[0]

    @property
    def num_parameters(self) -> int:
        """Weights plus biases of the target."""
        return sum(w.numel() + b.numel() for w, b in zip(self.weights, self.biases))

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MLPSpec:
        return MLPSpec(
            tuple(w.to(device=device, dtype=dtype) for w in self.weights),
            tuple(b.to(device=device, dtype=dtype) for b in self.biases),
        )

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate ``g(x)`` for a batch ``x`` of shape ``(..., n_1)``."""
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.nn.functional.linear(h, w, b)
            if i < self.depth - 1:
                h = torch.relu(h)
        return h

    __call__ = forward

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_module(cls, module: nn.Module) -> MLPSpec:
        """Read an ``nn.Sequential`` of ``nn.Linear`` layers separated by single ``nn.ReLU`` layers.

        ``nn.Identity`` and ``nn.Dropout`` (identities at inference) are skipped. The last layer must be Linear.
        """
        if isinstance(module, nn.Linear):
            module = nn.Sequential(module)
        if not isinstance(module, nn.Sequential):
            raise InvalidTargetError(
                f"expected an nn.Sequential of Linear/ReLU layers (or an MLPSpec), found {type(module).__name__}"
            )
        layers = [m for m in module if not isinstance(m, _INFERENCE_IDENTITY)]
        weights, biases, expect_linear = [], [], True
        for pos, layer in enumerate(layers):
            kind = type(layer).__name__
            if isinstance(layer, nn.Linear):
                if not expect_linear:
                    raise InvalidTargetError(
                        f"layer {pos} ({kind}): expected ReLU between Linear layers, found two Linear layers in a "
                        "row; merge them into one Linear or insert nn.ReLU()"
                    )
                weights.append(layer.weight)
                biases.append(layer.bias)
                expect_linear = False
            elif isinstance(layer, nn.ReLU):
                if expect_linear:
                    raise InvalidTargetError(
                        f"layer {pos} (ReLU): expected a Linear layer here (a ReLU must follow a Linear), found "
                        "ReLU first or two ReLUs in a row"
                    )
                expect_linear = True
            else:
                raise InvalidTargetError(
                    f"layer {pos} ({kind}) is not supported in an MLP target; expected only nn.Linear and nn.ReLU "
                    "(nn.Identity/nn.Dropout are ignored)"
                )
        if expect_linear:
            raise InvalidTargetError(
                "expected the target to end with a Linear layer, found a trailing ReLU (or no layers); "
                "drop the final ReLU (onlynorm targets have a linear output)"
            )
        return cls(tuple(weights), tuple(biases))

    def to_module(self) -> nn.Sequential:
        """An ``nn.Sequential`` computing the same function (keys ``0.weight``, ``0.bias``, ``2.weight``, ...)."""
        mods: list[nn.Module] = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            mods.append(lin)
            if i < self.depth - 1:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as ``to_module().state_dict()`` would give them."""
        out = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"{2 * i}.weight"] = w
            out[f"{2 * i}.bias"] = b
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = "state_dict") -> MLPSpec:
        """Parse ``{"0.weight", "0.bias", "2.weight", ...}`` (any common prefix such as ``"model."``).

        Layers are ordered by their integer index; gaps (the ReLUs) are expected. Biases are optional.
        """
        if not state:
            raise InvalidTargetError(f"{source}: expected Linear weights like '0.weight', found no tensors")
        pattern = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<index>\d+)\.(?P<kind>weight|bias)$")
        layers: dict[int, dict[str, torch.Tensor]] = {}
        prefixes = set()
        for key, tensor in state.items():
            match = pattern.match(key)
            if match is None:
                raise InvalidTargetError(
                    f"{source}: key {key!r} is not an MLP parameter; expected keys like '0.weight', '0.bias', "
                    "'2.weight' (the state_dict of an nn.Sequential of Linear and ReLU layers)"
                )
            prefixes.add(match["prefix"])
            layers.setdefault(int(match["index"]), {})[match["kind"]] = tensor
        if len(prefixes) > 1:
            raise InvalidTargetError(
                f"{source}: expected one Sequential, found several key prefixes {sorted(prefixes)}"
            )
        weights: list[torch.Tensor] = []
        biases: list[torch.Tensor | None] = []
        for index in sorted(layers):
            entry = layers[index]
            if "weight" not in entry:
                raise InvalidTargetError(f"{source}: layer '{index}' has a bias but no weight")
            weights.append(entry["weight"])
            biases.append(entry.get("bias"))
        return cls(tuple(weights), tuple(biases))  # type: ignore[arg-type]  # None: no bias (zeros)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state_dict as safetensors, atomically."""
        _io.write_tensors(path, self.state_dict(), metadata={"kind": "mlp-target", "dims": self.dims})

    @classmethod
    def load(cls, path: str | os.PathLike) -> MLPSpec:
        """Read a target from safetensors or a ``.pt`` state_dict (``weights_only=True``: nothing is unpickled)."""
        tensors, _meta = _io.read_tensors(path)
        return cls.from_state_dict(tensors, source=str(path))

    def __repr__(self) -> str:
        return f"MLPSpec(dims={self.dims}, dtype={self.dtype})"


def _pad(seq: Sequence, n: int) -> list:
    seq = list(seq)
    return seq + [None] * (n - len(seq)) if len(seq) <= n else seq[:n]
