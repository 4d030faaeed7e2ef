"""``method="deep", tied=1`` (one frozen draw per layer shared by every block) next to the untied default: exact
against independent forward passes of the target (MLP, conv, residual blocks, projection shortcuts, float32/float64,
block sizes), one shared solve per layer, shared tensors stored once, the memory guard's suggestion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm import Box, MemoryBudgetError, NormNet
from onlynorm.constructions.base import safe_margin
from onlynorm.constructions.memory import set_memory_limit
from onlynorm.constructions.tied import box_offsets
from onlynorm.errors import SingularSystemError
from onlynorm.linalg import solve_khatri_rao
from onlynorm.linalg_tied import shared_error, solve_khatri_rao_shared
from onlynorm.nets import ConvStream, ResidualStream, TiedConvStream, TiedResidualStream

# ---------------------------------------------------------------------------------------------- the shared solve


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 6), k=st.integers(1, 4), T=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_one_lu_solves_every_block_like_separate_solves(m, k, T, seed):
    gen = torch.Generator().manual_seed(seed)
    N = m * k
    A = torch.randn(N, k, generator=gen, dtype=torch.float64)
    B = torch.randn(m, N, generator=gen, dtype=torch.float64)
    W = torch.randn(T, m, k, generator=gen, dtype=torch.float64)
    for precision in ("float64", "mixed"):
        sol = solve_khatri_rao_shared(A, B, W, precision=precision)
        assert sol.gamma.shape == (T, N)
        for t in range(T):
            alone = solve_khatri_rao(A, B, W[t], precision="float64").gamma
            scale = 1 + float(alone.abs().max())
            assert float((sol.gamma[t] - alone).abs().max()) <= 1e-6 * scale / max(sol.rcond, 1e-6)
        realised = B @ (sol.gamma.unsqueeze(-1) * A)
        assert torch.allclose(realised, W, atol=1e-8 * (1 + float(W.abs().max())) / max(sol.rcond, 1e-3))
        assert sol.residual.shape == (T,) and float(sol.residual.max()) <= 1e-8 * (1 + float(W.abs().max())) / max(
            sol.rcond, 1e-3
        )
        assert sol.error_norm == pytest.approx(float(torch.linalg.norm(realised - W)), rel=1e-6, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 8), k=st.integers(1, 3), T=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_box_offsets_keep_every_unit_active_with_safe_margins_slack(N, k, T, seed):
    """The fused β of every block equals −zmin + safe_margin(…) computed per block from ``Γ_t A`` directly, and
    every unit's pre-activation is at least the slack on the box (checked at the box's corners)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(N, k, generator=gen, dtype=torch.float64)
    gamma = torch.randn(T, N, generator=gen, dtype=torch.float64)
    lo = torch.randn(T, k, generator=gen, dtype=torch.float64)
    hi = lo + torch.rand(T, k, generator=gen, dtype=torch.float64) * (torch.rand(()) < 0.8)  # some point boxes
    beta = box_offsets(A, gamma, lo, hi, 1e-3)
    GA = gamma.unsqueeze(-1) * A  # (T, N, k), the unfused form
    zmin = (GA.clamp(min=0) @ lo.unsqueeze(-1) + GA.clamp(max=0) @ hi.unsqueeze(-1)).squeeze(-1)
    zmax = (GA.clamp(min=0) @ hi.unsqueeze(-1) + GA.clamp(max=0) @ lo.unsqueeze(-1)).squeeze(-1)
    scale = (GA.abs() @ (torch.maximum(lo.abs(), hi.abs()) + 1).unsqueeze(-1)).squeeze(-1)
    want = -zmin + safe_margin(zmin, zmax, 1e-3, scale)
    assert torch.allclose(beta, want, rtol=1e-12, atol=1e-12 * (1 + float(want.abs().max())))
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * k).reshape(-1, k)
    x = lo.unsqueeze(1) + corners * (hi - lo).unsqueeze(1)  # (T, 2^k, k)
    z = torch.einsum("nk,tck->tcn", A, x) * gamma.unsqueeze(1) + beta.unsqueeze(1)
    assert bool((z > 0).all())


