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


def test_digits_become_three_channel_32_pixel_images_with_the_same_gray_levels():
    import torch

    X = torch.rand(5, 64)
    img = resnet.digits_as_cifar(X)
    assert img.shape == (5, 3, 32, 32)
    assert torch.equal(img[:, 0, ::4, ::4].reshape(5, 64), X) and torch.equal(img[:, 2], img[:, 0])


def test_benchmark_script_imports(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "conv_deep.py"
    spec = importlib.util.spec_from_file_location("bench_conv_deep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.target(4)[0].weight.shape == (4, 4, 3, 3)
