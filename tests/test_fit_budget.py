"""auto spends its budget: restarts within it, the budget honoured, the stop reason, the default budget, dtypes.

Wall-time bounds here are loose (a loaded 2-core machine); the 5 % goal is measured in benchmarks/fit_budget.py.
"""

from __future__ import annotations

import copy
import importlib
import time

import pytest
import torch

import onlynorm
from onlynorm import Box, fit_norms
from onlynorm.fit.auto_config import START_KINDS

from .conftest import random_mlp


def _timed(*args, **kwargs):
    importlib.import_module("torch._dynamo")  # fit_norms imports it before its clock starts (once per process)
    start = time.perf_counter()
    net, report = fit_norms(*args, **kwargs)
    return net, report, time.perf_counter() - start


def test_restarts_run_within_the_budget_and_keep_the_best():
    g = random_mlp([3, 5, 3], seed=5)
    frozen = onlynorm.random_normnet(g, hidden=[3, 3], seed=1)
    _, _, one_run = _timed(frozen, g, Box(-1.0, 1.0), samples=128, steps=300)  # layer-wise + one LM run
    budget = max(1.0, 4 * one_run)  # room for restarts however loaded the machine is
    _, report, wall = _timed(frozen, g, Box(-1.0, 1.0), samples=128, budget_seconds=budget)
    first = report.phase("gauss-newton")
    assert first.details["stopped"] == "converged", first.details  # a converged first run leaves time over
    assert [p.name for p in report.phases] == ["layerwise", "gauss-newton", "restarts"]
    restarts = report.phase("restarts")
    assert restarts.iterations >= 1 and restarts.details["runs"]
    assert {r["start"] for r in restarts.details["runs"]} <= set(START_KINDS)
    assert restarts.error_after <= restarts.error_before  # the best on held-out points is kept
    assert restarts.error_after == min([restarts.error_before] + [r["error"] for r in restarts.details["runs"]])
    assert report.stopped == "budget" and report.budget_seconds == budget and report.budget_source == "given"
    assert wall <= 1.5 * budget + 0.5  # loaded machine; the 5 % goal is a benchmark
    assert wall >= 0.5 * budget  # and the budget was used, not left


def test_without_a_budget_auto_states_its_default():
    g = random_mlp([3, 5, 2], seed=1)
    frozen = onlynorm.random_normnet(g, hidden=[3, 3], seed=0)
    _, report, wall = _timed(frozen, g, Box(-1.0, 1.0), samples=128)
    assert report.budget_source.startswith("default")
    assert 0 < report.budget_seconds <= 60 and wall <= 1.5 * report.budget_seconds + 0.5


def test_steps_without_a_budget_is_one_run():
    g = random_mlp([3, 5, 2], seed=1)
    frozen = onlynorm.random_normnet(g, hidden=[3, 3], seed=0)
    _, report = fit_norms(frozen, g, Box(-1.0, 1.0), samples=128, steps=3)
    assert [p.name for p in report.phases] == ["layerwise", "gauss-newton"]
    assert report.stopped in ("steps", "converged") and report.budget_seconds is None


def test_stop_reasons():
    g = random_mlp([3, 4, 2], seed=2)
    _, exact = fit_norms(onlynorm.random_normnet(g, seed=0), g, Box(-1.0, 1.0), budget_seconds=5)
    assert exact.stopped == "exact" and exact.exact
    narrow = onlynorm.random_normnet(g, hidden=[3, 3], seed=0)
    _, gn = fit_norms(narrow, g, Box(-1.0, 1.0), method="gauss-newton", samples=64, steps=2)
    assert gn.stopped in ("steps", "converged")
    _, adam = fit_norms(narrow, g, Box(-1.0, 1.0), method="adam", samples=64, steps=5)
    assert adam.stopped == "steps"
    _, capped = fit_norms(narrow, g, Box(-1.0, 1.0), method="adam", samples=64, steps=10**6, budget_seconds=0.05)
    assert capped.stopped == "budget"
    _, layer = fit_norms(narrow, g, Box(-1.0, 1.0), method="layerwise", samples=64)
    assert layer.stopped == "done"


def test_the_report_survives_save_and_load(tmp_path):
    g = random_mlp([3, 5, 2], seed=1)
    net, report = fit_norms(onlynorm.random_normnet(g, hidden=[3, 3], seed=0), g, Box(-1.0, 1.0), budget_seconds=0.3)
    net.save(tmp_path / "n.safetensors")
    back = onlynorm.NormNet.load(tmp_path / "n.safetensors").meta.fit
    assert back.stopped == report.stopped and back.budget_seconds == pytest.approx(0.3)
    assert back.agreement == pytest.approx(report.agreement) and 0 <= report.agreement <= 1
    assert ("stopped", report.stopped) in report.rows()


@pytest.mark.parametrize("net_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
def test_auto_with_float32_and_float64(net_dtype, target_dtype):
    g = random_mlp([3, 5, 2], seed=4).to(target_dtype)
    frozen = onlynorm.random_normnet(g.double(), hidden=[3, 3], seed=0).to(net_dtype)
    g = g.to(target_dtype)
    net, report = fit_norms(frozen, g, Box(-1.0, 1.0), samples=128, budget_seconds=0.4)
    assert net.dtype == net_dtype and report.final_error < report.initial_error
    assert report.stopped in ("budget", "exact")


#: scheduler noise allowed on top of the 5 % goal: on a shared 2-core machine (other test workers, other jobs) a
#: process can wait a few time slices (tens of ms) between its last deadline check and its return; 0.2 s is that
#: wait at load ~10, not a step (steps here are 5–50 ms). The 5 % goal itself is measured in benchmarks/fit_budget.py.
ALLOWANCE_SECONDS = 0.2


def _retuned(model, scale, seed):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out.eval()


@pytest.mark.parametrize("case", ["width", "pretrained"])
@pytest.mark.parametrize("budget", [0.3, 0.8])
def test_a_small_budget_ends_within_it(case, budget):
    if case == "width":
        g = random_mlp([6, 6, 6], seed=7)
        frozen, target, box = onlynorm.random_normnet(g, hidden=[9, 9], seed=1), g, Box(-1.0, 1.0)
    else:
        base = random_mlp([8, 8, 8, 8], seed=7)
        frozen, target, box = onlynorm.with_norms(base), _retuned(base, 0.3, 8), Box(-1.0, 1.0)
    net, report, wall = _timed(frozen, target, box, budget_seconds=budget)
    assert wall <= 1.05 * budget + ALLOWANCE_SECONDS, (wall, [(p.name, p.seconds) for p in report.phases])
    assert report.stopped == "budget" and report.budget_seconds == budget
    assert not any("× the budget" in n for n in report.notes) or wall > 1.05 * budget  # the note only on an overrun
    assert report.final_error < report.initial_error
