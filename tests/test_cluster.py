"""Experiment trials on a Dask cluster (joblib's dask backend): same numbers as the local run, lost workers retried."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from dask.distributed import Client, LocalCluster

from onlynorm.cli.app import main
from onlynorm.experiments import gd_vs_exact, sparse_threshold
from onlynorm.experiments.runner import run_trials, trial_seed, use_backend

from .test_experiments import _without_times


def _cluster(n_workers: int) -> LocalCluster:
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")


def test_dask_trials_are_bit_identical_to_local_ones(monkeypatch):
    """Without an address the dask backend starts a LocalCluster of ONLYNORM_JOBS one-thread worker processes."""
    monkeypatch.setenv("ONLYNORM_JOBS", "2")
    gd = [
        {"ratio": r, "d": 3, "depth": 2, "steps": 60, "seed": trial_seed(4, i)} for i, r in enumerate([0.5, 1.0, 2.0])
    ]
    sparse = [{"d": 4, "p": p, "seed": trial_seed(4, k), "numeric": True} for k, p in enumerate([0.4, 0.6, 0.8])]
    local = (run_trials(gd_vs_exact.trial, gd), run_trials(sparse_threshold.trial, sparse))
    with use_backend("dask") as client:
        assert len(client.scheduler_info()["workers"]) == 2
        on_dask = (run_trials(gd_vs_exact.trial, gd), run_trials(sparse_threshold.trial, sparse))
        assert client.run_on_scheduler(_transitions) >= 3 * (len(gd) + len(sparse))  # they ran on the cluster
    assert _without_times(on_dask[0]) == _without_times(local[0])  # every float equal, not merely close
    assert on_dask[1] == local[1]
    assert local[0][0]["gd_rms"] != local[0][1]["gd_rms"]  # the trials differ from one another


def _transitions(dask_scheduler) -> int:
    """Task state transitions the scheduler has made so far (each task that runs makes several)."""
    return dask_scheduler.transition_counter


def test_cli_experiment_uses_the_scheduler_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gd_vs_exact, "RATIOS", [0.5])  # the trial list is built in this process
    monkeypatch.setenv("ONLYNORM_JOBS", "2")
    local = _run_cli(["experiment", "gd-vs-exact", "--quick", "--out", tmp_path / "local", "--seed", "2"])
    with _cluster(1) as cluster:
        monkeypatch.setenv("ONLYNORM_SCHEDULER", cluster.scheduler_address)
        with Client(cluster.scheduler_address) as client:
            before = client.run_on_scheduler(_transitions)
            remote = _run_cli(
                ["experiment", "gd-vs-exact", "--quick", "--backend", "dask", "--out", tmp_path / "dask", "--seed", "2"]
            )
            assert client.run_on_scheduler(_transitions) >= before + 3 * 2  # the 2 trials ran on the cluster
    assert local == remote == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "dask"))
    assert _without_times(a) == _without_times(b) and len(a["trials"]) == 2


def _run_cli(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main([str(v) for v in argv])
    return info.value.code


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "ray"], "expected one of local, dask, found 'ray'"),
        (["--scheduler", "tcp://127.0.0.1:8786"], "needs --backend dask"),
        (["--backend", "dask", "--scheduler", "no-such-protocol://x"], "expected a reachable Dask scheduler"),
    ],
)
def test_cli_backend_errors_are_one_line(argv, message, tmp_path, capsys):
    code = _run_cli(["experiment", "scaling", "--quick", "--out", tmp_path / "out", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _slow_trial(i: int, log: str) -> dict:
    """Record start and end (by process id) so the test can see which trial a killed worker was running."""
    pid = os.getpid()
    Path(log, f"start-{i}-{pid}").touch()
    time.sleep(0.4)
    Path(log, f"done-{i}-{pid}").touch()
    return {"i": i, "value": trial_seed(9, i), "pid": pid}


def test_a_worker_killed_mid_run_is_retried_not_dropped(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    trials = [{"i": i, "log": str(log)} for i in range(10)]
    with _cluster(2) as cluster, use_backend("dask", cluster.scheduler_address) as client:
        victim = sorted(client.run(os.getpid).values())[0]
        killer = threading.Thread(target=_kill_when_busy, args=(victim, log), daemon=True)
        killer.start()
        results = run_trials(_slow_trial, trials)
        killer.join(timeout=30)
    killed = {
        int(p.name.split("-")[1])
        for p in log.glob(f"start-*-{victim}")
        if not (log / p.name.replace("start", "done", 1)).exists()
    }
    assert killed, "the worker was not killed while running a trial"
    assert [r["i"] for r in results] == list(range(10))  # none dropped, order kept
    assert [r["value"] for r in results] == [trial_seed(9, i) for i in range(10)]
    assert all(results[i]["pid"] != victim for i in killed)  # re-run on a live worker


def _kill_when_busy(pid: int, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(log.glob(f"start-*-{pid}")):
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.02)
