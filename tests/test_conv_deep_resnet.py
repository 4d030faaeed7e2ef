"""The ResNet-20 demo end to end (heavy: minutes; `make bench` runs it through `onlynorm demo --resnet`)."""

from __future__ import annotations

import json

import pytest

from onlynorm.demos import resnet


@pytest.mark.heavy
def test_resnet20_demo_is_exact_certified_and_agrees_on_every_test_digit(tmp_path):
    path = tmp_path / "resnet.json"
    ok = resnet.run(seed=0, json_path=path, epochs=1, samples=32, with_resnet18=False)
    doc = json.loads(path.read_text())
    assert ok
    assert doc["agreement"] == 1.0 and doc["box_max_rel_error"] <= 1e-9 and doc["certified"] is True
    assert doc["summary"]["target_parameters"] > 0.26e6
