"""Convolutional (and residual) targets: :class:`ConvNetSpec`, BatchNorm folding, interval bounds, safe files.

A CNN target is a ``nn.Sequential`` of ``Conv2d`` (any kernel, stride, padding, dilation; ``groups=1``; zero
padding), ``ReLU``, ``MaxPool2d``/``AvgPool2d``, ``Flatten``, ``Linear`` and :class:`~onlynorm.Residual` blocks.
Eval-mode ``BatchNorm1d/2d`` after a ``Conv2d``/``Linear`` is folded into it::

    W' = W · γ / √(var + eps),    b' = (b − mean) · γ / √(var + eps) + β

A state dict alone does not say the architecture of a CNN, so files store it as JSON in the safetensors metadata
(``{"kind": "cnn-target", "in_shape": [...], "layers": [...]}``) — never pickled modules.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
...                       nn.Linear(2 * 4 * 4, 3)).double().eval()
>>> spec = ConvNetSpec.from_module(model, in_shape=(1, 4, 4))
>>> [layer.type for layer in spec.layers]
['conv', 'relu', 'flatten', 'linear']

Any other ``nn.Module`` (a torchvision-style ResNet, say) is converted by ``torch.fx`` tracing: see
:mod:`onlynorm.targets.fx`. The layers themselves are the typed records of :mod:`onlynorm.targets.layers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _io
from ..domain import Box
from ..errors import FileFormatError, InvalidTargetError
from .fx import layers_from_fx
from .layers import Conv, Layer, Linear, check_target_tensor, layer_from_json, run_layers, walk
from .parse import SUPPORTED, needs_tracing, parse_sequential

__all__ = ["ConvNetSpec", "box_tensors"]


@dataclass(frozen=True, eq=False)
class ConvNetSpec:
    """An immutable CNN target: typed ``layers`` (:mod:`onlynorm.targets.layers`) and ``in_shape = (c, H, W)``."""

    layers: tuple[Layer, ...]
    in_shape: tuple[int, int, int]
    out_features: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(v) for v in self.in_shape)
        except (TypeError, ValueError):
            raise InvalidTargetError(f"in_shape: expected (channels, height, width), found {self.in_shape!r}") from None
        if len(shape) != 3 or min(shape) < 1:
            raise InvalidTargetError(f"in_shape: expected (channels, height, width), found {self.in_shape}")
        object.__setattr__(self, "in_shape", shape)
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "out_features", self._validate())

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_module(cls, module: nn.Module, in_shape: tuple[int, int, int] | None = None) -> ConvNetSpec:
        """From an ``nn.Sequential`` of supported layers, or any ``torch.fx``-traceable model (ResNets…)."""
        if in_shape is None:
            raise InvalidTargetError("a CNN target needs in_shape=(c, H, W): the image size is not in the weights")
        if needs_tracing(module):
            return cls(layers_from_fx(module, in_shape), in_shape)
        if not isinstance(module, nn.Sequential):  # an nn.Linear: not traced, and not a CNN
            raise InvalidTargetError(
                f"{type(module).__name__} is not a CNN target; expected an nn.Sequential of {SUPPORTED}, "
                "or a model torch.fx can trace"
            )
        return cls(parse_sequential(module), in_shape)

    def _validate(self) -> int:
        dtype = None
        for layer in walk(self.layers):
            for key in ("weight", "bias"):
                t = getattr(layer, key, None)
                if t is not None:
                    check_target_tensor(t, f"{layer.type} layer: {key}")
                    dtype = dtype or t.dtype
        try:
            with torch.no_grad():
                out = self.forward(torch.zeros(1, *self.in_shape, dtype=dtype or torch.float64))
        except (RuntimeError, ValueError) as exc:
            raise InvalidTargetError(
                f"the CNN layers do not chain for input shape {self.in_shape}: {str(exc).splitlines()[0]}"
            ) from None
        if out.ndim != 2:
            raise InvalidTargetError(
                f"expected the CNN to end with flat outputs (Flatten/Linear), found shape {tuple(out.shape[1:])}"
            )
        return int(out.shape[1])

    # ------------------------------------------------------------------ facts
    @property
    def in_features(self) -> int:
        return self.in_shape[0] * self.in_shape[1] * self.in_shape[2]

    def weighted(self) -> list[Conv | Linear]:
        """The Conv and Linear layers, depth first."""
        return [layer for layer in walk(self.layers) if isinstance(layer, (Conv, Linear))]

    @property
    def dims(self) -> list[int]:
        """``[c, H, W, out channels of every parameterised layer...]``: a signature for mismatch checks."""
        return list(self.in_shape) + [layer.weight.shape[0] for layer in self.weighted()]

    @property
    def num_parameters(self) -> int:
        return sum(layer.weight.numel() + layer.bias.numel() for layer in self.weighted())

    @property
    def dtype(self) -> torch.dtype:
        return self.weighted()[0].weight.dtype

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ConvNetSpec:
        return ConvNetSpec(
            tuple(layer.map_tensors(lambda t: t.to(dtype=dtype, device=device)) for layer in self.layers), self.in_shape
        )

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], *self.in_shape)
        return run_layers(self.layers, x)

    __call__ = forward

    # ------------------------------------------------------------------ files
    def describe(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The JSON document of docs/FILE_FORMATS.md; fills ``tensors`` with the named weights."""
        return {
            "kind": "cnn-target",
            "in_shape": list(self.in_shape),
            "layers": [layer.describe(f"{i}.", tensors) for i, layer in enumerate(self.layers)],
        }

    def save(self, path: str | os.PathLike) -> None:
        tensors: dict[str, torch.Tensor] = {}
        doc = self.describe(tensors)
        _io.write_tensors(path, tensors, metadata=doc)

    @classmethod
    def from_document(cls, doc: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> ConvNetSpec:
        try:
            layers = tuple(layer_from_json(d, tensors) for d in doc["layers"])
            return cls(layers, tuple(doc["in_shape"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FileFormatError(
                f"{source}: malformed CNN architecture description ({exc}); expected the "
                "metadata written by ConvNetSpec.save"
            ) from None

    def __repr__(self) -> str:
        return f"ConvNetSpec(in_shape={self.in_shape}, layers={[layer.type for layer in self.layers]})"


def box_tensors(spec: ConvNetSpec, box: Box, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The input box as ``(1, c, H, W)`` lower and upper bound images."""
    return (box.low.to(dtype).reshape(1, *spec.in_shape), box.high.to(dtype).reshape(1, *spec.in_shape))