def test_the_exactness_check_is_the_residual_of_every_block():
    gen = torch.Generator().manual_seed(3)
    m, k, T = 3, 2, 4
    A = torch.randn(m * k, k, generator=gen, dtype=torch.float64)
    B = torch.randn(m, m * k, generator=gen, dtype=torch.float64)
    W = torch.randn(m, T, k, generator=gen, dtype=torch.float64).transpose(0, 1)  # (T, m, k), as the solve reads it
    gamma = torch.randn(T, m * k, generator=gen, dtype=torch.float64)
    E = shared_error(B, gamma, A, W)
    for t in range(T):
        assert torch.allclose(E[:, t], B @ torch.diag(gamma[t]) @ A - W[t], atol=1e-13)
    sol = solve_khatri_rao_shared(A, B, W, hold=torch.float32)  # γ rounded to float32: its residual is reported
    assert torch.equal(sol.gamma, sol.gamma.float().double())
    realised = torch.stack([B @ torch.diag(sol.gamma[t]) @ A for t in range(T)])
    assert torch.allclose(sol.residual, (realised - W).abs().amax(dim=(1, 2)), rtol=1e-6, atol=1e-15)
    assert float(sol.residual.max()) > 1e-12  # float32 rounding shows: the check is of the held γ


def test_a_singular_shared_system_is_refused_naming_the_layer():
    A = torch.ones(4, 2, dtype=torch.float64)  # rank-one rows: M has repeated columns
    B = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(SingularSystemError, match="layer 3"):
        solve_khatri_rao_shared(A, B, torch.randn(5, 2, 2, dtype=torch.float64), layer=3)


# ---------------------------------------------------------------------------------------------- MLP targets


def _mlp(dims: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def _mlp_forward(g: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The target by plain matmuls on its own parameters (independent of onlynorm)."""
    linears = [m for m in g if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        x = x @ lin.weight.T + lin.bias
        if i < len(linears) - 1:
            x = torch.relu(x)
    return x


@settings(max_examples=8, deadline=None)
@given(
    dims=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    block=st.integers(1, 4),
    tied=st.integers(0, 1),
    float32=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_mlp_deep_tied_and_untied_are_exact(dims, block, tied, float32, seed):
    g = _mlp(dims, seed)
    dtype = torch.float32 if float32 else torch.float64
    box = Box(-1.0, 2.0)
    f = onlynorm.reconstruct(g, method="deep", block=block, tied=tied, domain=box, seed=seed, dtype=dtype)
    assert all(isinstance(s, TiedResidualStream if tied else ResidualStream) for s in f.layers)
    x = Box(-1.0, 2.0, dim=dims[0]).sample(500, seed=seed)
    with torch.no_grad():
        want = _mlp_forward(g, x)
        got = f(x.to(dtype)).double()
    tol = 1e-9 if not float32 else 2e-3
    assert float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))
    assert f.meta.solve is not None
    # float32: γ rounded to float32 (relative 6e-8), amplified by the system's conditioning (pivot ratio)
    rcond = min(float(r.rcond) for r in f.meta.solve.records if r.rcond is not None)
    assert f.meta.solve.max_relative_residual <= (1e-10 if not float32 else 1e-6 / min(rcond, 1.0))


def test_tied_mlp_is_certified_and_stores_each_shared_tensor_once(tmp_path):
    g = _mlp([7, 5, 3], 0)
    f = onlynorm.reconstruct(g, method="deep", block=3, tied=True, domain=Box(0.0, 1.0))
    report = onlynorm.verify(f, g, samples=2000, certify=True)
    assert report.max_rel_error <= 1e-12 and report.certified and report.proven
    stage = f.layers[0]
    assert isinstance(stage, TiedResidualStream)
    assert tuple(stage.branch.weight.shape) == (15, 3) and tuple(stage.readout.weight.shape) == (5, 15)
    assert stage.rest is not None and tuple(stage.rest.weight.shape) == (5, 1)  # 7 = 3 + 3 + 1
    path = tmp_path / "tied.safetensors"
    f.save(path)
    loaded = NormNet.load(path)
    assert sorted(k for k in loaded.state_dict() if k.startswith("layers.0.") and "norm" not in k) == [
        "layers.0.branch.weight",
        "layers.0.readout.weight",
        "layers.0.rest.weight",
        "layers.0.rest_readout.weight",
    ]
    x = Box(0.0, 1.0, dim=7).sample(100)
    with torch.no_grad():
        assert torch.equal(loaded(x), f(x))
    assert onlynorm.solve_norms(loaded, g, Box(0.0, 1.0)).meta.options["tied"] == 1


def test_tied_frozen_network_is_far_smaller_than_untied():
    g = _mlp([64, 32, 10], 0)
    tied = onlynorm.random_normnet(g, method="deep", tied=1).summary()
    untied = onlynorm.random_normnet(g, method="deep").summary()
    assert tied.tunable_parameters == untied.tunable_parameters
    assert tied.frozen_parameters * 30 < untied.frozen_parameters


# ---------------------------------------------------------------------------------------------- CNN targets


class _Block(nn.Module):
    """A basic residual block; ``project`` gives it a strided 1×1 conv + BatchNorm shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, project: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if project
            else nn.Identity()
        )

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def _cnn(c: int, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.ReLU(),
        _Block(width, width, 1, project=False),
        _Block(width, width + 1, 2, project=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width + 1, 3),
    )
    with torch.no_grad():  # non-trivial folded BatchNorms
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double().eval()


@pytest.mark.parametrize(
    "tied, block, dtype",
    [(t, k, d) for t in (0, 1) for k, d in ((1, torch.float64), (2, torch.float32), (3, torch.float64))],
)
def test_resnet_like_cnn_tied_and_untied_are_exact(tied, block, dtype):
    g = _cnn(3, 4, seed=block)
    box = Box(0.0, 1.0)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(3, 6, 6), domain=box, tied=tied, block=block, dtype=dtype)
    streams = [m for m in f.modules() if isinstance(m, (ConvStream, TiedConvStream))]
    assert len(streams) == 7 and all(isinstance(s, TiedConvStream if tied else ConvStream) for s in streams)
    x = torch.rand(8, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(block))
    with torch.no_grad():
        want = g(x)  # the torch module itself: BatchNorm, Identity and projection shortcuts as written
        got = f(x.to(dtype)).double()
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))


