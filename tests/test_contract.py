"""The construction contract: plans, typed records and metadata, option declarations, 0.1 files, and the
regressions found in review (each test here failed before its fix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import onlynorm
from onlynorm import Box, NormNet
from onlynorm.constructions import available_methods, get_construction
from onlynorm.errors import InvalidNetworkError, InvalidOptionError, OnlyNormError
from onlynorm.nets.records import NetMeta, SolveInfo, SolveRecord
from onlynorm.options import OptionSpec, check_scalar

from .conftest import random_mlp

DATA = Path(__file__).parent / "data" / "v0_1"
MLP_METHODS = {"width": {}, "lowrank": {}, "deep": {"block": 2}, "sparse": {"density": 0.9}}


# ---------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("method", sorted(MLP_METHODS))
def test_plan_describes_the_built_network(method):
    g = random_mlp([3, 4, 2], seed=1)
    spec = onlynorm.MLPSpec.from_module(g)
    construction = get_construction(method)
    options = construction.check_options(MLP_METHODS[method], spec.depth)
    plan = construction.plan(spec, options)
    net = onlynorm.random_normnet(g, method=method, seed=0, **MLP_METHODS[method])
    assert plan.num_stages == len(net.layers)
    assert [step.layer for step in plan.steps] == [0, 1]
    plan.check(net, spec)  # the built network follows its plan
    assert construction.plan_of(net, spec) == plan  # and a network gets its plan back from its metadata
    widths = [w for s in net.layers for w in s.widths()]
    if method != "deep":
        assert widths == [w for step in plan.steps for w in step.widths]


def test_plan_check_names_the_mismatch():
    g = random_mlp([3, 4, 2], seed=1)
    other = random_mlp([3, 5, 2], seed=1)
    net = onlynorm.random_normnet(g, method="lowrank", seed=0)
    net.meta = net.meta.replace(target_dims=None)  # as a hand-made network would: only the plan can tell
    with pytest.raises(InvalidNetworkError, match=r"layer 0: expected stage 2 to map 3 → 15, found 3 → 12"):
        onlynorm.solve_norms(net, other)


# ---------------------------------------------------------------------------------------------- records
@settings(max_examples=30, deadline=None)
@given(
    layer=st.integers(0, 50),
    residual=st.floats(0, 1e3),
    rel=st.floats(0, 10),
    exact=st.booleans(),
    rcond=st.one_of(st.none(), st.floats(1e-300, 1)),
    steps=st.one_of(st.none(), st.integers(0, 30)),
    low=st.floats(-1e6, 1e6),
    span=st.floats(1e-3, 1e6),
    seed=st.integers(0, 2**64 - 1),
)
def test_metadata_round_trips_through_json(layer, residual, rel, exact, rcond, steps, low, span, seed):
    record = SolveRecord(
        layer=layer,
        kind="square",
        residual=residual,
        relative_residual=rel,
        exact=exact,
        rcond=rcond,
        precision="mixed",
        steps=steps,
        details={"rank": 3},
    )
    info = SolveInfo(records=(record,), domain=Box(low, low + span, dim=2), notes=("a note",))
    meta = NetMeta(
        method="width",
        seed=seed,
        options={"hidden": [4]},
        target_dims=[2, 3],
        target_parameters=9,
        solve=info,
        extra={"ranks": [1]},
    )
    again = NetMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta and again.solve is not None
    assert again.solve.records[0] == record and again.solve.exact is exact


def test_relative_residual_has_one_definition_for_every_method():
    """‖Ŵ − W‖_F / ‖W‖_F recomputed independently from the solved network's own tensors, for every method."""
    g = random_mlp([4, 3], seed=2)
    W = g[0].weight.detach()
    for method, opts in MLP_METHODS.items():
        f = onlynorm.reconstruct(g, method=method, seed=0, **opts)
        with torch.no_grad():
            realised = _realised_weight(f, method)
        expected = float(torch.linalg.norm(realised - W) / torch.linalg.norm(W))
        record = f.meta.solve.records[0]
        assert record.relative_residual == pytest.approx(expected, rel=1e-3, abs=1e-15), method
        assert record.relative_residual < 1e-12


