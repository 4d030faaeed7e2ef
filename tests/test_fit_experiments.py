"""The fit_norms experiments' trials at toy sizes: every method scored, the closed form exact at full width, the
auto budget tied to Adam's time, and the summaries built from real trials."""

from __future__ import annotations

from onlynorm.experiments import fine_tune_capacity as ft
from onlynorm.experiments import under_parameterized as up


def test_under_parameterized_trial_scores_every_method():
    below = up.trial(d=3, depth=2, ratio=0.5, adam_steps=30, seed=1)
    assert set(up.METHODS) <= set(below)
    assert all(below[m]["rms"] >= 0 for m in up.METHODS)
    assert below["auto_phases"][0] == "layerwise"
    full = up.trial(d=3, depth=2, ratio=1.0, adam_steps=30, seed=1)
    assert "gauss-newton" not in full and full["auto_phases"] == ["exact"]
    assert full["auto"]["rms"] < 1e-9 and full["closed form"]["rms"] < 1e-9
    table = up.summarize([below, full])
    assert [r["ratio"] for r in table] == [0.5, 1.0]
    assert table[1]["auto/adam error"] < 1e-6
    summary = up._summary({"repeats": 1, "adam_steps": 30, "table": table, "goal": up.goal_ratios(table)})
    assert "| 3 | 2 | 0.5 |" in summary and "auto/adam error" in summary


def test_fine_tune_trial_fits_the_base_norms_to_a_fine_tuned_target():
    out = ft.trial(task="even/odd", width=8, factor=1, epochs=2, tune_epochs=2, adam_steps=20, seed=0)
    for m in ("base", "adam", "auto"):
        assert 0.0 <= out[m]["agreement"] <= 1.0 and out[m]["logit_rms"] >= 0
    assert out["auto_phases"][0] == "layerwise"
    assert out["auto"]["logit_rms"] < out["base"]["logit_rms"]
    wide = ft.trial(task="permuted", width=8, factor=2, epochs=2, tune_epochs=2, adam_steps=20, seed=0)
    assert wide["tunable"] > out["tunable"] and "layerwise" not in wide["auto_phases"]