@settings(max_examples=4, deadline=None)
@given(
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    block=st.integers(1, 4),
    paired=st.integers(0, 1),
    seed=st.integers(0, 100),
)
def test_tied_conv_layer_is_exact_and_certified(c_in, c_out, k, stride, block, paired, seed):
    torch.manual_seed(seed)
    size = 5
    out = (size + 2 * (k // 2) - k) // stride + 1
    g = nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2), nn.ReLU(), nn.Flatten(), nn.Linear(c_out * out * out, 2)
    ).double()
    box = Box(-1.0, 1.0)
    f = onlynorm.reconstruct(
        g, method="deep", in_shape=(c_in, size, size), domain=box, tied=1, block=block, paired=paired, seed=seed
    )
    report = onlynorm.verify(f, g, samples=300, seed=seed, certify=True)
    assert report.max_rel_error <= 1e-9
    assert report.certified and report.certified_bound <= 1e-8 * max(report.max_target_abs, 1.0)


def test_tied_conv_streams_over_chunks_of_blocks_with_the_same_bits():
    g = _cnn(6, 3, seed=0)
    f = onlynorm.reconstruct(g, method="deep", in_shape=(6, 6, 6), domain=Box(0.0, 1.0), tied=1)
    x = torch.rand(3, 6, 6, 6, dtype=torch.float64)
    stage = next(m for m in f.modules() if isinstance(m, TiedConvStream) and m.full == 6)
    one_block = 3 * x.shape[0] * stage.per_block * 36 * 8  # _chunk's bytes for one block per chunk
    with torch.no_grad():
        whole = f(x)
    saved = TiedConvStream.chunk_bytes
    try:
        for blocks in (1, 2, 4):  # chunks of 1, 1+2+2+1 and 1+4+1 blocks: the reused buffer, also part-filled
            TiedConvStream.chunk_bytes = blocks * one_block
            assert stage._chunk(x.shape[0], 36, 8) == blocks  # the chunking this case is about
            with torch.no_grad():
                chunked = f(x)
            tracked = f(x.clone().requires_grad_(True)).detach()  # autograd: no buffer, out-of-place
            assert torch.equal(chunked, tracked), blocks
            assert float((whole - chunked).abs().max()) <= 1e-12 * float(whole.abs().max())
    finally:
        TiedConvStream.chunk_bytes = saved


