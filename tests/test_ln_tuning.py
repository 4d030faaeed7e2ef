"""``onlynorm experiment ln-tuning-capacity --quick``: artefacts written, the table summarises the trials it ran,
counts match the model, and a seed determines every number apart from wall-clock times (and auto's, whose budget
is wall time)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from onlynorm.demos.transformer import DigitsTransformer
from onlynorm.experiments import EXPERIMENTS, run_experiment
from onlynorm.experiments import ln_tuning_capacity as exp

CLOCK = {"seconds"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ln")
    run_experiment("ln-tuning-capacity", quick=True, out=out, seed=1)
    return out, json.loads((out / "results.json").read_text())


def test_artefacts_and_table(quick):
    out, data = quick
    assert "ln-tuning-capacity" in EXPERIMENTS
    assert (out / "ln_tuning_capacity.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    cfg = exp.CONFIGS[True]
    assert len(data["trials"]) == len(data["table"]) == len(cfg.tasks) * len(cfg.factors) * cfg.repeats
    for row, trial in zip(data["table"], data["trials"]):
        assert (row["task"], row["factor"], row["width"]) == (
            trial["task"],
            trial["factor"],
            cfg.width * trial["factor"],
        )
        assert row["error ratio"] == pytest.approx(trial["auto"]["logit_rms"] / trial["adam"]["logit_rms"])
        assert row["time ratio"] == pytest.approx(trial["auto"]["seconds"] / trial["adam"]["seconds"])
        assert f"| {row['task']} | {row['width']} | {row['tunable']} |" in summary
        # only the LayerNorm γ, β are tuned: 2 per feature of every LayerNorm of the (wider) base
        model = DigitsTransformer(d=row["width"], heads=cfg.heads, layers=cfg.layers)
        assert row["tunable"] == sum(
            p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()
        )
        for m in ("base", "adam", "auto"):
            assert 0.0 <= trial[m]["agreement"] <= 1.0 and trial[m]["logit_rms"] >= 0.0
        assert trial["adam"]["iterations"] == cfg.steps
    k = data["claim"]
    assert k["lower_error"] == sum(r["error ratio"] < 1 for r in data["table"])
    assert k["within_half_time"] == sum(r["time ratio"] <= 0.5 for r in data["table"])
    assert f"in {k['lower_error']} of {k['cells']} cells" in summary


def test_a_seed_determines_the_adam_numbers(quick):
    _, data = quick
    kwargs = exp.trials_for(True, 1)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner runs every trial: the same reductions, the same bits
    try:
        again = exp.trial(**kwargs)
    finally:
        torch.set_num_threads(threads)
    first = data["trials"][0]
    assert again["target_accuracy"] == first["target_accuracy"] and again["tunable"] == first["tunable"]
    for m in ("base", "adam"):
        assert {k: v for k, v in again[m].items() if k not in CLOCK} == {
            k: v for k, v in first[m].items() if k not in CLOCK
        }
