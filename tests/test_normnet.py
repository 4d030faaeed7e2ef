"""NormNet as a torch module: BatchNorm semantics, parameter access, train(), save/load."""

from __future__ import annotations

import json

import pytest
import torch

import onlynorm
from onlynorm import FileFormatError, NormLinear, NormNet
from onlynorm._io import METADATA_KEY

from .conftest import random_mlp


@pytest.fixture
def solved():
    g = random_mlp([3, 5, 2], seed=0)
    return g, onlynorm.reconstruct(g, domain=onlynorm.Box(0.0, 2.0), seed=3)


def test_batchnorm_in_inference_form_is_exactly_affine():
    stage = NormLinear(4, 6, relu=False)
    with torch.no_grad():
        stage.norm.weight.copy_(torch.linspace(-2, 2, 6, dtype=torch.float64))
        stage.norm.bias.copy_(torch.linspace(0.5, 1, 6, dtype=torch.float64))
    x = torch.randn(100, 4, dtype=torch.float64)
    expected = (x @ stage.linear.weight.T) * stage.norm.weight + stage.norm.bias
    assert torch.allclose(stage(x), expected, rtol=0, atol=1e-15)  # eps = 0: γ is not perturbed
    assert stage.norm.eps == 0.0


def test_norm_parameters_are_exactly_gamma_and_beta(solved):
    _, f = solved
    params = f.norm_parameters()
    bns = [m for m in f.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [id(p) for p in params] == [id(p) for bn in bns for p in (bn.weight, bn.bias)]
    assert all(p.requires_grad for p in params)
    assert {id(p) for p in params}.isdisjoint({id(p) for p in f.frozen_parameters()})
    assert len(params) + len(f.frozen_parameters()) == len(list(f.parameters()))


def test_train_mode_keeps_fixed_statistics_so_the_function_is_unchanged(solved):
    g, f = solved
    x = onlynorm.Box(0.0, 2.0, dim=3).sample(256)
    before = f(x).detach()
    f.train()
    assert f.training and not any(bn.training for bn in f.norm_modules())
    out = f(x)
    assert torch.equal(out.detach(), before)
    out.sum().backward()  # gradients reach γ and β only
    assert all(p.grad is not None for p in f.norm_parameters())
    assert all(p.grad is None for p in f.frozen_parameters())
    stats = [b.clone() for b in f.buffers()]
    f(x)
    assert all(torch.equal(a, b) for a, b in zip(stats, f.buffers()))  # running stats untouched


def test_batch_statistics_opt_in_changes_the_function(solved):
    _, f = solved
    x = onlynorm.Box(0.0, 2.0, dim=3).sample(256)
    before = f(x).detach()
    f.batch_statistics = True
    f.train()
    assert all(bn.training for bn in f.norm_modules())
    assert not torch.allclose(f(x).detach(), before)


def test_save_load_round_trip(solved, tmp_path):
    g, f = solved
    path = tmp_path / "net.safetensors"
    f.save(path)
    loaded = NormNet.load(path)
    assert loaded.meta == f.meta and loaded.meta.to_dict() == json.loads(json.dumps(f.meta.to_dict()))
    assert loaded.method == "width" and loaded.meta["seed"] == 3 and loaded.target_dims == [3, 5, 2]
    assert loaded.meta["solve"]["domain"] == {"low": [0.0] * 3, "high": [2.0] * 3}
    for (k, a), (k2, b) in zip(f.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(64, 3, dtype=torch.float64) * 2
    assert torch.equal(loaded(x), f(x))
    assert str(loaded.summary()) == str(f.summary())


def test_loading_a_file_that_is_not_a_network(tmp_path):
    onlynorm.MLPSpec.from_module(random_mlp([2, 3, 1])).save(tmp_path / "target.safetensors")
    with pytest.raises(FileFormatError, match="not an onlynorm network file"):
        NormNet.load(tmp_path / "target.safetensors")


def test_tampered_architecture_is_refused(solved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, f = solved
    path = tmp_path / "net.safetensors"
    f.save(path)
    with safe_open(str(path), framework="pt") as fh:
        doc = json.loads(fh.metadata()[METADATA_KEY])
    tensors = load_file(str(path))
    doc["architecture"][0]["out_features"] += 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={METADATA_KEY: json.dumps(doc)})
    with pytest.raises(FileFormatError, match="weights do not match the described architecture"):
        NormNet.load(tmp_path / "bad.safetensors")
    doc["architecture"][0]["kind"] = "mystery"
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata={METADATA_KEY: json.dumps(doc)})
    with pytest.raises(FileFormatError, match="unknown stage kind 'mystery'"):
        NormNet.load(tmp_path / "bad2.safetensors")


def test_wrong_input_width_is_a_clear_error(solved):
    _, f = solved
    with pytest.raises(onlynorm.InvalidNetworkError, match=r"expected inputs with 3 features.*found shape \(4, 5\)"):
        f(torch.zeros(4, 5, dtype=torch.float64))


def test_summary_ratios(solved):
    g, f = solved
    s = f.summary()
    d = s.as_dict()
    assert d["frozen_to_target"] == pytest.approx(s.frozen_parameters / s.target_parameters)
    assert s.frozen_nonzeros == s.frozen_parameters  # dense random weights
    assert "exact" in str(s) and s.exact is True


def test_wrong_input_dtype_is_a_clear_error(solved):
    _, f = solved
    with pytest.raises(onlynorm.InvalidNetworkError, match=r"expected float64 inputs .* found float32"):
        f(torch.zeros(4, 3))