def test_memory_guard_suggests_tied_when_untied_does_not_fit():
    g = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 2)).double()
    set_memory_limit("20M")  # untied: ~43 MiB (32 systems of 288², 9,216 branch channels); tied: ~4 MiB
    try:
        with pytest.raises(MemoryBudgetError, match=r"method='deep', tied=True"):
            onlynorm.reconstruct(g, method="deep", in_shape=(32, 4, 4), domain=Box(0.0, 1.0))
        f = onlynorm.reconstruct(g, method="deep", in_shape=(32, 4, 4), domain=Box(0.0, 1.0), tied=True)
    finally:
        set_memory_limit(None)
    assert onlynorm.verify(f, g, samples=20).max_rel_error <= 1e-9


# ---------------------------------------------------------------------------------------------- frozen tensors without copies


@pytest.mark.parametrize(
    "method, options, in_shape",
    [("deep", {"tied": 1}, None), ("deep", {}, None), ("width", {}, None), ("deep", {"tied": 1}, (3, 6, 6))],
)
def test_solved_network_shares_the_frozen_tensors_of_its_source(method, options, in_shape):
    g = _cnn(3, 2, seed=0) if in_shape else _mlp([4, 3, 2], 0)
    frozen = onlynorm.random_normnet(g, method=method, in_shape=in_shape, **options)
    norms_before = [p.detach().clone() for p in frozen.norm_parameters()]
    solved = onlynorm.solve_norms(frozen, g, Box(0.0, 1.0))
    source = dict(frozen.named_parameters())
    frozen_names = {n for n, p in source.items() if not any(p is q for q in frozen.norm_parameters())}
    assert frozen_names
    for name, p in solved.named_parameters():
        if name in frozen_names:  # the very storage of the source: nothing was copied
            assert p.data_ptr() == source[name].data_ptr()
        else:  # γ, β are new tensors
            assert p.data_ptr() != source[name].data_ptr()
    for (name, b), (_, b0) in zip(solved.named_buffers(), frozen.named_buffers()):
        assert b.data_ptr() != b0.data_ptr(), name
    assert all(torch.equal(a, b) for a, b in zip(frozen.norm_parameters(), norms_before))  # source's γ, β unchanged


def test_clone_shares_frozen_tensors_by_default_and_deep_copies_on_request():
    net = onlynorm.random_normnet(_mlp([4, 3, 2], 0), method="deep", tied=1)
    weight = net.layers[0].branch.weight
    shallow, deep = net.clone(), net.clone(deep=True)
    assert shallow.layers[0].branch.weight.data_ptr() == weight.data_ptr()
    assert deep.layers[0].branch.weight.data_ptr() != weight.data_ptr()
    assert torch.equal(deep.layers[0].branch.weight, weight)
    converted = shallow.to(torch.float32)  # converting the clone leaves the source as it was
    assert converted.dtype == torch.float32 and net.dtype == torch.float64 and weight.dtype == torch.float64
    with torch.no_grad():
        deep.layers[0].branch.weight.zero_()
    assert bool(weight.abs().sum() > 0)


def test_torchvision_bottleneck_blocks_are_exact_tied_and_untied():
    """1×1 convs, the stride on the 3×3, a ``downsample`` Sequential, ``out += identity`` — the ResNet-50 block."""
    from onlynorm.demos.resnet_models import Bottleneck

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        Bottleneck(4, 2, stride=2, downsample=down),
        Bottleneck(8, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = model.double().eval()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    for tied in (0, 1):
        f = onlynorm.reconstruct(model, method="deep", in_shape=(3, 8, 8), domain=Box(0.0, 1.0), tied=tied)
        with torch.no_grad():
            want, got = model(x), f(x)
        assert float((got - want).abs().max()) <= 1e-9 * float(want.abs().max())
