"""File handling behind ``onlynorm fit``: read the data option and run the fit.

``--data`` is a safetensors file holding exactly one tensor of inputs (nothing is unpickled); otherwise the box
``[--low, --high]`` is sampled.
"""

from __future__ import annotations

from pathlib import Path

from .. import _io
from ..domain import Box
from ..errors import FileFormatError, InvalidOptionError
from ..fit import fit_norms
from ..nets.normnet import NormNet
from .common import load_target

__all__ = ["load_fit_data", "run_fit"]


def load_fit_data(data: Path | None, low: float | None, high: float | None):
    """A tensor read from ``data`` or the box ``[low, high]`` (default ``[-1, 1]``)."""
    if data is not None:
        if low is not None or high is not None:
            raise InvalidOptionError(
                "expected either --data or --low/--high, found both; the data file defines the inputs"
            )
        if Path(data).suffix.lower() != ".safetensors":
            raise FileFormatError(
                f"--data: expected a .safetensors file holding one tensor of inputs, found "
                f"{str(data)!r}; save it with safetensors.torch.save_file({{'x': x}}, path)"
            )
        tensors, _meta = _io.read_tensors(data)
        if len(tensors) != 1:
            raise FileFormatError(
                f"--data: expected exactly one tensor in {str(data)!r}, found {len(tensors)} "
                f"({sorted(tensors)[:4]}); save only the inputs"
            )
        return next(iter(tensors.values()))
    return Box(-1.0 if low is None else low, 1.0 if high is None else high)


def run_fit(
    frozen: Path,
    target: Path,
    data,
    *,
    method: str,
    budget: float | None,
    seed: int,
    progress_factory,
    activation: str | None = None,
):
    """Load FROZEN and TARGET and run :func:`onlynorm.fit_norms` under the command's progress bar."""
    net = NormNet.load(frozen)
    spec = load_target(target, activation)
    with progress_factory(f"fitting ({method})") as progress:
        return fit_norms(net, spec, data, method=method, budget_seconds=budget, seed=seed, progress=progress)
