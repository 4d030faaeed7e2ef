"""CNN constructions follow the contract: a plan with nested stage paths, plan_of naming the first mismatch, the
Khatri–Rao systems for ``onlynorm.capacity`` (API and CLI), the conv pair solve's typed records."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import NormNet
from onlynorm.cli.app import main
from onlynorm.constructions import get_construction
from onlynorm.constructions.plan import stage_at
from onlynorm.errors import InvalidNetworkError
from onlynorm.nets import ConvStream, NormConv2d, NormLinear
from onlynorm.nets.records import SolveRecord
from onlynorm.targets.cnn import ConvNetSpec
from onlynorm.targets.layers import Conv, Flatten, Linear, Pool, ReLU, ResidualBlock

#: method name for random_normnet → (construction, options)
METHODS = {"width": ("conv", {}), "deep": ("conv_deep", {"block": 2})}


def _conv(c_out, c_in, k, gen, **geometry) -> Conv:
    w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5
    return Conv(w, 0.1 * torch.randn(c_out, generator=gen, dtype=torch.float64), **geometry)


def small_resnet(seed: int = 0, stride: int = 1, channels: int = 3) -> ConvNetSpec:
    """conv → ReLU → residual(body: conv, ReLU, 1×1 conv; shortcut: 1×1 conv) → maxpool → flatten → linear."""
    gen = torch.Generator().manual_seed(seed)
    c = channels
    block = ResidualBlock(
        body=(_conv(c, c, 3, gen, padding=(1, 1)), ReLU(), _conv(c, c, 1, gen)), shortcut=(_conv(c, c, 1, gen),)
    )
    hw = 4 // stride
    linear = Linear(
        torch.randn(2, c * (hw // 2) ** 2, generator=gen, dtype=torch.float64) / c**0.5,
        torch.randn(2, generator=gen, dtype=torch.float64),
    )
    first = _conv(c, 2, 3, gen, padding=(1, 1), stride=(stride, stride))
    return ConvNetSpec((first, ReLU(), block, Pool("max", (2, 2), (2, 2)), Flatten(), linear), (2, 4, 4))


def kr_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``M[(o, c), j] = B[o, j] A[j, c]`` formed directly (not by onlynorm.linalg): vec_row(B diag(γ) A) = M γ."""
    return torch.einsum("oj,jc->ocj", B, A).reshape(B.shape[0] * A.shape[1], A.shape[0])


def expected_systems(spec: ConvNetSpec, construction: str, block: int) -> int:
    layers = spec.weighted()
    if construction == "conv":
        return len(layers)
    return sum(math.ceil(layer.weight.shape[1] / min(block, layer.weight.shape[1])) for layer in layers)


# ---------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cnn_plan_describes_the_built_network(method):
    spec = small_resnet()
    name, options = METHODS[method]
    construction = get_construction(name)
    net = onlynorm.random_normnet(spec, method=method, seed=0, **options)
    plan = construction.plan(spec, construction.check_options(options))
    assert net.meta.method == name
    # conv pair (stream), relu, residual, pool, flatten, linear pair (stream)
    assert plan.num_stages == len(net.layers) == (8 if name == "conv" else 6)
    assert [step.layer for step in plan.steps] == list(range(len(spec.weighted()))) == [0, 1, 2, 3, 4]
    # the nested layers sit in the residual stage (position 2 when each weighted layer is 1 stage, 3 when 2)
    res = 3 if name == "conv" else 2
    assert [step.at for step in plan.steps] == [(), (res, "body"), (res, "body"), (res, "shortcut"), ()]
    assert construction.plan_of(net, spec) == plan  # a built network gets its plan back from its metadata
    checked = 0
    for step, layer in zip(plan.steps, spec.weighted()):
        stages = plan.stages(net, step)
        assert [type(s) for s in stages] == [step.stage_type] * len(step.stages)
        w = layer.weight
        if name == "conv" and layer.type == "conv":
            N = w.numel()
            assert step.shapes == ((w.shape[1], N), (N, w.shape[0])) and step.details["N"] == N
            assert tuple(stages[0].conv.kernel_size) == tuple(w.shape[2:]) and stages[1].conv.kernel_size == (1, 1)
        elif name == "conv_deep":
            assert isinstance(stages[0], ConvStream) and step.shapes == ((w.shape[1], w.shape[0]),)
            assert step.details["blocks"] == len(stages[0].block_slices())
        else:
            continue
        checked += 1
    assert checked == (4 if name == "conv" else 5)  # the conv layers of a conv network; every layer of conv_deep


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cnn_plan_of_a_saved_network(method, tmp_path):
    spec = small_resnet()
    name, options = METHODS[method]
    net = onlynorm.random_normnet(spec, method=method, seed=0, **options)
    net.save(tmp_path / "net.safetensors")
    loaded = NormNet.load(tmp_path / "net.safetensors")
    construction = get_construction(name)
    assert construction.plan_of(loaded, spec) == construction.plan_of(net, spec)


