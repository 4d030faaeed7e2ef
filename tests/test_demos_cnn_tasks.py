"""The multi-task and CNN demos at reduced training budgets."""

from __future__ import annotations

import json

import pytest

from onlynorm.demos import cnn, tasks


@pytest.mark.heavy
def test_tasks_demo(tmp_path):
    path = tmp_path / "tasks.json"
    assert tasks.run(seed=0, json_path=path, console=None, epochs=15)
    doc = json.loads(path.read_text())
    assert set(doc["tasks"]) == {"digit", "even/odd", "≥ 5"}
    for result in doc["tasks"].values():
        assert result["agreement"] == 1.0 and result["max_abs_error"] < 1e-8
        assert result["accuracy"] == result["target_accuracy"]
        assert result["norm_set_bytes"] < 0.05 * doc["frozen_bytes"]


def test_cnn_demo(tmp_path):
    path = tmp_path / "cnn.json"
    assert cnn.run(seed=0, json_path=path, console=None, epochs=3)
    doc = json.loads(path.read_text())
    assert doc["agreement"] == 1.0 and doc["max_abs_error"] < 1e-8
    assert doc["reconstructed_accuracy"] == doc["target_accuracy"]
