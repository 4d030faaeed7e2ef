"""``NormNet``: a frozen random network whose only tunable parameters are BatchNorm's ``γ`` and ``β``.

A NormNet is an ordinary ``torch.nn.Module`` made of *stages*. The basic stage, :class:`NormLinear`, is
``Linear(no bias, frozen) → BatchNorm1d → ReLU`` (ReLU optional). BatchNorm runs in inference form with running
mean 0, running variance 1 and ``eps = 0``, so it computes exactly ``BN(z) = γ ⊙ z + β``.

**Calling ``.train()``.** Exactness needs fixed statistics: in training mode BatchNorm would normalise by batch
statistics and the network would stop computing the target. ``NormNet.train()`` therefore switches the module
flag but keeps every BatchNorm in inference mode, so gradient training of ``γ, β`` (``train_norm_only``) stays in
the closed form's setting. Set ``net.batch_statistics = True`` first to opt into batch statistics deliberately
(a BatchNorm at ``eps = 0`` then uses ``eps = 1e-5``, as batch statistics need; ``eval()`` gives it back its
``eps = 0``). ``train``/``eval`` never change any other ``eps``: a network's function in inference form does not
depend on the mode it was last in.

Stages are registered by ``kind`` so a saved network is rebuilt from a JSON architecture description plus a
safetensors state dict — never from pickled code.

>>> from onlynorm.nets import NormLinear
>>> net = NormNet([NormLinear(3, 6), NormLinear(6, 2, relu=False)], meta={"method": "width"})
>>> [p.shape for p in net.norm_parameters()]
[torch.Size([6]), torch.Size([6]), torch.Size([2]), torch.Size([2])]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _io
from ..errors import FileFormatError, InvalidNetworkError
from ..finite import all_finite
from .clone import copy_sharing
from .modules import RAISED_EPS, ModuleSeq
from .onnx import export_onnx
from .records import NetMeta
from .stage import STAGES, Stage, check_sizes, dtype_name
from .summary import NetSummary

FORMAT = "onlynorm.normnet"
NORMSET_FORMAT = "onlynorm.normset"
#: eps used only while training with batch statistics (opt-in); inference always uses eps = 0
BATCH_STATISTICS_EPS = 1e-5
FORMAT_VERSION = 1

#: checks a loaded network's metadata must pass, registered by the layers that wrote it (the constructions check
#: their recorded options), so a tampered field is refused on load without this module importing them
META_CHECKS: list[Callable[[NetMeta, str], None]] = []


def document_header(doc: dict, source: str) -> tuple[torch.dtype, NetMeta]:
    """The format version, dtype and typed metadata every network file carries (a tampered field is named)."""
    if doc.get("version") != FORMAT_VERSION:
        raise FileFormatError(f"{source}: expected format version {FORMAT_VERSION}, found {doc.get('version')!r}")
    dtype = _DTYPES.get(str(doc.get("dtype")))
    if dtype is None:
        raise FileFormatError(f"{source}: unsupported dtype {doc.get('dtype')!r}; expected one of {sorted(_DTYPES)}")
    return dtype, NetMeta.from_dict(doc.get("meta"), source)


def register_meta_check(check: Callable[[NetMeta, str], None]) -> Callable[[NetMeta, str], None]:
    """Run ``check(meta, source)`` on every network loaded from now on (it raises :class:`FileFormatError`)."""
    META_CHECKS.append(check)
    return check


#: what a norm set carries of its network's metadata (how its γ, β were solved, and for which target)
_NORMSET_META = ("target_dims", "target_parameters", "solve", "method", "options")

#: other network file formats by their "format" name → the NormNet subclass that reads them (filled on import)
DOCUMENT_FORMATS: dict[str, Any] = {}

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NormNet(nn.Module):
    """A frozen network of :class:`Stage` s whose tunable parameters are exactly its BatchNorm ``γ, β``.

    ``meta`` (a :class:`~onlynorm.nets.records.NetMeta`) records how it was made (``method``, ``seed``, ``options``,
    ``target_dims``, the solve's records and box); it is saved as JSON next to the weights.
    """

    def __init__(self, layers: Sequence[Stage], meta: NetMeta | dict[str, Any] | None = None):
        super().__init__()
        self.layers: ModuleSeq[Stage] = ModuleSeq(layers)
        self.meta: NetMeta = NetMeta.from_dict(meta, "meta").replace()
        self.batch_statistics = False
        self.eval()

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.in_features
        if expected is not None and x.shape[-1] != expected:
            raise InvalidNetworkError(
                f"expected inputs with {expected} features (last dimension), found shape {tuple(x.shape)}"
            )
        dtype = self.dtype
        if x.dtype != dtype:
            raise InvalidNetworkError(
                f"expected {dtype_name(dtype)} inputs (the network's dtype), found {dtype_name(x.dtype)}; convert with "
                f"x.to({str(dtype)}) or build the network with dtype={str(x.dtype)}"
            )
        for stage in self.layers:
            x = stage(x)
        return x

    def train(self, mode: bool = True) -> NormNet:
        """Set the training flag; BatchNorm keeps fixed statistics unless ``batch_statistics`` is True."""
        super().train(mode)
        use_batch = mode and self.batch_statistics
        for m in self.norm_modules():
            m.train(use_batch)
            # Batch statistics need eps > 0 (a constant unit has zero variance): a BatchNorm at eps = 0 gets
            # BATCH_STATISTICS_EPS while it normalises by batch statistics and its 0 back afterwards. Any other eps
            # is the user's and is never touched, so eval() changes no function (and a certificate reads it).
            raised = bool(getattr(m, RAISED_EPS, False))
            if use_batch and not raised and m.eps == 0.0:
                m.eps = BATCH_STATISTICS_EPS
                setattr(m, RAISED_EPS, True)
            elif not use_batch and raised:
                m.eps = 0.0
                setattr(m, RAISED_EPS, False)
        return self

    # ------------------------------------------------------------------ parameter access
    def norm_modules(self) -> list[_BatchNorm]:
        return [m for m in self.modules() if isinstance(m, _BatchNorm)]

    def norm_parameters(self) -> list[nn.Parameter]:
        """Exactly the ``γ`` and ``β`` tensors, in layer order (``[γ₁, β₁, γ₂, β₂, ...]``)."""
        out: list[nn.Parameter] = []
        for m in self.norm_modules():
            out += [m.weight, m.bias]
        return out

    def frozen_parameters(self) -> list[nn.Parameter]:
        ids = {id(p) for p in self.norm_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    # ------------------------------------------------------------------ facts
    @property
    def method(self) -> str:
        return self.meta.method or "custom"

    @property
    def target_dims(self) -> list[int] | None:
        dims = self.meta.target_dims
        return list(dims) if dims is not None else None

    @property
    def in_features(self) -> int | None:
        """Input width of an MLP NormNet (``None`` for image inputs, whose shape is :attr:`in_shape`)."""
        if self.meta.in_shape or self.target_dims is None:
            return None
        return self.target_dims[0]

    @property
    def in_shape(self) -> tuple[int, int, int] | None:
        """``(c, H, W)`` of an image-input (CNN) network, ``None`` for an MLP."""
        shape = self.meta.in_shape
        return (int(shape[0]), int(shape[1]), int(shape[2])) if shape else None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's tensors (float64 for a network of parameter-free stages only)."""
        first = next(iter(self.parameters()), None)
        return first.dtype if first is not None else torch.float64

    @property
    def device(self) -> torch.device:
        first = next(iter(self.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def is_solved(self) -> bool:
        return self.meta.solve is not None

    def summary(self) -> NetSummary:
        frozen = self.frozen_parameters()
        tunable = sum(p.numel() for p in self.norm_parameters())
        solve = self.meta.solve
        return NetSummary(
            method=self.method,
            target_dims=self.target_dims or [],
            depth=self.depth(),
            widths=[w for s in self.layers for w in s.widths()],
            frozen_parameters=sum(p.numel() for p in frozen),
            frozen_nonzeros=sum(int(torch.count_nonzero(p)) for p in frozen),
            tunable_parameters=tunable,
            target_parameters=self.meta.target_parameters or 0,
            solved=solve is not None,
            exact=solve.exact if solve is not None else None,
            max_relative_residual=solve.max_relative_residual if solve is not None else None,
            notes=list(solve.notes) if solve is not None else [],
            in_shape=self.meta.in_shape,
        )

    def depth(self) -> int:
        """Number of normalization layers a signal passes through on its longest path."""
        return sum(s.depth() for s in self.layers)

    # ------------------------------------------------------------------ files
    def architecture(self) -> list[dict[str, Any]]:
        return [{"kind": s.kind, **s.config()} for s in self.layers]

    def save(self, path: str | os.PathLike) -> None:
        """Write weights (safetensors) and the JSON architecture + metadata, atomically."""
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype_name(self.dtype),
            "architecture": self.architecture(),
            "meta": self.meta.to_dict(),
        }
        _io.write_tensors(path, self.state_dict(), metadata=doc)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None) -> NormNet:
        """Rebuild a NormNet saved by :meth:`save` (nothing is unpickled; the architecture is JSON)."""
        tensors, doc = _io.read_tensors(path)
        if doc and doc.get("format") in DOCUMENT_FORMATS:
            return DOCUMENT_FORMATS[doc["format"]].from_document(doc, tensors, source=str(path), device=device)
        if not doc or doc.get("format") != FORMAT:
            raise FileFormatError(
                f"{str(path)!r} is not an onlynorm network file (no '{FORMAT}' metadata); expected a file written "
                "by NormNet.save or `onlynorm reconstruct --out`"
            )
        return cls.from_document(doc, tensors, source=str(path), device=device)

    @classmethod
    def from_document(
        cls, doc: dict, tensors: dict[str, torch.Tensor], *, source: str = "network", device=None
    ) -> NormNet:
        dtype, meta = document_header(doc, source)
        for check in META_CHECKS:  # the layers above check what they recorded (the constructions: options)
            check(meta, source)
        architecture = doc.get("architecture")
        if not isinstance(architecture, list) or not all(isinstance(c, dict) for c in architecture):
            raise FileFormatError(
                f"{source}: expected 'architecture' to be a list of stage objects, found "
                f"{type(architecture).__name__}; re-create the file"
            )
        held = max(sum(t.numel() for t in tensors.values()), 1)
        try:
            # Stages are built on the meta device first: a description claiming absurd sizes costs nothing until
            # its shapes are compared with the tensors the file really holds.
            stages = []
            for cfg in architecture:
                cfg = dict(cfg)
                kind = cfg.pop("kind", None)
                if not isinstance(kind, str) or kind not in STAGES:
                    raise FileFormatError(f"{source}: unknown stage kind {kind!r}; known kinds: {sorted(STAGES)}")
                check_sizes(cfg, kind, held)
                stages.append(STAGES[kind].from_config(cfg, dtype=dtype, device="meta"))
            net = cls(stages, meta=meta)
        except FileFormatError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, ArithmeticError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FileFormatError(
                f"{source}: malformed architecture description ({first}); re-create the file"
            ) from None
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            detail = (
                f"missing {missing[:3]}"
                if missing
                else f"unexpected {extra[:3]}"
                if extra
                else f"{wrong[0]} has shape {found[wrong[0]]}, expected {expected[wrong[0]]}"
            )
            raise FileFormatError(
                f"{source}: weights do not match the described architecture ({detail}); re-create the file"
            )
        _check_chains(net, dtype, source)
        for k, v in tensors.items():
            if k.endswith("num_batches_tracked"):
                continue
            if not v.is_floating_point():
                raise FileFormatError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected a floating dtype")
            if v.dtype != dtype:  # loading would convert it silently (float8, float16 values in a float64 network)
                raise FileFormatError(
                    f"{source}: tensor {k!r} has dtype {dtype_name(v.dtype)}, expected {dtype_name(dtype)} (the dtype "
                    "the file declares); the file is corrupt — re-create it"
                )
            if not all_finite(v):
                raise FileFormatError(f"{source}: tensor {k!r} holds NaN/Inf values; the file is corrupt")
        net.to_empty(device=device if device is not None else "cpu")
        net.load_state_dict({k: v.to(device=device) for k, v in tensors.items()}, strict=True)
        net.train(False)
        return net

    # ------------------------------------------------------------------ norm sets
    def fingerprint(self) -> str:
        """SHA-256 of the architecture and every frozen tensor: identifies the frozen network a norm set fits."""

        h = hashlib.sha256(json.dumps(self.architecture(), sort_keys=True).encode())
        skip = set(self.norm_state())
        for name, t in self.state_dict().items():
            if name in skip or name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
        return h.hexdigest()

    def norm_state(self) -> dict[str, torch.Tensor]:
        """Only the γ and β tensors, under their state_dict names (a *norm set*)."""
        ids = {id(p) for p in self.norm_parameters()}
        return {k: p for k, p in self.named_parameters() if id(p) in ids}

    def save_norms(self, path: str | os.PathLike) -> None:
        """Write this network's γ, β (and how they were solved) as a small safetensors norm set, atomically.

        A norm set is the whole task-specific part of a reconstruction: swap it into the same frozen network with
        :meth:`load_norms` to switch tasks.
        """
        doc = {
            "format": NORMSET_FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            "dtype": dtype_name(self.dtype),
            "meta": {k: v for k, v in self.meta.to_dict().items() if k in _NORMSET_META},
        }
        _io.write_tensors(path, self.norm_state(), metadata=doc)

    def load_norms(self, path: str | os.PathLike) -> NormNet:
        """Load a norm set saved by :meth:`save_norms` into this network in place (only γ, β change)."""
        tensors, doc = _io.read_tensors(path)
        if not doc or doc.get("format") != NORMSET_FORMAT:
            raise FileFormatError(
                f"{str(path)!r} is not an onlynorm norm set; expected a file written by NormNet.save_norms"
            )
        mine = self.norm_state()
        missing, extra = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        if missing or extra:
            raise InvalidNetworkError(
                f"norm set {str(path)!r} does not fit this network: expected γ/β tensors {sorted(mine)[:4]}..., "
                f"missing {missing[:3]}, unexpected {extra[:3]}; it was saved from a different architecture"
            )
        for name, p in mine.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise InvalidNetworkError(
                    f"norm set {str(path)!r} does not fit this network: {name} has shape "
                    f"{tuple(tensors[name].shape)}, expected {tuple(p.shape)}"
                )
        fingerprint = self.fingerprint()
        if doc.get("fingerprint") != fingerprint:
            raise InvalidNetworkError(
                f"norm set {str(path)!r} was solved for a different frozen network (fingerprint "
                f"{str(doc.get('fingerprint'))[:12]}…, this one is {fingerprint[:12]}…); γ, β only make sense "
                "with the frozen weights they were solved for — load the matching network or re-solve"
            )
        # check everything before changing anything: a bad file leaves the network as it was
        for name in mine:
            if not tensors[name].is_floating_point():
                raise FileFormatError(
                    f"norm set {str(path)!r}: {name} has dtype {tensors[name].dtype}, expected "
                    f"{dtype_name(self.dtype)}; the file is corrupt — re-save it"
                )
            if tensors[name].dtype != self.dtype:  # copying would round (float64 → float16) or widen silently
                raise InvalidNetworkError(
                    f"norm set {str(path)!r}: {name} has dtype {dtype_name(tensors[name].dtype)}, expected "
                    f"{dtype_name(self.dtype)} (this network's dtype); load a norm set saved from a "
                    f"{dtype_name(self.dtype)} network, or convert the network first"
                )
            if not all_finite(tensors[name]):
                raise FileFormatError(f"norm set {str(path)!r}: {name} holds NaN/Inf values")
        stored = doc.get("meta") or {}
        if not isinstance(stored, dict):
            raise FileFormatError(
                f"norm set {str(path)!r}: metadata 'meta' must be an object, found {type(stored).__name__}"
            )
        merged = NetMeta.from_dict(
            {**self.meta.to_dict(), **{k: v for k, v in stored.items() if k in _NORMSET_META}},
            f"norm set {str(path)!r}",
        )
        with torch.no_grad():
            for name, p in mine.items():
                p.copy_(tensors[name].to(dtype=p.dtype, device=p.device))
        self.meta = merged
        return self

    def to_onnx(self, path: str | os.PathLike, *, lower_conv: bool | None = None) -> dict[str, Any]:
        """Write this network as an ONNX file (needs ``pip install 'onlynorm[onnx]'``); see
        :func:`onlynorm.nets.onnx.export_onnx` for the operators written and the returned facts."""
        return export_onnx(self, path, lower_conv=lower_conv)

    def clone(self, *, deep: bool = False) -> NormNet:
        """A copy with its own γ, β, BatchNorm buffers, modes and metadata whose **frozen tensors are shared** with
        this network (the same storage, no copy: cloning a 20 GB frozen network costs nothing). Changing a frozen
        tensor in place (``weight.copy_``) therefore changes both networks; moving or converting one
        (``.to(torch.float32)``) does not touch the other. ``deep=True`` copies everything (independent networks).

        >>> from onlynorm.nets import NormLinear
        >>> net = NormNet([NormLinear(2, 3)])
        >>> twin = net.clone()
        >>> twin.layers[0].linear.weight.data_ptr() == net.layers[0].linear.weight.data_ptr()
        True
        >>> twin.layers[0].norm.weight.data_ptr() == net.layers[0].norm.weight.data_ptr()
        False
        """
        if deep:
            return copy.deepcopy(self)
        # a deep copy with every frozen parameter pre-mapped to a new Parameter over the same storage
        memo: dict[int, Any] = {
            id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in self.frozen_parameters()
        }
        return copy_sharing(self, memo)


def _check_chains(net: NormNet, dtype: torch.dtype, source: str) -> None:
    """Run the described stages on an input of the recorded shape on the meta device (shapes only, no values): a
    tampered geometry (a stride, padding or dilation edited in the architecture) whose stages no longer chain is
    refused here, in one line, instead of failing somewhere inside a later forward pass."""
    shape = net.in_shape or ((net.in_features,) if net.in_features is not None else None)
    if shape is None:
        return
    try:
        with torch.no_grad():
            net(torch.empty((1, *shape), dtype=dtype, device="meta"))
    except (RuntimeError, ValueError, IndexError, InvalidNetworkError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(
            f"{source}: the described stages do not chain for inputs of shape {tuple(shape)} ({first[:160]}); the "
            "architecture was edited or the file is corrupt — re-create it"
        ) from None
