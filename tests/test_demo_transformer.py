"""``onlynorm demo --transformer`` in a reduced form: the numbers it reports are recomputed here from the target
model's own forward and the returned network, and the CLI writes the same document."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from onlynorm.cli.app import main
from onlynorm.demos import transformer
from onlynorm.nets import SeqNet

SMALL = transformer.Config(d=8, heads=2, layers=1, epochs=1, fresh=16)
TIMES = {"train_seconds", "solve_seconds", "solve_cpu_seconds", "verify_seconds", "seconds", "peak_rss_bytes"}


@pytest.fixture(scope="module")
def small():
    return transformer.demo(seed=3, config=SMALL)


def test_reported_errors_are_those_of_an_independent_forward(small):
    doc, target, net, (Xte, yte) = small
    assert isinstance(net, SeqNet) and doc["method"] == "deep"
    with torch.no_grad():
        got, want = net(Xte), target(Xte)  # the trained model's own torch forward: independent of the construction
    err = float((got - want).abs().max())
    assert err == pytest.approx(doc["test_max_abs_logit_error"], rel=1e-6, abs=1e-300)
    assert doc["test_max_abs_logit_error"] <= 1e-9 and doc["agreement"] == 1.0
    assert doc["target_accuracy"] == float((want.argmax(1) == yte).double().mean())
    assert doc["reconstructed_accuracy"] == doc["target_accuracy"]
    assert doc["fresh_max_rel_error"] <= 1e-9 and doc["verified"] is True
    fresh = torch.rand(40, transformer.TOKENS, transformer.PIXELS, dtype=torch.float64)  # not the demo's inputs
    with torch.no_grad():
        rel = float((net(fresh) - target(fresh)).abs().max() / target(fresh).abs().max())
    assert rel <= 1e-9


def test_reported_counts_are_the_networks(small):
    doc, target, net, _ = small
    tunable = {id(p) for m in net.modules() if isinstance(m, (_BatchNorm, nn.LayerNorm)) for p in m.parameters()}
    assert doc["tunable_parameters"] == sum(p.numel() for p in net.parameters() if id(p) in tunable)
    assert doc["frozen_parameters"] == sum(p.numel() for p in net.parameters() if id(p) not in tunable)
    assert doc["target_parameters"] == sum(p.numel() for p in target.parameters())
    assert doc["layer_norms"] == sum(isinstance(m, nn.LayerNorm) for m in target.modules()) == 3
    # the frozen tensors are random, not the target's weights: no target weight matrix appears among them
    frozen = [p for p in net.parameters() if id(p) not in tunable]
    assert not any(p.shape == target.embed.weight.shape for p in frozen)


def test_deterministic_for_a_seed(small):
    doc, _, _, _ = small
    again, _, _, _ = transformer.demo(seed=3, config=SMALL)
    assert {k: v for k, v in again.items() if k not in TIMES} == {k: v for k, v in doc.items() if k not in TIMES}
    other, _, _, _ = transformer.demo(seed=4, config=SMALL)
    assert (
        other["target_accuracy"] != doc["target_accuracy"] or other["fresh_max_rel_error"] != doc["fresh_max_rel_error"]
    )


def test_cli_writes_the_document(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transformer, "DEFAULT", SMALL)
    path = tmp_path / "demo-transformer.json"
    with pytest.raises(SystemExit) as info:
        main(["demo", "--transformer", "--seed", "3", "--json", str(path)])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "peak memory" in out and "passed" in out
    doc = json.loads(path.read_text())
    assert doc["config"] == {"d": 8, "heads": 2, "layers": 1, "epochs": 1, "fresh": 16}
    assert doc["agreement"] == 1.0 and doc["test_max_abs_logit_error"] <= 1e-9


def test_cli_refuses_two_demos(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--transformer", "--cnn"])
    assert info.value.code == 2 and "at most one of" in capsys.readouterr().err
