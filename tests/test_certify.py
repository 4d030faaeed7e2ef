"""Certified equivalence over the whole box: exact reconstructions certify, a switched-off unit does not."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import onlynorm
from onlynorm import Box
from onlynorm.domain import interval_bounds

from .conftest import random_mlp


@given(
    depth=st.integers(1, 3),
    width=st.integers(1, 8),
    seed=st.integers(0, 1000),
    low=st.floats(-3, 2),
    span=st.floats(0.1, 5),
)
def test_exact_reconstructions_certify_with_a_tiny_bound(depth, width, seed, low, span):
    dims = [width] * (depth + 1)
    g = random_mlp(dims, seed=seed)
    box = Box(low, low + span)
    f = onlynorm.reconstruct(g, domain=box, seed=seed)
    report = onlynorm.verify(f, g, domain=box, samples=2000, certify=True)
    assert report.certified is True
    out_scale = max(float(interval_bounds(onlynorm.MLPSpec.from_module(g), box.expand(width))[-1][1].abs().max()), 1.0)
    assert report.certified_bound <= 1e-10 * out_scale
    # the sampled error is consistent with the certificate plus floating-point evaluation
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound


def test_one_unit_switched_off_somewhere_in_the_box_is_not_certified():
    g = random_mlp([3, 4, 2], seed=5)
    box = Box(-1.0, 1.0, dim=3)
    f = onlynorm.reconstruct(g, domain=box)
    first = f.layers[0]
    A, gamma = first.linear.weight, first.norm.weight
    z = gamma.unsqueeze(1) * A
    zmin = z.clamp(min=0) @ box.low + z.clamp(max=0) @ box.high
    with torch.no_grad():  # unit 0 now dips just below zero at one vertex of the box
        first.norm.bias[0] = -zmin[0] - 1e-6
    report = onlynorm.verify(f, g, domain=box, samples=2000, certify=True)
    assert report.certified is False and report.certified_bound == float("inf")
    assert any("layer 0, stage 0: 1 unit(s) may switch off" in n for n in report.notes)


def test_certificate_is_only_for_the_box_it_was_built_for():
    g = random_mlp([3, 5, 2], seed=6)
    f = onlynorm.reconstruct(g, domain=Box(0.0, 1.0))
    assert onlynorm.verify(f, g, samples=500, certify=True).certified
    wider = onlynorm.verify(f, g, domain=Box(-3.0, 4.0), samples=5000, certify=True)
    assert wider.certified is False


def test_approximate_reconstruction_certifies_its_true_distance():
    g = random_mlp([3, 4, 2], seed=7)
    f = onlynorm.reconstruct(g, hidden=[6, 4])  # least squares: not exact
    report = onlynorm.verify(f, g, samples=20_000, certify=True)
    assert report.certified is True  # units stay active; the bound measures the LS error
    assert report.max_abs_error <= report.certified_bound + report.rounding_bound
    assert report.certified_bound > 1e-6 and not report.passed
    assert report.outcome == "bounded" and report.proven is False  # a bound holds; equality is not claimed
    assert dict(report.rows())["outcome"] == "bounded"


def test_cli_verify_certify(tmp_path, capsys):
    from onlynorm.cli.app import main

    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=8)).save(tmp_path / "t.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "n.safetensors")])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        main(
            [
                "verify",
                str(tmp_path / "n.safetensors"),
                str(tmp_path / "t.safetensors"),
                "--certify",
                "--samples",
                "1000",
            ]
        )
    out = capsys.readouterr().out
    assert info.value.code == 0 and "a bound holds on the whole box" in out
    assert "outcome" in out and "exact" in out and "]^3" in out and "metadata" in out  # which box, and whence
