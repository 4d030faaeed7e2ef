"""The command line: round trip, exit codes, one-line errors, atomic outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from onlynorm import MLPSpec, NormNet
from onlynorm.cli.app import main

from .conftest import random_mlp


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


@pytest.fixture
def target_file(tmp_path):
    path = tmp_path / "target.safetensors"
    MLPSpec.from_module(random_mlp([4, 6, 3], seed=1)).save(path)
    return path


def test_reconstruct_then_verify_round_trip(target_file, tmp_path, capsys):
    out = tmp_path / "net.safetensors"
    code, stdout, _ = run(
        ["reconstruct", target_file, "--out", out, "--seed", "4", "--low", "0", "--high", "5"], capsys
    )
    assert code == 0 and out.exists()
    assert "width" in stdout and "exact" in stdout
    net = NormNet.load(out)
    assert net.meta["seed"] == 4 and net.meta["solve"]["domain"]["high"] == [5.0] * 4
    code, stdout, _ = run(["verify", out, target_file, "--samples", "5000"], capsys)
    assert code == 0 and "within tolerance" in stdout and "yes" in stdout


def test_verify_exits_1_when_networks_disagree(target_file, tmp_path, capsys):
    out = tmp_path / "net.safetensors"
    assert run(["reconstruct", target_file, "--out", out], capsys)[0] == 0
    other = tmp_path / "other.safetensors"
    MLPSpec.from_module(random_mlp([4, 6, 3], seed=2)).save(other)
    code, stdout, _ = run(["verify", out, other, "--samples", "1000"], capsys)
    assert code == 1 and "NO" in stdout


def test_pt_state_dict_target(tmp_path, capsys):
    torch.save(random_mlp([3, 4, 2], seed=3).state_dict(), tmp_path / "t.pt")
    code, _, _ = run(["reconstruct", tmp_path / "t.pt", "--out", tmp_path / "n.safetensors"], capsys)
    assert code == 0


def _bad_inputs(tmp_path, target_file):
    data = target_file.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 7])
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(200))
    from safetensors.torch import save_file

    save_file({"encoder.attn.weight": torch.zeros(2, 2)}, str(tmp_path / "notmlp.safetensors"))
    save_file({"0.weight": torch.zeros(3, 2), "2.weight": torch.zeros(1, 4)}, str(tmp_path / "chain.safetensors"))
    save_file({"0.weight": torch.full((3, 2), float("nan"))}, str(tmp_path / "nan.safetensors"))
    return {
        "trunc.safetensors": "not a readable safetensors file",
        "garbage.safetensors": "not a readable safetensors file",
        "notmlp.safetensors": "is not an MLP parameter",
        "chain.safetensors": "do not chain",
        "nan.safetensors": "non-finite",
        "missing.safetensors": "not found",
    }


def test_bad_target_files_exit_2_with_one_line_and_no_output(target_file, tmp_path, capsys):
    for name, message in _bad_inputs(tmp_path, target_file).items():
        out = tmp_path / f"out-{name}"
        code, stdout, stderr = run(["reconstruct", tmp_path / name, "--out", out], capsys)
        assert code == 2, name
        assert message in stderr and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert "Traceback" not in stderr + stdout
        assert not out.exists()
        assert not any(p.name.startswith(f".out-{name}") for p in tmp_path.iterdir())  # no temp leftovers


@pytest.mark.parametrize(
    "args, message",
    [
        (["--low", "1", "--high", "1"], "expected low < high"),
        (["--low", "3", "--high", "-3"], "expected low < high"),
        (["--method", "nope"], "method: expected one of ["),
        (["--hidden", "a,b"], "--hidden: expected an integer"),
        (["--dtype", "int8"], "--dtype: expected float64 or float32"),
    ],
)
def test_bad_options_exit_2(target_file, tmp_path, capsys, args, message):
    out = tmp_path / "net.safetensors"
    code, _, stderr = run(["reconstruct", target_file, "--out", out, *args], capsys)
    assert code == 2 and message in stderr and not out.exists()


def test_verify_with_wrong_input_dimension(target_file, tmp_path, capsys):
    out = tmp_path / "net.safetensors"
    assert run(["reconstruct", target_file, "--out", out], capsys)[0] == 0
    other = tmp_path / "other.safetensors"
    MLPSpec.from_module(random_mlp([5, 6, 3], seed=2)).save(other)
    code, _, stderr = run(["verify", out, other], capsys)
    assert code == 2 and "input dimension mismatch: the network takes 4 features but the target takes 5" in stderr


def test_verify_refuses_a_target_file_given_as_network(target_file, capsys):
    code, _, stderr = run(["verify", target_file, target_file], capsys)
    assert code == 2 and "not an onlynorm network file" in stderr


def test_existing_output_survives_a_failed_run(target_file, tmp_path, capsys):
    out = tmp_path / "net.safetensors"
    out.write_bytes(b"previous result")
    code, _, _ = run(["reconstruct", target_file, "--out", out, "--low", "2", "--high", "1"], capsys)
    assert code == 2 and out.read_bytes() == b"previous result"


def test_usage_error_exit_code(capsys):
    code, _, _ = run(["reconstruct"], capsys)
    assert code == 2


def test_installed_entry_point_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    proc = subprocess.run(
        [sys.executable, "-m", "onlynorm.cli", "reconstruct", str(bad), "--out", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert not (tmp_path / "o.safetensors").exists()


def test_version(capsys):
    import onlynorm

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"onlynorm {onlynorm.__version__}"
