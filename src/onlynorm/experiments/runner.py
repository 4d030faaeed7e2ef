"""The shared experiment runner: parallel independent trials (joblib), deterministic seeds, atomic artefacts.

Every experiment is ``trials = [dict(...), ...]`` of keyword arguments to a top-level (picklable) trial function,
run by :func:`run_trials` across local cores with joblib's ``loky`` backend — which is also the seam where a cluster
backend (``joblib.parallel_config(backend="ray"|"dask")``) can take over without touching the experiments. Results
come back in submission order, so a seed determines every number. :func:`write_artifacts` writes
``results.json``, the PNG figures and ``summary.md`` atomically into the output directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_path

__all__ = ["run_trials", "trial_seed", "write_artifacts", "ExperimentResult", "default_jobs"]


def default_jobs() -> int:
    """Local cores (``ONLYNORM_JOBS`` overrides)."""
    env = os.environ.get("ONLYNORM_JOBS")
    return max(1, int(env)) if env else max(1, os.cpu_count() or 1)


def trial_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed determined by the experiment seed and the trial's coordinates (independent streams)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


_WARM = False


def _init_worker() -> None:
    """One BLAS/torch thread per worker (the parallelism is across trials), and one tiny reconstruction so that
    lazy imports and LAPACK workspaces are not charged to the first timed trial."""
    global _WARM
    if _WARM:
        return
    import torch
    from torch import nn

    import onlynorm

    torch.set_num_threads(1)
    onlynorm.reconstruct(nn.Linear(2, 2).double())
    onlynorm.reconstruct(nn.Linear(2, 2).double(), method="deep")
    _WARM = True


def _call(fn: Callable, kwargs: dict) -> Any:
    _init_worker()
    return fn(**kwargs)


def run_trials(fn: Callable[..., Any], trials: list[dict], *, console=None, description: str = "trials",
               n_jobs: int | None = None) -> list[Any]:
    """Run ``fn(**t)`` for every ``t`` in ``trials`` in parallel; results in the order of ``trials``."""
    from joblib import Parallel, delayed

    jobs = default_jobs() if n_jobs is None else n_jobs
    if not trials:
        return []
    import torch

    # The sequential path runs the trials in *this* process: _init_worker's single-thread setting must not stick
    # in the caller's session (timings are single-threaded per trial either way, as every table says).
    threads = torch.get_num_threads()
    try:
        parallel = Parallel(n_jobs=jobs, backend="loky" if jobs > 1 else "sequential", return_as="generator")
        outputs = parallel(delayed(_call)(fn, t) for t in trials)
        if console is None:
            return list(outputs)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        results = []
        with Progress(TextColumn(description), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(description, total=len(trials))
            for r in outputs:
                results.append(r)
                bar.advance(task)
        return results
    finally:
        torch.set_num_threads(threads)


@dataclass
class ExperimentResult:
    """What an experiment hands to :func:`write_artifacts`."""

    name: str
    data: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)   # file name → matplotlib Figure
    summary: str = ""


def write_artifacts(result: ExperimentResult, out: Path) -> list[Path]:
    """Write ``results.json``, every figure and ``summary.md`` into ``out`` (created), each atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(result.data, indent=2, default=_jsonable))
    written.append(out / "results.json")
    for name, fig in result.figures.items():
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(out / name)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(result.summary)
    written.append(out / "summary.md")
    return written


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
