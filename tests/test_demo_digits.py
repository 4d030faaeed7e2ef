"""The digits demo end to end at reduced training budgets: exact closed form, honest JSON, a PNG."""

from __future__ import annotations

import json

import pytest

from onlynorm.demos import digits


@pytest.mark.heavy
def test_digits_demo_reduced(tmp_path):
    path = tmp_path / "demo.json"
    ok = digits.run(seed=1, json_path=path, console=None, steps=150, epochs=40)
    doc = json.loads(path.read_text())
    for key in (
        "target_accuracy",
        "reconstructed_accuracy",
        "norm_only_gd_accuracy",
        "max_abs_error",
        "norm_only_gd_max_abs_error",
        "norm_only_gd_agreement",
        "seconds",
    ):
        assert key in doc
    assert ok and doc["target_accuracy"] >= 0.9
    assert doc["reconstructed_accuracy"] == doc["target_accuracy"] and doc["reconstructed_agreement"] == 1.0
    assert doc["max_abs_error"] < 1e-8
    assert doc["norm_only_gd_max_abs_error"] > doc["max_abs_error"]
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
