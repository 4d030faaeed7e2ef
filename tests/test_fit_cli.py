"""``onlynorm fit``: writes the fitted network atomically, prints the report, refuses bad data with exit 2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import onlynorm
from onlynorm import Box, MLPSpec, NormNet
from onlynorm.cli.app import main

from .conftest import random_mlp


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.fixture
def files(tmp_path):
    g = random_mlp([3, 5, 2], seed=1)
    MLPSpec.from_module(g).save(tmp_path / "target.safetensors")
    onlynorm.random_normnet(g, hidden=[4, 4], seed=0).save(tmp_path / "frozen.safetensors")
    return g, tmp_path / "frozen.safetensors", tmp_path / "target.safetensors"


def test_fit_on_a_box_writes_the_network_and_the_report(files, tmp_path, capsys):
    g, frozen, target = files
    out = tmp_path / "fitted.safetensors"
    code, stdout, _ = run(
        ["fit", frozen, target, "--out", out, "--low", "0", "--high", "2", "--method", "layerwise"], capsys
    )
    assert code == 0 and out.exists()
    assert "layerwise" in stdout and "held-out" in stdout
    net = NormNet.load(out)
    assert net.meta["fit"]["method"] == "layerwise"
    x = Box(0.0, 2.0, dim=3).sample(200, seed=3)
    assert net.meta["fit"]["final_error"] < net.meta["fit"]["initial_error"]
    assert not torch.equal(net(x), NormNet.load(frozen)(x))


def test_fit_on_a_data_file(files, tmp_path, capsys):
    _, frozen, target = files
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.rand(64, 3, dtype=torch.float32)}, str(data))
    out = tmp_path / "fitted.safetensors"
    code, stdout, _ = run(["fit", frozen, target, "--out", out, "--data", data, "--budget", "1"], capsys)
    assert code == 0 and out.exists() and "gauss-newton" in stdout
    assert "stopped" in stdout and "argmax agreement" in stdout and "budget" in stdout
    fit = NormNet.load(out).meta["fit"]
    assert fit["stopped"] in ("budget", "exact") and fit["budget_seconds"] == 1.0
    assert 0.0 <= fit["agreement"] <= 1.0


@pytest.mark.parametrize(
    "content, extra, match",
    [
        ({"x": torch.full((64, 3), float("nan"))}, [], "finite"),
        ({"x": torch.rand(64, 4)}, [], "shape"),
        ({"x": torch.rand(64, 3), "y": torch.rand(64, 2)}, [], "exactly one tensor"),
        ({"x": torch.rand(64, 3)}, ["--low", "0"], "either --data or --low"),
    ],
)
def test_bad_data_exits_2_without_output_or_traceback(files, tmp_path, capsys, content, extra, match):
    _, frozen, target = files
    data = tmp_path / "x.safetensors"
    save_file(content, str(data))
    out = tmp_path / "fitted.safetensors"
    code, _, stderr = run(["fit", frozen, target, "--out", out, "--data", data, *extra], capsys)
    assert code == 2 and match in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".fitted*"))


def test_unknown_method_exits_2(files, tmp_path, capsys):
    _, frozen, target = files
    code, _, stderr = run(["fit", frozen, target, "--out", tmp_path / "o.safetensors", "--method", "sgd"], capsys)
    assert code == 2 and "method" in stderr
