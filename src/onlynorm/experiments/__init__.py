"""Reproducible experiments of the theory: ``onlynorm experiment NAME [--quick] [--out DIR] [--seed S]
[--backend local|dask [--scheduler ADDRESS]]``.

Each experiment module exposes ``run(quick: bool, seed: int, console) -> ExperimentResult``; the runner writes
``results.json``, PNG figures and ``summary.md``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import OnlyNormError
from .runner import ExperimentResult, use_backend, write_artifacts

__all__ = ["EXPERIMENTS", "run_experiment"]

#: CLI name → module
EXPERIMENTS = {
    "sparse-threshold": "sparse_threshold",
    "scaling": "scaling",
    "gd-vs-exact": "gd_vs_exact",
    "depth-tradeoff": "depth_tradeoff",
    "under-parameterized": "under_parameterized",
    "fine-tune-capacity": "fine_tune_capacity",
    "ln-tuning-capacity": "ln_tuning_capacity",
}


def run_experiment(
    name: str,
    *,
    quick: bool = False,
    out: Path | None = None,
    seed: int = 0,
    console=None,
    backend: str = "local",
    scheduler: str | None = None,
    reference: bool = False,
) -> ExperimentResult:
    """Run experiment ``name`` and write its artefacts into ``out`` (default ``runs/NAME``).

    ``backend="dask"`` runs the trials on the Dask cluster at ``scheduler`` (or a LocalCluster without one); see
    :func:`onlynorm.experiments.runner.use_backend`. The results are the same as with ``backend="local"``.
    ``reference=True`` (``under-parameterized`` only) adds the long multi-start best-known search.
    """
    if name not in EXPERIMENTS:
        raise OnlyNormError(f"unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}")
    if reference and name != "under-parameterized":
        raise OnlyNormError(f"--reference: only the under-parameterized experiment has one, found {name!r}")
    module = importlib.import_module(f".{EXPERIMENTS[name]}", __package__)
    extra = {"reference": True} if reference else {}
    with use_backend(backend, scheduler):
        result: ExperimentResult = module.run(quick=quick, seed=seed, console=console, **extra)
    target = Path(out) if out is not None else Path("runs") / name
    paths = write_artifacts(result, target)
    if console is not None:
        console.print(result.summary)
        console.print("written: " + ", ".join(str(p) for p in paths))
    return result