def test_cnn_plan_of_names_the_first_mismatch():
    spec = small_resnet(channels=3)
    net = onlynorm.random_normnet(spec, seed=0)
    conv = get_construction("conv")
    wider = small_resnet(channels=4)
    with pytest.raises(InvalidNetworkError, match=r"^layer 0: expected stage 0 to map 2 → 72, found 2 → 54;"):
        conv.plan_of(net, wider)
    strided = small_resnet(stride=2)
    with pytest.raises(InvalidNetworkError, match=r"^layer 0: expected stage 0 to convolve with .*stride 2×2"):
        conv.plan_of(net, strided)
    flat = ConvNetSpec(spec.layers[:2] + spec.layers[3:], spec.in_shape)  # no residual block
    with pytest.raises(
        InvalidNetworkError,
        match=r"^expected a FixedOp\(maxpool\) stage at 3 for the target's maxpool, found ResidualStage;",
    ):
        conv.plan_of(net, flat)
    # solve_norms names it too, once the dims signature (which would catch it first) is gone
    net.meta = net.meta.replace(target_dims=None)
    with pytest.raises(InvalidNetworkError, match=r"expected stage 0 to map 2 → 72"):
        onlynorm.solve_norms(net, wider, (0.0, 1.0))


def test_conv_deep_plan_of_names_a_block_mismatch():
    spec = small_resnet()
    net = onlynorm.random_normnet(spec, method="deep", block=2, seed=0)
    net.meta = net.meta.replace(options={**net.meta.options, "block": 1})
    with pytest.raises(InvalidNetworkError, match=r"^layer 0: expected input blocks of 1, found 2$"):
        get_construction("conv_deep").plan_of(net, spec)


def test_legacy_conv_fixture_follows_its_plan():
    from pathlib import Path

    from onlynorm.targets.convert import load_target

    data = Path(__file__).parent / "data" / "v0_1"
    net, spec = NormNet.load(data / "cnn.safetensors"), load_target(data / "cnn_target.safetensors")
    plan = get_construction("conv").plan_of(net, spec)
    assert [step.stage_type for step in plan.steps] == [NormConv2d, NormLinear]
    assert [stage_at(net, p) for p in plan.steps[1].paths] == [net.layers[4], net.layers[5]]


# ---------------------------------------------------------------------------------------------- solve
def test_conv_pair_solve_records_typed_records():
    spec = small_resnet()
    f = onlynorm.reconstruct(spec, domain=(0.0, 1.0))
    records = f.meta.solve.records
    assert all(isinstance(r, SolveRecord) for r in records) and len(records) == 5
    assert [r.layer for r in records] == [0, 1, 2, 3, 4]
    assert [r.details.get("type") for r in records[:4]] == ["conv"] * 4
    assert all(r.exact and r.relative_residual < 1e-12 for r in records)
    assert onlynorm.verify(f, spec, samples=500).max_rel_error < 1e-9


