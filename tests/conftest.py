"""Shared fixtures and hypothesis settings.

Hypothesis runs without deadlines (solves vary with machine load) and with a modest number of examples so the
whole suite stays within a few minutes on 2 cores; CI=true uses the same profile (derandomized for repeatability).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores (and the same to its subprocesses).

    Every worker's torch/OpenMP and BLAS pools otherwise size themselves to the whole machine; with two workers on
    two cores their spinning thread teams wait on each other's descheduled threads, and small tensor ops become up
    to ~100× slower (measured: the conv_deep tamper test 2.7 s alone, 215 s beside another worker).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(share))  # inherited by subprocesses (notebook kernel, wheel check, dask)
    torch.set_num_threads(share)
    from threadpoolctl import threadpool_limits

    threadpool_limits(share)  # numpy/scipy's BLAS in this process


_share_the_cores_between_workers()


def random_mlp(dims: list[int], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Sequential:
    """A random ReLU MLP with the given widths, independent of onlynorm's own code."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n, m) in enumerate(zip(dims, dims[1:])):
        lin = torch.nn.Linear(n, m, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(m, n, generator=gen, dtype=dtype) / n**0.5)
            lin.bias.copy_(torch.randn(m, generator=gen, dtype=dtype) * 0.5)
        layers.append(lin)
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


@pytest.fixture
def mlp_factory():
    return random_mlp
