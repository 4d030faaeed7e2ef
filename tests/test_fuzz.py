"""Fuzz the file loaders and the CLI with random and truncated inputs: never a traceback, never a partial file."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onlynorm
from onlynorm import InvalidTargetError, MLPSpec, NormNet
from onlynorm.cli.app import main

from .conftest import random_mlp


def _cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
    return info.value.code, err.getvalue()


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    g = random_mlp([3, 4, 2], seed=0)
    MLPSpec.from_module(g).save(d / "target.safetensors")
    onlynorm.reconstruct(g).save(d / "net.safetensors")
    return {"target": (d / "target.safetensors").read_bytes(), "net": (d / "net.safetensors").read_bytes()}


@settings(max_examples=40)
@given(data=st.data())
def test_truncated_or_corrupted_files_are_refused_cleanly(valid_files, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["target", "net"]))
    blob = valid_files[kind]
    mode = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if mode == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif mode == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:pos] + bytes([blob[pos] ^ data.draw(st.integers(1, 255))]) + blob[pos + 1 :]
    else:
        blob = data.draw(st.binary(max_size=300))
    d = tmp_path_factory.mktemp("fuzz")
    path = d / f"{kind}.safetensors"
    path.write_bytes(blob)
    loader = MLPSpec.load if kind == "target" else NormNet.load
    try:
        loader(path)
    except onlynorm.OnlyNormError as exc:
        assert str(exc) and "\n" not in str(exc)
    # whatever the loader decided, the CLI answers with exit 0/1/2 and no traceback, and leaves no partial file
    out = d / "out.safetensors"
    if kind == "target":
        code, err = _cli(["reconstruct", path, "--out", out])
    else:
        (d / "t.safetensors").write_bytes(valid_files["target"])
        code, err = _cli(["verify", path, d / "t.safetensors", "--samples", "200"])
    assert code in (0, 1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1
        assert not out.exists()
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]


@settings(max_examples=30)
@given(
    keys=st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=4),
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=4),
)
def test_arbitrary_state_dicts_either_parse_or_raise_target_errors(keys, shapes):
    import torch

    state = {k: torch.zeros(tuple(s)) for k, s in zip(keys, shapes)}
    try:
        spec = MLPSpec.from_state_dict(state)
    except InvalidTargetError as exc:
        assert "\n" not in str(exc)
    else:
        assert spec.depth >= 1 and all(w.ndim == 2 for w in spec.weights)


def test_unwritable_output_directory(tmp_path):
    MLPSpec.from_module(random_mlp([2, 3, 1])).save(tmp_path / "t.safetensors")
    code, err = _cli(["reconstruct", tmp_path / "t.safetensors", "--out", tmp_path / "missing" / "n.safetensors"])
    assert code == 2 and "does not exist" in err