# ---------------------------------------------------------------------------------------------- capacity
@pytest.mark.parametrize("method", sorted(METHODS))
def test_capacity_of_a_cnn_network(method):
    spec = small_resnet()
    name, options = METHODS[method]
    frozen = onlynorm.random_normnet(spec, method=method, seed=0, **options)
    report = onlynorm.capacity(frozen, spec)
    assert report.method == name
    assert len(report.systems) == expected_systems(spec, name, options.get("block", 1))
    assert report.expressible
    systems = get_construction(name).systems(frozen, spec)
    for s, (label, A, B, W) in zip(report.systems, systems):
        assert s.label == label
        assert s.rank == s.equations == W.numel() == int(torch.linalg.matrix_rank(kr_matrix(A, B)))
    labels = [s.label for s in report.systems]
    assert any(".body." in label for label in labels) and any(".shortcut." in label for label in labels)
    if name == "conv_deep":
        assert "layer 1 block 1 (conv at stage 2.body.0)" in labels  # c_in = 3 in blocks of 2: blocks 0 and 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cnn_systems_are_the_ones_the_solve_satisfies(method):
    spec = small_resnet()
    name, options = METHODS[method]
    f = onlynorm.reconstruct(spec, method=method, domain=(0.0, 1.0), **options)
    construction = get_construction(name)
    plan = construction.plan_of(f, spec)
    gammas = []
    for step in plan.steps:
        first = plan.stages(f, step)[0]
        if isinstance(first, ConvStream):
            gammas += [first.branch_norm.weight[units] for units, _ in first.block_slices()]
        else:
            gammas.append(first.norm.weight)
    systems = construction.systems(f, spec)
    assert len(systems) == len(gammas)
    for (label, A, B, W), gamma in zip(systems, gammas):
        realised = kr_matrix(A, B) @ gamma.detach()
        assert torch.allclose(realised, W.reshape(-1), atol=1e-10), label


@pytest.mark.parametrize("method", sorted(METHODS))
def test_capacity_of_a_rank_deficient_cnn_network(method):
    spec = small_resnet()
    name, options = METHODS[method]
    frozen = onlynorm.random_normnet(spec, method=method, seed=0, **options)
    # zero 5 rows of A in the first layer's (first block's) branch: 5 unknowns of its system lose their column
    with torch.no_grad():
        first = frozen.layers[0]
        kernel = first.branch.weight if isinstance(first, ConvStream) else first.conv.weight
        kernel[:5] = 0
    report = onlynorm.capacity(frozen, spec)
    broken = report.systems[0]
    _label, A, B, _W = get_construction(name).systems(frozen, spec)[0]
    assert int(torch.linalg.matrix_rank(kr_matrix(A, B))) == broken.rank == broken.equations - 5
    assert not broken.expressible and broken.residual > 1e-6
    assert not report.expressible
    assert all(s.expressible for s in report.systems[1:])
    assert "NOT exactly solvable" in dict(report.rows())[broken.label]


def test_capacity_reads_a_cnn_module_with_the_networks_image_shape():
    g = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    frozen = onlynorm.random_normnet(g, in_shape=(1, 4, 4), seed=0)
    report = onlynorm.capacity(frozen, g)  # no in_shape passed: the network knows it
    assert [s.equations for s in report.systems] == [2 * 9, 3 * 32] and report.expressible


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_capacity_of_a_cnn(method, tmp_path, capsys):
    spec = small_resnet()
    name, options = METHODS[method]
    spec.save(tmp_path / "target.safetensors")
    frozen = onlynorm.random_normnet(spec, method=method, seed=0, **options)
    frozen.save(tmp_path / "net.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["capacity", str(tmp_path / "net.safetensors"), str(tmp_path / "target.safetensors")])
    out = capsys.readouterr().out
    assert info.value.code == 0
    rows = [line for line in out.splitlines() if re.search(r"rank \d+/\d+", line)]
    assert len(rows) == expected_systems(spec, name, options.get("block", 1))
    assert out.count("solvable") == len(rows) and "NOT" not in out  # (rich wraps the verdict onto a 2nd line)