def _realised_weight(f: NormNet, method: str) -> torch.Tensor:
    """Ŵ from raw tensors: compose every stage's γ-scaled frozen weight (independent of the solver)."""
    if method == "deep":
        stage = f.layers[0]
        blocks = [
            r.weight @ (b.norm.weight.unsqueeze(1) * b.linear.weight) for b, r in zip(stage.branches, stage.readouts)
        ]
        return stage.norm.weight.unsqueeze(1) * torch.cat(blocks, dim=1)
    P = None
    for s in f.layers:
        GA = s.norm.weight.detach().unsqueeze(1) * s.linear.weight
        P = GA if P is None else GA @ P
    return P.detach()


def test_typed_metadata_refuses_tampered_fields(tmp_path):
    from onlynorm import _io

    f = onlynorm.reconstruct(random_mlp([2, 2]), seed=0)
    tensors = f.state_dict()
    for field_path, value, message in (
        (("meta", "solve", "domain"), "everywhere", "solve.domain"),
        (("meta", "solve", "notes"), {"a": 1}, "solve.notes"),
        (("meta", "solve"), [1, 2], "'solve' must be an object"),
        (("meta", "seed"), -3, "'seed' must be a non-negative integer"),
        (("meta", "target_dims"), "2,2", "target_dims"),
    ):
        doc = {
            "format": "onlynorm.normnet",
            "version": 1,
            "dtype": "float64",
            "architecture": f.architecture(),
            "meta": f.meta.to_dict(),
        }
        node = doc
        for key in field_path[:-1]:
            node = node[key]
        node[field_path[-1]] = value
        path = tmp_path / "tampered.safetensors"
        _io.write_tensors(path, tensors, metadata=doc)
        with pytest.raises(OnlyNormError, match=message):
            NormNet.load(path)


@pytest.mark.parametrize("method", ["width", "deep", "lowrank", "sparse"])
def test_files_written_by_0_1_still_load_and_verify(method):
    net = NormNet.load(DATA / f"{method}.safetensors")
    target = onlynorm.targets.load_target(DATA / "target.safetensors")
    assert net.method == method and net.meta.solve is not None and net.meta.solve.exact
    report = onlynorm.verify(net, target, samples=2000, certify=True)
    assert report.ok and report.certified and net.meta.solve.domain.to_dict()["high"] == [2.0] * 3


def test_cnn_files_and_norm_sets_written_by_0_1_still_load():
    net = NormNet.load(DATA / "cnn.safetensors")
    target = onlynorm.targets.load_target(DATA / "cnn_target.safetensors")
    assert onlynorm.verify(net, target, samples=500).passed
    sparse = NormNet.load(DATA / "sparse.safetensors")
    before = {k: v.clone() for k, v in sparse.norm_state().items()}
    with torch.no_grad():
        for p in sparse.norm_parameters():
            p.fill_(0.5)
    sparse.load_norms(DATA / "sparse.norms.safetensors")
    assert all(torch.equal(before[k], v) for k, v in sparse.norm_state().items())


