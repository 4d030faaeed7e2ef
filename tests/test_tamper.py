"""Tamper suite: a certificate either refuses a tampered network or bounds its observed error.

For every construction, each kind of tensor a network file holds — γ, β, frozen weights, running mean, running
variance — is perturbed in the saved file by 1e-12, 1e-6 and 1e-3 (relative), singly and in compensating pairs
(γ with a β that hides the change at the box centre; a running mean with the β that cancels it exactly). The
network is loaded back and verified with ``certify=True`` on many points: it must be refused (not certified) or
its observed ``max |f − g|`` must lie within ``certified_bound + rounding_bound``. And ``verify --certify`` (the
report's ``ok``) must never pass a network whose sampled error exceeds the tolerance. Edits of the architecture
a file describes (an op, a conv's geometry, a ReLU) must be refused outright, and float32 networks (MLP and CNN)
must be bounded in float32.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import onlynorm
from onlynorm import Box, NormNet, _io
from onlynorm.errors import InvalidNetworkError
from onlynorm.nets import NormLinear
from onlynorm.nets.modules import inference_form

from .conftest import random_mlp

SAMPLES = 20_000
KINDS = ("gamma", "beta", "frozen", "running_mean", "running_var")
SIZES = (1e-12, 1e-6, 1e-3)


def _cnn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).double().eval()


def _networks():
    g = random_mlp([3, 5, 2], seed=7)
    box = Box(-1.0, 2.0)
    out = {
        m: (onlynorm.reconstruct(g, method=m, domain=box, seed=1, **o), g, box)
        for m, o in (("width", {}), ("deep", {"block": 2}), ("lowrank", {}), ("sparse", {"density": 0.95}))
    }
    cnn = _cnn()
    unit = Box(0.0, 1.0)
    out["conv"] = (onlynorm.reconstruct(cnn, in_shape=(1, 3, 3), domain=unit, seed=1), cnn, unit)
    out["conv-float32"] = (
        onlynorm.reconstruct(cnn, in_shape=(1, 3, 3), domain=unit, seed=1, dtype=torch.float32),
        cnn,
        unit,
    )
    out["conv_deep"] = (
        onlynorm.reconstruct(cnn, method="deep", in_shape=(1, 3, 3), domain=unit, seed=1, paired=0),
        cnn,
        unit,
    )
    out["width-float32"] = (onlynorm.reconstruct(g, domain=box, seed=1, dtype=torch.float32), g, box)
    return out


NETWORKS = _networks()


def _names(net: NormNet, kind: str) -> list[str]:
    norm = set(net.norm_state())
    state = net.state_dict()
    if kind == "gamma":
        return [k for k in norm if k.endswith(".weight")]
    if kind == "beta":
        return [k for k in norm if k.endswith(".bias")]
    if kind == "frozen":
        return [k for k in state if k not in norm and k.endswith("weight")]
    return [k for k in state if k.endswith(kind)]


def _tampered(tmp_path, net: NormNet, edits: dict[str, tuple[int, float]]) -> NormNet:
    """Save ``net``, change entries of its tensors *in the file*, load it back."""
    path = tmp_path / "net.safetensors"
    net.save(path)
    tensors, doc = _io.read_tensors(path)
    for name, (index, delta) in edits.items():
        flat = tensors[name].reshape(-1)
        flat[index] = flat[index] + delta
    _io.write_tensors(path, tensors, metadata=doc)
    return NormNet.load(path)


def _check(net: NormNet, g, box: Box, counts: dict) -> bool:
    """Refused or bounded; returns whether it was certified."""
    report = onlynorm.verify(net, g, domain=box, samples=SAMPLES, seed=3, certify=True)
    if report.certified:
        counts["bounded"] += 1
        assert report.max_abs_error <= report.certified_bound + report.rounding_bound, report
    else:
        counts["refused"] += 1
        assert report.proven is False and not report.ok
    if report.ok:  # verify --certify exits 0 only within the tolerance
        assert report.max_rel_error <= report.tolerance
    return bool(report.certified)


@pytest.mark.parametrize("method", sorted(NETWORKS))
def test_single_edits_are_refused_or_bounded(method, tmp_path):
    net, g, box = NETWORKS[method]
    counts = {"bounded": 0, "refused": 0}
    statistics_edits = 0
    gen = torch.Generator().manual_seed(0)
    for kind, size in itertools.product(KINDS, SIZES):
        names = _names(net, kind)
        assert names, f"{method} has no {kind} tensor"
        name = names[int(torch.randint(len(names), (1,), generator=gen))]
        t = net.state_dict()[name]
        index = int(torch.randint(t.numel(), (1,), generator=gen))
        scale = max(float(t.reshape(-1)[index].abs()), 1.0)
        tampered = _tampered(tmp_path, net, {name: (index, size * scale)})
        certified = _check(tampered, g, box, counts)
        if kind.startswith("running") and not torch.equal(tampered.state_dict()[name], t):
            statistics_edits += 1
            assert not certified, f"{kind} edited by {size} was certified"  # never the constructions' form
    # (a float32 running variance of 1 + 1e-12 rounds back to 1: that edit does not exist, and is certified)
    assert statistics_edits >= 2 * len(SIZES) - 1 and counts["refused"] >= statistics_edits
    assert counts["bounded"] > 0  # and γ/β/weight edits are bounded, not all refused


@pytest.mark.parametrize("method", ["width", "deep", "lowrank", "sparse", "width-float32"])
def test_compensating_pairs_are_refused_or_bounded(method, tmp_path):
    net, g, box = NETWORKS[method]
    counts = {"bounded": 0, "refused": 0}
    first = net.layers[0].branches[0] if method == "deep" else net.layers[0]
    prefix = "layers.0.branches.0." if method == "deep" else "layers.0."
    centre = ((box.low + box.high) / 2).expand(first.linear.in_features).to(net.dtype)
    z = first.linear(centre).detach()  # the unit's input at the box centre
    gamma = first.norm.weight.detach()
    for size in SIZES:
        k = 0
        # γ_k (1 + δ) with β_k − δ γ_k z_k: the same output at the centre, different elsewhere
        edits = {
            prefix + "norm.weight": (k, size * float(gamma[k])),
            prefix + "norm.bias": (k, -size * float(gamma[k] * z[k])),
        }
        _check(_tampered(tmp_path, net, edits), g, box, counts)
        # running mean + δ with β + δ γ: the very same function, but not the form the certificate covers
        edits = {prefix + "norm.running_mean": (k, size), prefix + "norm.bias": (k, size * float(gamma[k]))}
        _check(_tampered(tmp_path, net, edits), g, box, counts)
    assert counts["refused"] >= len(SIZES) and counts["bounded"] >= 1  # a 1e-3 γ edit may also be refused


def test_eps_and_training_mode_are_not_certified():
    from onlynorm.certify import certifiability_problems

    net, g, box = NETWORKS["width"]
    bn = net.norm_modules()[0]
    bn.eps = 1e-3
    assert any("eps" in p for p in certifiability_problems(net))
    bn.eps = 0.0
    net.batch_statistics = True
    net.train()
    try:
        assert any("batch statistics" in p for p in certifiability_problems(net))
    finally:
        net.batch_statistics = False
        net.eval()
    assert certifiability_problems(net) == []


def test_non_finite_parameters_are_never_certified():
    net, g, box = NETWORKS["width"]
    bad = net.clone()
    with torch.no_grad():
        bad.norm_modules()[0].weight[0] = float("nan")
    report = onlynorm.verify(bad, g, domain=box, samples=100, certify=True)
    assert report.certified is False and not report.ok and any("NaN" in n for n in report.notes)


def test_float32_rounding_bound_covers_the_observed_error():
    net, g, box = NETWORKS["width-float32"]
    report = onlynorm.verify(net, g, domain=box, samples=SAMPLES, certify=True)
    assert report.certified and report.max_abs_error > 0
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    assert report.rounding_bound > 1e-9  # float32 arithmetic, not float64's 1e-13 (0.1 reported 7e-13)


def test_cli_verify_certify_exits_1_when_the_bound_exceeds_the_tolerance(tmp_path, capsys):
    """A γ edited with a compensating β passes the sampled check at one point; the certificate's bound does not
    meet the tolerance, so the exit code is 1 with the failing check named."""
    from onlynorm.cli.app import main

    net, g, box = NETWORKS["width"]
    first = net.layers[0]
    centre = ((box.low + box.high) / 2).expand(first.linear.in_features).to(net.dtype)
    z = first.linear(centre).detach()
    gamma = float(first.norm.weight.detach()[0])
    tampered = _tampered(
        tmp_path,
        net,
        {"layers.0.norm.weight": (0, 1e-3 * gamma), "layers.0.norm.bias": (0, -1e-3 * gamma * float(z[0]))},
    )
    sampled = onlynorm.verify(tampered, g, samples=1, certify=True)
    tolerance = 2 * sampled.max_rel_error  # the sampled check passes at this tolerance...
    report = onlynorm.verify(tampered, g, samples=1, certify=True, tolerance=tolerance)
    assert report.passed and report.certified
    assert not report.proven  # ...but the proven bound does not meet it
    tampered.save(tmp_path / "t.safetensors")
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "g.safetensors")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "verify",
                str(tmp_path / "t.safetensors"),
                str(tmp_path / "g.safetensors"),
                "--samples",
                "1",
                "--certify",
                "--tolerance",
                repr(tolerance),
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 1 and "the certified bound" in err and "exceeds the tolerance" in err


@pytest.mark.parametrize("method", ["width", "deep"])
def test_float32_cnn_is_bounded_in_float32(method):
    """A float32 CNN is certified with its own dtype's rounding: the bound covers what float32 evaluation does,
    and lies far above float64's (the first version refused float32 CNNs rather than under-bound them)."""
    cnn, box = _residual_cnn(), Box(-1.0, 1.0)
    f = onlynorm.reconstruct(cnn, method=method, in_shape=(2, 4, 4), domain=box, seed=2, dtype=torch.float32)
    report = onlynorm.verify(f, cnn, domain=box, samples=SAMPLES, seed=4, certify=True)
    assert report.certified is True, report.notes
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    assert report.max_abs_error > 1e-9  # float32 arithmetic really happened
    f64 = onlynorm.reconstruct(cnn, method=method, in_shape=(2, 4, 4), domain=box, seed=2)
    report64 = onlynorm.verify(f64, cnn, domain=box, samples=500, seed=4, certify=True)
    assert report64.certified is True and report.rounding_bound > 1e3 * report64.rounding_bound


