"""MLPSpec: conversions, evaluation against torch, validation messages, file round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onlynorm import FileFormatError, InvalidTargetError, MLPSpec
from onlynorm.targets.convert import as_target

from .conftest import random_mlp


def test_from_module_evaluates_like_the_module():
    model = random_mlp([5, 7, 3, 2], seed=1)
    spec = MLPSpec.from_module(model)
    assert spec.dims == [5, 7, 3, 2] and spec.depth == 3
    assert spec.num_parameters == sum(p.numel() for p in model.parameters())
    x = torch.randn(50, 5, dtype=torch.float64)
    assert torch.equal(spec(x), model(x))
    assert torch.equal(spec.to_module()(x), model(x))


def test_linear_without_bias_gets_zero_bias_and_dropout_is_ignored():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 1)).double().eval()
    spec = MLPSpec.from_module(model)
    assert torch.equal(spec.biases[0], torch.zeros(4, dtype=torch.float64))
    x = torch.randn(8, 3, dtype=torch.float64)
    assert torch.equal(spec(x), model(x))


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), "two Linear layers in a row"),
        (nn.Sequential(nn.Linear(2, 3), nn.ReLU()), "trailing ReLU"),
        (nn.Sequential(nn.ReLU(), nn.Linear(2, 3)), "expected a Linear layer here"),
        (nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), r"Tanh\) is not supported"),
        (nn.Conv1d(2, 3, 1), "expected an nn.Sequential"),
    ],
)
def test_non_mlp_modules_are_refused(module, message):
    with pytest.raises(InvalidTargetError, match=message):
        as_target(module)


def test_shapes_must_chain():
    with pytest.raises(InvalidTargetError, match="do not chain: layer 0 outputs 4 features but layer 1 expects 5"):
        MLPSpec((torch.zeros(4, 3), torch.zeros(2, 5)), (torch.zeros(4), torch.zeros(2)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(3, 2)
    w[1, 1] = bad
    with pytest.raises(InvalidTargetError, match=r"layer 0: weight has 1 non-finite value"):
        MLPSpec((w,), (torch.zeros(3),))


def test_bias_shape_mismatch_names_both_shapes():
    with pytest.raises(InvalidTargetError, match=r"expected bias of shape \(3,\).*found \(2,\)"):
        MLPSpec((torch.zeros(3, 2),), (torch.zeros(2),))


def test_safetensors_and_pt_round_trip(tmp_path):
    model = random_mlp([4, 6, 2], seed=2)
    spec = MLPSpec.from_module(model)
    spec.save(tmp_path / "t.safetensors")
    torch.save(model.state_dict(), tmp_path / "t.pt")
    for path in (tmp_path / "t.safetensors", tmp_path / "t.pt"):
        loaded = MLPSpec.load(path)
        assert loaded.dims == spec.dims
        assert all(torch.equal(a, b) for a, b in zip(loaded.weights, spec.weights))
        assert all(torch.equal(a, b) for a, b in zip(loaded.biases, spec.biases))


def test_state_dict_with_common_prefix_is_accepted():
    model = random_mlp([3, 4, 2], seed=3)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert MLPSpec.from_state_dict(sd).dims == [3, 4, 2]


@pytest.mark.parametrize(
    "state, message",
    [
        ({}, "found no tensors"),
        ({"0.weight": torch.zeros(2, 2), "encoder.attn": torch.zeros(2)}, "key 'encoder.attn' is not an MLP parameter"),
        ({"0.bias": torch.zeros(2)}, "has a bias but no weight"),
        ({"a.0.weight": torch.zeros(2, 2), "b.2.weight": torch.zeros(1, 2)}, "several key prefixes"),
        ({"0.weight": torch.zeros(2, 2, 3)}, "expected a 2-D weight"),
        ({"0.weight": torch.zeros(2, 2, dtype=torch.int64)}, "floating-point"),
    ],
)
def test_state_dicts_that_are_not_mlps(state, message):
    with pytest.raises(InvalidTargetError, match=message):
        MLPSpec.from_state_dict(state)


def test_garbage_and_truncated_files_are_refused(tmp_path):
    good = tmp_path / "good.safetensors"
    MLPSpec.from_module(random_mlp([3, 4, 2])).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a tensor file")
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 nonsense")
    for name in ("trunc.safetensors", "garbage.safetensors", "garbage.pt", "missing.safetensors"):
        with pytest.raises(FileFormatError, match="expected"):
            MLPSpec.load(tmp_path / name)


def test_pt_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match="holds a list, expected a state_dict"):
        MLPSpec.load(tmp_path / "list.pt")


def test_pickled_code_is_never_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"0.weight": Evil()}, fh)
    with pytest.raises(FileFormatError):
        MLPSpec.load(tmp_path / "evil.pt")
    assert not marker.exists()