# ---------------------------------------------------------------------------------------------- options
def test_check_scalar_message_format():
    with pytest.raises(InvalidOptionError, match=r"^hidden: expected an integer ≥ 1, found 2.5$"):
        check_scalar(2.5, "hidden", int, min_val=1)
    with pytest.raises(InvalidOptionError, match=r"^margin: expected a finite number > 0 and ≤ 1, found nan$"):
        check_scalar(float("nan"), "margin", float, min_val=0, include_min=False, max_val=1)
    with pytest.raises(InvalidOptionError, match=r"found True \(bool\)"):
        check_scalar(True, "block", int, min_val=1)
    assert check_scalar(4.0, "block", int, min_val=1) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden": 2.5}, "hidden: expected an integer ≥ 1, found 2.5"),
        ({"hidden": [4, 0]}, r"hidden\[1\]: expected an integer ≥ 1, found 0"),
        ({"hidden": [4]}, "hidden: expected one value per target layer \\(2\\), found 1"),
        ({"margin": float("nan")}, "margin: expected a finite number"),
        ({"seed": None}, "seed: expected an integer ≥ 0"),
        ({"seed": 2**64}, "seed: expected an integer ≥ 0 and ≤ 1.84467e\\+19"),
        ({"dtype": torch.int64}, "dtype: expected torch.float64 or torch.float32"),
        ({"in_shape": (1, 2)}, "in_shape: expected \\(channels, height, width\\)"),
        ({"method": 3}, "method: expected a string"),
        ({"frobnicate": 1}, "method 'width' got unknown option\\(s\\) \\['frobnicate'\\]"),
    ],
)
def test_api_arguments_are_validated_with_one_message_format(kwargs, message):
    with pytest.raises(InvalidOptionError, match=message):
        onlynorm.reconstruct(random_mlp([2, 3, 2]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(InvalidOptionError, match="device: 'cuda' was requested but CUDA is not available"):
        onlynorm.reconstruct(random_mlp([2, 2]), device="cuda")


def test_cli_flags_come_from_the_option_declarations():
    import inspect

    from onlynorm.cli.app import reconstruct

    declared = {spec.name for m in available_methods() for spec in get_construction(m).option_specs()}
    flags = {
        name
        for name, p in inspect.signature(reconstruct).parameters.items()
        if p.kind == inspect.Parameter.KEYWORD_ONLY
    }
    assert flags == declared and {"hidden", "rank", "block", "density", "margin"} <= declared
    assert OptionSpec("rank", int, min_val=1, per_layer=True).parse_text("2,3") == [2, 3]


def test_cli_takes_per_layer_ranks(tmp_path, capsys):
    from onlynorm.cli.app import main

    g = random_mlp([4, 4, 3], seed=3)
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "t.safetensors")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "reconstruct",
                str(tmp_path / "t.safetensors"),
                "--method",
                "lowrank",
                "--rank",
                "2,3",
                "--out",
                str(tmp_path / "n.safetensors"),
            ]
        )
    assert info.value.code == 0, capsys.readouterr().err
    assert NormNet.load(tmp_path / "n.safetensors").meta.options["rank"] == [2, 3]


def test_image_shaped_box_supplies_in_shape():
    g = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).double().eval()
    low = torch.zeros(1, 4, 4, dtype=torch.float64)
    box = Box(low, low + 1.0)
    f = onlynorm.reconstruct(g, domain=box, seed=0)
    assert f.in_shape == (1, 4, 4)
    assert onlynorm.verify(f, g, samples=500).passed


def test_errors_named_in_the_readme_are_exported():
    for name in (
        "SparsePatternError",
        "InvalidOptionError",
        "NotCertifiableError",
        "MemoryBudgetError",
        "SingularSystemError",
        "FileFormatError",
    ):
        assert issubclass(getattr(onlynorm, name), OnlyNormError)


# ---------------------------------------------------------------------------------------------- review fixes
def test_min_norm_exactness_is_decided_by_the_residual():
    """N > m·n with rank-deficient frozen weights (all-equal rows of A) cannot reach W: not exact."""
    g = random_mlp([2, 2], seed=4)
    frozen = onlynorm.random_normnet(g, hidden=8, seed=0)
    with torch.no_grad():
        frozen.layers[0].linear.weight.copy_(torch.ones(8, 2, dtype=torch.float64))
    f = onlynorm.solve_norms(frozen, g)
    record = f.meta.solve.records[0]
    assert record.kind == "min-norm" and record.relative_residual > 1e-3
    assert record.exact is False and f.summary().exact is False


def _negate(x):
    return -x


def test_sequential_runner_restores_the_callers_thread_count():
    from onlynorm.experiments.runner import run_trials

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_trials(_negate, [{"x": 3}], n_jobs=1) == [-3]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_cli_verify_low_alone_keeps_the_stored_high(tmp_path, capsys):
    from onlynorm.cli.app import main

    g = random_mlp([2, 3, 1], seed=5)
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "t.safetensors")
    onlynorm.reconstruct(g, domain=Box(0.0, 4.0), seed=0).save(tmp_path / "n.safetensors")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "verify",
                str(tmp_path / "n.safetensors"),
                str(tmp_path / "t.safetensors"),
                "--low",
                "1",
                "--samples",
                "200",
                "--certify",
            ]
        )
    assert info.value.code == 0, capsys.readouterr().err
    from onlynorm.cli.common import domain_from_options

    stored = Box(0.0, 4.0, dim=2)
    assert domain_from_options(1.0, None, stored).high.tolist() == [4.0, 4.0]


