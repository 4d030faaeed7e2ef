"""The shared experiment runner: parallel independent trials (joblib), deterministic seeds, atomic artefacts.

Every experiment is ``trials = [dict(...), ...]`` of keyword arguments to a top-level (picklable) trial function,
run by :func:`run_trials` across local cores with joblib's ``loky`` backend, or — inside :func:`use_backend`
``("dask", scheduler)`` — on a Dask cluster through joblib's dask backend, without touching the experiments.
Results come back in submission order and every trial runs with one torch thread wherever it runs, so a seed
determines every number (apart from wall-clock times) on either backend. :func:`write_artifacts` writes
``results.json``, the PNG figures and ``summary.md`` atomically into the output directory.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed, parallel_config, register_parallel_backend
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import onlynorm

from .._io import atomic_path
from ..errors import MissingDependencyError, OnlyNormError

__all__ = ["run_trials", "trial_seed", "write_artifacts", "ExperimentResult", "default_jobs", "use_backend", "BACKENDS"]

BACKENDS = ("local", "dask")

#: the Dask client of the enclosing :func:`use_backend` block (``None``: run on local cores)
_CLIENT: contextvars.ContextVar = contextvars.ContextVar("onlynorm_dask_client", default=None)


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

    torch.set_num_threads(1)
    onlynorm.reconstruct(nn.Linear(2, 2).double())
    onlynorm.reconstruct(nn.Linear(2, 2).double(), method="deep")
    _WARM = True


def _call(fn: Callable, kwargs: dict) -> Any:
    _init_worker()
    return fn(**kwargs)


def run_trials(
    fn: Callable[..., Any], trials: list[dict], *, console=None, description: str = "trials", n_jobs: int | None = None
) -> list[Any]:
    """Run ``fn(**t)`` for every ``t`` in ``trials`` in parallel; results in the order of ``trials``."""

    jobs = default_jobs() if n_jobs is None else n_jobs
    if not trials:
        return []

    # The sequential path runs the trials in *this* process: _init_worker's single-thread setting must not stick
    # in the caller's session (timings are single-threaded per trial either way, as every table says).
    threads = torch.get_num_threads()
    try:
        client = _CLIENT.get()
        if client is not None and n_jobs != 1:
            # joblib's dask backend: each trial is a task; a task on a worker that dies is rescheduled by the
            # scheduler onto another worker (up to distributed.scheduler.allowed-failures times), never dropped.

            with parallel_config(backend=_dask_backend(), client=client):
                parallel = Parallel(n_jobs=-1, batch_size=1, return_as="generator")
                outputs = parallel(delayed(_call)(fn, t) for t in trials)
                return _collect(outputs, len(trials), console, description)
        parallel = Parallel(n_jobs=jobs, backend="loky" if jobs > 1 else "sequential", return_as="generator")
        outputs = parallel(delayed(_call)(fn, t) for t in trials)
        return _collect(outputs, len(trials), console, description)
    finally:
        torch.set_num_threads(threads)


def _collect(outputs, total: int, console, description: str) -> list[Any]:
    if console is None:
        return list(outputs)

    results = []
    with Progress(
        TextColumn(description),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        for r in outputs:
            results.append(r)
            bar.advance(task)
    return results


def _dask_backend() -> str:
    """joblib's dask backend, except that a cluster with a single worker thread still receives the trials
    (joblib runs a one-job ``Parallel`` in the calling process, which would silently bypass the cluster)."""
    from joblib._dask import DaskDistributedBackend  # joblib's own dask backend (joblib is pinned)

    class ClusterBackend(DaskDistributedBackend):
        def effective_n_jobs(self, n_jobs):
            return max(2, super().effective_n_jobs(n_jobs))

    register_parallel_backend("onlynorm-dask", ClusterBackend)
    return "onlynorm-dask"


@contextlib.contextmanager
def use_backend(backend: str = "local", scheduler: str | None = None):
    """Run the :func:`run_trials` calls of the block on ``backend``.

    Trials that an experiment runs one at a time on purpose (``n_jobs=1``: wall-clock timings) stay on the calling
    process.

    Parameters
    ----------
    backend
        ``"local"``: this machine's cores (loky). ``"dask"``: a Dask cluster through joblib's dask backend.
    scheduler
        ``"dask"`` only: the scheduler's address (e.g. ``"tcp://HOST:8786"``). Without one, a ``LocalCluster`` of
        :func:`default_jobs` worker processes with one thread each is started for the block and closed after it.

    Yields
    ------
    distributed.Client or None
        The Dask client the trials are submitted through (``None`` for ``"local"``).

    Raises
    ------
    OnlyNormError
        Unknown backend, an address without ``"dask"``, or an unreachable scheduler.
    MissingDependencyError
        ``dask.distributed`` is not installed (``pip install 'onlynorm[cluster]'``).

    Examples
    --------

    >>> with use_backend("ray"):
    ...     pass
    Traceback (most recent call last):
    onlynorm.errors.OnlyNormError: --backend: expected one of local, dask, found 'ray'
    """
    if backend not in BACKENDS:
        raise OnlyNormError(f"--backend: expected one of {', '.join(BACKENDS)}, found {backend!r}")
    if backend == "local":
        if scheduler:
            raise OnlyNormError(
                f"--scheduler {scheduler!r} needs --backend dask; add --backend dask or drop the address"
            )
        token = _CLIENT.set(None)
        try:
            yield None
        finally:
            _CLIENT.reset(token)
        return
    with _dask_client(scheduler) as client:
        token = _CLIENT.set(client)
        try:
            yield client
        finally:
            _CLIENT.reset(token)


def _check_scheduler_address(scheduler: str) -> None:
    """Refuse an address that is not ``[scheme://]HOST:PORT`` *before* a ``Client`` exists: a ``Client`` whose
    constructor fails on a malformed address prints a traceback from its ``__del__`` when it is collected."""
    from distributed.comm import get_address_host_port

    try:
        get_address_host_port(scheduler)
    except (ValueError, TypeError) as exc:
        raise OnlyNormError(
            f"--scheduler: expected a reachable Dask scheduler address like tcp://HOST:8786, found {scheduler!r}, "
            f"which is not an address ({str(exc).splitlines()[0][:120]}); start one with `dask scheduler` and pass "
            "the address it prints"
        ) from None


@contextlib.contextmanager
def _dask_client(scheduler: str | None):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependencyError(
            "--backend dask needs dask.distributed, found it not installed; install it "
            "with pip install 'onlynorm[cluster]'"
        ) from None
    cluster = None
    if scheduler:
        _check_scheduler_address(scheduler)
        try:
            client = Client(scheduler, timeout="10s", set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise OnlyNormError(
                f"--scheduler: expected a reachable Dask scheduler address like tcp://HOST:8786, "
                f"found {scheduler!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "start one with `dask scheduler`"
            ) from None
    else:
        cluster = LocalCluster(n_workers=default_jobs(), threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@dataclass
class ExperimentResult:
    """What an experiment hands to :func:`write_artifacts`."""

    name: str
    data: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)  # file name → matplotlib Figure
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