def _residual_cnn() -> nn.Module:
    """Conv, a residual block with a projection shortcut, average pooling and a linear head."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 1))
            self.short = nn.Conv2d(2, 3, 1)

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    torch.manual_seed(9)
    return (
        nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), Block(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("edit", ["relu", "dilation", "pool", "output_relu"])
def test_structural_edits_of_a_cnn_file_are_refused(edit, tmp_path):
    """The certificate checks the network's structure against the target: a file whose ops or geometry were
    edited computes another function and must never be certified against the target."""
    net, g, box = NETWORKS["conv"]
    if edit == "dilation":  # a 3×3 conv with padding 1: padding 2 and dilation 2 keep every shape
        torch.manual_seed(2)
        g = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2)).double().eval()
        net = onlynorm.reconstruct(g, in_shape=(1, 3, 3), domain=box, seed=1)
    path = tmp_path / "net.safetensors"
    net.save(path)
    tensors, doc = _io.read_tensors(path)
    assert doc is not None
    stages = doc["architecture"]
    assert [s["kind"] for s in stages[:4]] == ["norm_conv2d", "norm_conv2d", "op", "op"] and stages[2]["op"] == "relu"
    if edit == "relu":  # the target's ReLU became a Flatten
        stages[2]["op"] = "flatten"
    elif edit == "dilation":
        stages[0].update(padding=[2, 2], dilation=[2, 2])
    elif edit == "output_relu":  # the last stage (the network's output) clipped at 0
        assert stages[-1]["kind"] == "norm_linear" and stages[-1]["relu"] is False
        stages[-1]["relu"] = True
    else:
        stages[2]["op"] = "maxpool"
        stages[2].update(kernel=[1, 1], stride=[1, 1], padding=[0, 0])
    _io.write_tensors(path, tensors, metadata=doc)
    tampered = NormNet.load(path)  # a well-formed file: only the certificate can tell it is not the target's
    with torch.no_grad():
        x = torch.rand(64, 1, 3, 3, dtype=torch.float64)
        assert not torch.allclose(tampered(x), net(x))  # the edit really changed the function
    with pytest.raises(onlynorm.OnlyNormError, match="expected|differ|must"):
        onlynorm.verify(tampered, g, domain=box, samples=100, certify=True)


# ---------------------------------------------------------------------- adversarially maximised error vs the bound
def _adversarial_error(net: NormNet, g, box: Box, steps: int = 40, starts: int = 24) -> float:
    """``max |f − g|`` found by attacking the bound: every vertex of the box (or 512 random ones), then projected
    sign-gradient ascent on ``max_j |f_j − g_j|`` from random starts and the best vertices (``f`` in its dtype,
    ``g`` in float64), keeping the worst point ever evaluated."""
    in_shape = net.in_shape
    n = net.in_features if in_shape is None else int(torch.tensor(in_shape).prod())
    lo, hi = box.low.expand(n).double(), box.high.expand(n).double()
    gen = torch.Generator().manual_seed(11)

    def error(x: torch.Tensor) -> torch.Tensor:
        xs = x if in_shape is None else x.reshape(x.shape[0], *in_shape)
        return (net(xs.to(net.dtype)).double() - g(xs)).abs().flatten(1).amax(1)

    if n <= 9:
        bits = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n)), dtype=torch.float64)
    else:
        bits = torch.randint(0, 2, (512, n), generator=gen).double()
    vertices = lo + (hi - lo) * bits
    with torch.no_grad():
        at_vertices = error(vertices)
    worst = float(at_vertices.max())
    best = vertices[at_vertices.argsort(descending=True)[: starts // 2]]
    x = torch.cat([best, lo + (hi - lo) * torch.rand(starts - best.shape[0], n, generator=gen, dtype=torch.float64)])
    for t in range(steps):
        x = x.detach().requires_grad_(True)
        e = error(x)
        worst = max(worst, float(e.detach().max()))
        (grad,) = torch.autograd.grad(e.sum(), x)
        step = (hi - lo) * 0.05 * (0.9**t)
        x = torch.minimum(torch.maximum(x + step * grad.sign(), lo), hi)
    with torch.no_grad():
        return max(worst, float(error(x).max()))


def _attacked(net: NormNet, g, box: Box) -> tuple[float, object]:
    report = onlynorm.verify(net, g, domain=box, samples=2000, seed=5, certify=True)
    with torch.enable_grad():
        found = _adversarial_error(net, g, box)
    return found, report


@pytest.mark.parametrize("method", sorted(NETWORKS))
def test_bound_holds_at_adversarial_points(method, tmp_path):
    """The certified + rounding bound is never below the error an attack finds — for the network as built and
    for γ/β edits (a γ with the β that hides it at the box centre, and a bare β edit) that leave it certified."""
    net, g, box = NETWORKS[method]
    state = net.state_dict()
    gammas, betas = _names(net, "gamma"), _names(net, "beta")
    name_g, name_b = sorted(gammas)[0], sorted(betas)[-1]
    g0 = float(state[name_g].reshape(-1)[0])
    candidates = [net]
    for size in (1e-9, 1e-5):
        candidates.append(_tampered(tmp_path, net, {name_g: (0, size * g0), name_b: (0, size)}))
        candidates.append(_tampered(tmp_path, net, {name_b: (0, size * max(1.0, abs(float(state[name_b][0]))))}))
    bounded = 0
    for candidate in candidates:
        found, report = _attacked(candidate, g, box)
        if report.certified:
            bounded += 1
            bound = report.certified_bound + report.rounding_bound
            assert found <= bound, (method, found, report.certified_bound, report.rounding_bound)
            if report.ok:  # "exact" is never claimed for what an attack shows to be off
                assert found <= report._total_tolerance() * report.max_target_abs * 1.0001
    assert bounded >= 3


def test_tampered_distance_bound_is_tight_not_only_valid():
    """The distance bound (one interval step on ΔW h + Δb) stays within a small factor of the attacked error for
    a β edit, so ``bounded`` reports what is there instead of a vacuous number."""
    net, g, box = NETWORKS["width"]
    name = sorted(_names(net, "beta"))[-1]  # an output-stage β: shifts one output by exactly this much
    tampered = net.clone()
    with torch.no_grad():
        dict(tampered.named_parameters())[name].reshape(-1)[0] += 1e-5
    found, report = _attacked(tampered, g, box)
    assert report.certified and report.outcome == "bounded"
    assert found <= report.certified_bound + report.rounding_bound <= 3 * found


@pytest.mark.parametrize("method", ["width", "deep"])
def test_float32_overflow_is_not_certified(method, tmp_path):
    """A float32 network whose intermediates reach finfo.max at a vertex of the box (f = inf there)
    is never certified, and the note says why; the same network on a huge box that stays in range is bounded
    and the bound covers the attacked error."""
    g = random_mlp([3, 5, 2], seed=7)
    box = Box(0.0, 1e34)
    f = onlynorm.reconstruct(g, method=method, domain=box, seed=1, dtype=torch.float32)
    if method == "width":  # (deep's float32 margins do not survive this box: not certified, for that reason)
        found, report = _attacked(f, g, box)
        assert report.outcome == "exact" and found <= report.certified_bound + report.rounding_bound
    big = f.clone()
    with torch.no_grad():  # the first frozen map scaled by 1e5: A x reaches ~1e39 > 3.4e38 at the far vertex
        big.state_dict()[_names(big, "frozen")[0]].mul_(1e5)
    vertex = box.high.expand(3).reshape(1, -1).float()
    with torch.no_grad():
        assert not bool(torch.isfinite(big(vertex)).all())  # f really is inf/NaN at the corner
    report = onlynorm.verify(big, g, domain=box, samples=200, certify=True)
    assert report.certified is False and report.outcome == "not proven" and not report.ok
    assert any("overflow" in note for note in report.notes), report.notes


# ---------------------------------------------------------------------- module state the certificate does not model
# Tampering through the public module tree, by type: hooks, subclassed modules, instance-patched forwards, a bias on a
# frozen layer, a BatchNorm eps, circular padding — each changes what torch computes; none may be certified.
def _first(net: nn.Module, cls: type[nn.Module]) -> nn.Module:
    return next(m for m in net.modules() if type(m) is cls)


class _LoudLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.5


def _hook(net):
    _first(net, nn.Linear).register_forward_hook(lambda m, i, o: o * 1.5)


def _pre_hook(net):
    _first(net, NormLinear).register_forward_pre_hook(lambda m, args: (args[0] + 0.5,))


def _bias(net):
    lin = _first(net, nn.Linear)
    lin.bias = nn.Parameter(torch.full((lin.out_features,), 0.5, dtype=lin.weight.dtype), requires_grad=False)


def _eps(net):
    _first(net, nn.BatchNorm1d).eps = 0.3


def _subclass(net):
    stage = _first(net, NormLinear)
    old = stage.linear
    new = _LoudLinear(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
    new.weight = old.weight
    stage.linear = new


def _instance_forward(net):
    stage = _first(net, NormLinear)
    original = stage.forward
    stage.forward = lambda x: original(x) * 1.5


def _circular(net):
    _first(net, nn.Conv2d).padding_mode = "circular"


def _conv_bias(net):
    conv = _first(net, nn.Conv2d)
    conv.bias = nn.Parameter(torch.full((conv.out_channels,), 0.5, dtype=conv.weight.dtype), requires_grad=False)


MLP_TAMPERS = {
    "forward hook": _hook,
    "forward pre-hook": _pre_hook,
    "bias on a frozen Linear": _bias,
    "BatchNorm eps": _eps,
    "subclassed Linear": _subclass,
    "instance forward": _instance_forward,
}
CNN_TAMPERS = {"circular padding": _circular, "bias on a frozen Conv2d": _conv_bias, "BatchNorm eps": _eps}


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


@pytest.mark.parametrize("method", ["width", "deep", "lowrank"])
@pytest.mark.parametrize("tamper", sorted(MLP_TAMPERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_certificate_refuses_module_state_it_does_not_model_mlp(method, tamper, dtype):
    g = random_mlp([3, 5, 2], seed=1)
    f = onlynorm.reconstruct(g, method=method, dtype=dtype, seed=0)
    assert onlynorm.verify(f, g, samples=2000, certify=True).certified  # untampered: proven
    MLP_TAMPERS[tamper](f)
    _refused(f, g, dtype)


@pytest.mark.parametrize("method", ["conv", "deep"])
@pytest.mark.parametrize("tamper", sorted(CNN_TAMPERS))
def test_the_certificate_refuses_module_state_it_does_not_model_cnn(method, tamper):
    g = _cnn()
    options = {"paired": 0} if method == "deep" else {}
    f = onlynorm.reconstruct(g, in_shape=(1, 4, 4), method=method, **options)
    if tamper == "BatchNorm eps":
        _first(f, nn.BatchNorm2d).eps = 0.3
    else:
        CNN_TAMPERS[tamper](f)
    try:
        _refused(f, g, torch.float64, in_shape=(1, 4, 4))
    except InvalidNetworkError as exc:  # a stream refuses to run with state its forward does not evaluate
        assert method == "deep" and "conv_stream" in str(exc) and tamper != "BatchNorm eps"


def _refused(f: NormNet, g: nn.Module, dtype: torch.dtype, in_shape=None) -> None:
    """The tampered network really computes something else, and the certificate does not claim it."""
    before = {k: v.clone() for k, v in f.state_dict().items()}
    eps_before = [m.eps for m in f.modules() if isinstance(m, _BatchNorm)]
    x = torch.rand(256, *(in_shape or (g[0].in_features,)), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        true_error = float((f(x.to(dtype)).double() - g(x)).abs().max())
    assert true_error > 1e-3
    report = onlynorm.verify(f, g, samples=500, certify=True)
    assert report.certified is False and report.proven is False and not report.ok
    assert any("not certifiable" in n for n in report.notes), report.notes
    # verify changed nothing: weights, buffers, eps
    assert all(torch.equal(before[k], v) for k, v in f.state_dict().items())
    assert [m.eps for m in f.modules() if isinstance(m, _BatchNorm)] == eps_before


def test_verify_leaves_eps_and_modes_alone():
    """The reproduced case: eps = 1e-2 on every BatchNorm; verify used to reset it to 0 and certify 1.4e-12."""
    g = random_mlp([10, 20, 20, 3], seed=3)
    f = onlynorm.reconstruct(g, seed=0)
    for m in f.modules():
        if isinstance(m, _BatchNorm):
            m.eps = 1e-2
    f.train()
    report = onlynorm.verify(f, g, samples=2000, certify=True)
    assert report.max_abs_error > 1e-3 and report.certified is False
    assert f.training and all(m.eps == 1e-2 for m in f.modules() if isinstance(m, _BatchNorm))
    f.eval()
    assert all(m.eps == 1e-2 for m in f.modules() if isinstance(m, _BatchNorm))


def test_batch_statistics_mode_gives_back_the_exact_eps():
    f = onlynorm.reconstruct(random_mlp([3, 4, 2], seed=0))
    f.batch_statistics = True
    f.train()
    assert all(m.eps > 0 and m.training for m in f.norm_modules())
    with inference_form(f):
        assert all(not m.training for m in f.norm_modules())
    assert all(m.eps > 0 and m.training for m in f.norm_modules())  # restored exactly, eps included
    f.eval()
    assert all(m.eps == 0.0 and not m.training for m in f.norm_modules())