def test_memory_refusal_for_cnn_targets_suggests_only_what_works():
    from onlynorm.constructions import memory

    g = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).double().eval()
    memory.set_memory_limit("1M")
    try:
        with pytest.raises(onlynorm.MemoryBudgetError) as info:
            onlynorm.reconstruct(g, in_shape=(8, 6, 6))
    finally:
        memory.set_memory_limit(None)
    import re

    message = str(info.value)
    suggested = re.findall(r"method='(\w+)' \(~", message)
    assert all("cnn" in get_construction(m).target_kinds for m in suggested)  # never lowrank/sparse for a CNN
    assert "lowrank" not in message and "raise the limit" in message


def test_verify_certify_of_a_plain_module_is_a_clear_error():
    g = random_mlp([2, 2])
    with pytest.raises(InvalidNetworkError, match="certify=True needs a NormNet"):
        onlynorm.verify(g, g, samples=10, certify=True)


def test_capacity_of_a_zero_pattern_is_not_expressible():
    """A 1×1 sparse system whose mask zeroed B has rank 0 (condition ∞): nothing is reachable."""
    g = random_mlp([1, 1], seed=0)
    frozen = onlynorm.random_normnet(g, method="sparse", density=0.8, seed=0)
    with torch.no_grad():
        frozen.layers[1].linear.weight.zero_()
    assert not onlynorm.capacity(frozen, g).expressible


def test_structurally_singular_sparse_system_that_still_reaches_w_is_solved_exactly():
    """Found by hypothesis: the target's weight row equals a frozen row (same seed), so a pattern-singular system
    still reaches W. 0.1 refused it as "not expressible"; it is solved exactly (minimum norm) and says so."""
    g = random_mlp([3, 1], seed=19583)
    frozen = onlynorm.random_normnet(g, method="sparse", density=0.8, seed=19583)
    report = onlynorm.capacity(frozen, g)
    assert report.systems[0].structural_rank == 2 and report.expressible
    f = onlynorm.solve_norms(frozen, g)
    assert f.meta.solve.records[0].kind == "singular-consistent" and f.meta.solve.exact
    assert onlynorm.verify(f, g, samples=2000, certify=True).ok


def test_the_fit_report_is_typed_metadata_that_round_trips_and_is_validated(tmp_path):
    """``fit_norms`` stores its report as ``meta.fit`` (a FitReport, not an untyped extra key): it survives
    save/load as the same typed object, and a tampered report is refused with the field named."""
    from onlynorm import _io
    from onlynorm.nets.records import FitReport

    g = random_mlp([3, 4, 2], seed=2)
    frozen = onlynorm.random_normnet(g, hidden=[3, 3], seed=0)
    net, report = onlynorm.fit_norms(frozen, g, Box(0.0, 1.0), method="layerwise", seed=0)
    assert isinstance(net.meta.fit, FitReport) and net.meta.fit == report and "fit" not in net.meta.extra
    assert frozen.meta.fit is None  # the frozen network is untouched
    path = tmp_path / "fitted.safetensors"
    net.save(path)
    loaded = NormNet.load(path)
    assert loaded.meta.fit == report and loaded.meta.fit.phases[0].name == "layerwise"
    assert loaded.meta["fit"]["final_error"] == report.final_error  # the 0.1-style mapping view still reads it
    tensors, doc = _io.read_tensors(path)
    for key, value, message in (
        ("phases", "all of them", "'fit.phases' must be a list"),
        ("initial_error", "small", "'fit.initial_error' must be a number"),
        ("method", 3, "'fit.method' must be a string"),
    ):
        bad = json.loads(json.dumps(doc))
        bad["meta"]["fit"][key] = value
        _io.write_tensors(path, tensors, metadata=bad)
        with pytest.raises(OnlyNormError, match=message):
            NormNet.load(path)
    bad = json.loads(json.dumps(doc))
    bad["meta"]["fit"]["phases"][0]["iterations"] = "many"
    _io.write_tensors(path, tensors, metadata=bad)
    with pytest.raises(OnlyNormError, match=r"fit.phases\[\].iterations"):
        NormNet.load(path)
