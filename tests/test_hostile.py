"""Hostile-input suite: a generated corpus of malformed files, tampered networks, odd values and odd paths, run
through the CLI. Every case must end as ONE line on stderr, exit code 2, no traceback, and nothing written.

Add a case here for every bug found: the corpus is the project's own and grows with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import onlynorm
from onlynorm import _io
from onlynorm.cli.app import main

from .conftest import random_mlp


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _assert_refused(code: int, err: str, *, contains: str = "") -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, found {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err and "internal error" not in err, err
    assert contains.lower() in err.lower(), err


def _safetensors_with_meta(path: Path, tensors: dict, meta) -> Path:
    from safetensors.torch import save_file

    raw = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={_io.METADATA_KEY: raw})
    return path


def _cnn_doc(layers, in_shape=(1, 4, 4)) -> dict:
    return {"kind": "cnn-target", "in_shape": list(in_shape), "layers": layers}


CONV = {"type": "conv", "weight": "0.weight", "bias": "0.bias", "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}


def _cnn_tensors() -> dict:
    return {
        "0.weight": torch.randn(2, 1, 3, 3, dtype=torch.float64),
        "0.bias": torch.zeros(2, dtype=torch.float64),
        "3.weight": torch.randn(2, 8, dtype=torch.float64),
        "3.bias": torch.zeros(2, dtype=torch.float64),
    }


def _nested_residual(depth: int) -> str:
    """JSON text of ``depth`` residual blocks nested in each other (too deep for json.dumps to write)."""
    layers = '[{"type": "residual", "block": ' * depth + '[{"type": "relu"}]' + "}]" * depth
    return '{"kind": "cnn-target", "in_shape": [1, 4, 4], "layers": ' + layers + "}"


def target_corpus(d: Path) -> dict[str, tuple[Path, str]]:
    """name → (target file, a word the one-line message must contain)."""
    good = random_mlp([3, 4, 2], seed=0)
    onlynorm.MLPSpec.from_module(good).save(d / "good.safetensors")
    raw = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.safetensors").write_bytes(os.urandom(200))
    (d / "empty.safetensors").write_bytes(b"")
    torch.save({"0.weight": torch.empty(2, 2, device="meta")}, d / "meta.pt")
    torch.save({"0.weight": torch.eye(2, dtype=torch.float64).to_sparse()}, d / "sparse.pt")
    torch.save({"0.weight": torch.tensor(1.0, dtype=torch.float64)}, d / "scalar.pt")
    torch.save({"0.weight": torch.eye(2, dtype=torch.complex128)}, d / "complex.pt")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"0.weight": torch.full((2, 2), float("nan"), dtype=torch.float64)}, d / "nan.pt")
    torch.save({"conv.kernel": torch.zeros(2, 2)}, d / "keys.pt")
    torch.save({"0.weight": torch.zeros(3, 2), "2.weight": torch.zeros(3, 4)}, d / "chain.pt")
    t = _cnn_tensors()
    _safetensors_with_meta(d / "deep_json.safetensors", t, "[" * 100_000 + "]" * 100_000)
    _safetensors_with_meta(d / "not_json.safetensors", t, "{not json")
    cases = {
        "truncated": (d / "truncated.safetensors", "safetensors"),
        "garbage": (d / "garbage.safetensors", "safetensors"),
        "empty": (d / "empty.safetensors", "safetensors"),
        "missing": (d / "nope.safetensors", "not found"),
        "meta-tensor": (d / "meta.pt", "expected dense CPU tensors"),
        "sparse-tensor": (d / "sparse.pt", ""),
        "0-d weight": (d / "scalar.pt", "2-D weight"),
        "complex": (d / "complex.pt", "complex"),
        "not a dict": (d / "list.pt", "state_dict"),
        "nan weights": (d / "nan.pt", "non-finite"),
        "non-MLP keys": (d / "keys.pt", "not an MLP parameter"),
        "shapes do not chain": (d / "chain.pt", "do not chain"),
        "deeply nested JSON": (d / "deep_json.safetensors", "nested too deeply"),
        "metadata not JSON": (d / "not_json.safetensors", "not JSON"),
    }
    for name, layers in {
        "layers is a string": "conv",
        "layers is a number": 5,
        "layers is a dict": {"a": 1},
        "block is a string": [CONV, {"type": "residual", "block": "relu"}],
        "stride is a string": [dict(CONV, stride="2")],
        "stride is null": [dict(CONV, stride=None)],
        "stride is a float": [dict(CONV, stride=[1.5, 1.5])],
        "dilation is a string": [dict(CONV, dilation="x")],
        "unknown layer type": [{"type": "teleport"}],
        "weight key missing": [dict(CONV, weight="9.weight")],
        "500 nested residual blocks": _nested_residual(500),
    }.items():
        path = d / (name.replace(" ", "_") + ".safetensors")
        doc = layers if isinstance(layers, str) and layers.startswith("{") else _cnn_doc(layers)
        cases[name] = (_safetensors_with_meta(path, t, doc), "")
    for name, in_shape in {
        "absurd in_shape": (3, 10**6, 10**6),
        "zero in_shape": (0, 4, 4),
        "negative in_shape": (1, -4, 4),
    }.items():
        path = d / (name.replace(" ", "_") + ".safetensors")
        cases[name] = (
            _safetensors_with_meta(
                path,
                t,
                _cnn_doc(
                    [
                        CONV,
                        {"type": "relu"},
                        {"type": "flatten"},
                        {"type": "linear", "weight": "3.weight", "bias": "3.bias"},
                    ],
                    in_shape,
                ),
            ),
            "",
        )
    return cases


def test_malformed_target_files_get_one_line_and_exit_2(tmp_path, capsys):
    cases = target_corpus(tmp_path)
    out = tmp_path / "out.safetensors"
    failures = []
    for name, (path, word) in cases.items():
        code, err = _run(["reconstruct", str(path), "--out", str(out)], capsys)
        try:
            _assert_refused(code, err, contains=word)
            assert not out.exists()
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)
    assert len(cases) >= 25


def network_corpus(d: Path) -> dict[str, tuple[Path, str]]:
    g = random_mlp([3, 4, 2], seed=0)
    net = onlynorm.reconstruct(g, method="deep", seed=0)
    doc = {
        "format": "onlynorm.normnet",
        "version": 1,
        "dtype": "float64",
        "architecture": net.architecture(),
        "meta": net.meta.to_dict(),
    }
    tensors = net.state_dict()
    cases = {}

    def variant(name: str, edit, word: str, tensors=tensors) -> None:
        d_ = json.loads(json.dumps(doc))
        edit(d_)
        path = d / (name.replace(" ", "_") + ".safetensors")
        _io.write_tensors(path, tensors, metadata=d_)
        cases[name] = (path, word)

    variant(
        "stored block 0", lambda d_: d_["architecture"][0].__setitem__("block", 0), "'block' must be an integer from 1"
    )
    variant("stored block a string", lambda d_: d_["architecture"][0].__setitem__("block", "two"), "architecture")
    variant("absurd in_features", lambda d_: d_["architecture"][0].__setitem__("in_features", 10**12), "")
    variant("domain a string", lambda d_: d_["meta"]["solve"].__setitem__("domain", "box"), "solve.domain")
    variant(
        "domain empty", lambda d_: d_["meta"]["solve"].__setitem__("domain", {"low": [1], "high": [0]}), "solve.domain"
    )
    variant("notes a number", lambda d_: d_["meta"]["solve"].__setitem__("notes", 3), "solve.notes")
    variant("solve a list", lambda d_: d_["meta"].__setitem__("solve", [1]), "'solve' must be an object")
    variant("layers not a list", lambda d_: d_["meta"]["solve"].__setitem__("layers", "x"), "solve.layers")
    variant(
        "precision a list",
        lambda d_: d_["meta"]["solve"]["layers"][0].__setitem__("precision", ["mixed", "float64"]),
        "solve.layers[].precision",
    )
    variant("architecture a string", lambda d_: d_.__setitem__("architecture", "deep"), "architecture")
    variant("unknown stage kind", lambda d_: d_["architecture"][0].__setitem__("kind", "wormhole"), "unknown stage")
    variant("wrong version", lambda d_: d_.__setitem__("version", 99), "version")
    bad = dict(tensors)
    bad["layers.0.norm.weight"] = bad["layers.0.norm.weight"].to(torch.int64)
    variant("integer gamma", lambda d_: None, "dtype", tensors=bad)
    return cases


def test_malformed_network_files_get_one_line_and_exit_2(tmp_path, capsys):
    cases = network_corpus(tmp_path)
    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=0)).save(tmp_path / "g.safetensors")
    failures = []
    for name, (path, word) in cases.items():
        code, err = _run(["verify", str(path), str(tmp_path / "g.safetensors"), "--samples", "10"], capsys)
        try:
            _assert_refused(code, err, contains=word)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def files(tmp_path):
    g = random_mlp([3, 4, 2], seed=0)
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "g.safetensors")
    onlynorm.reconstruct(g, seed=0).save(tmp_path / "n.safetensors")
    return tmp_path


@pytest.mark.parametrize(
    "args, word",
    [
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--seed", str(2**70)], "seed"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--seed", "-1"], "seed"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--hidden", "2.5"], "--hidden"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--margin", "nan"], "margin"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--low", "nan"], "finite"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--low", "2", "--high", "1"], "low < high"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--low", "-1e308", "--high", "1e308"], "overflow"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--dtype", "int8"], "--dtype"),
        (["reconstruct", "{g}", "--out", "{d}/o.safetensors", "--bogus"], "no such option"),
        (["reconstruct", "{g}"], "missing option"),
        (["reconstruct"], "missing argument"),
        (["frobnicate"], "no such command"),
        (["verify", "{n}", "{g}", "--tolerance", "-1"], "tolerance"),
        (["verify", "{n}", "{g}", "--tolerance", "nan"], "tolerance"),
        (["verify", "{n}", "{g}", "--samples", "0"], "samples"),
        (["verify", "{n}", "{g}", "--samples", str(10**13)], "samples"),
        (["verify", "{n}", "{g}", "--samples", "many"], "samples"),
        (["experiment", "scaling", "--seed", "-1", "--out", "{d}/runs"], "seed"),
        (["fit", "{n}", "{g}", "--out", "{d}/o.safetensors", "--seed", "-1"], "--seed"),
        (["fit", "{n}", "{g}", "--out", "{d}/o.safetensors", "--seed", str(2**70)], "--seed"),
        (["init", "{g}", "--out", "{d}/o.safetensors", "--seed", "-1"], "--seed"),
        (["init", "{g}", "--out", "{d}/o.safetensors", "--dtype", "int8"], "--dtype"),
        (["init", "{g}", "--out", "{d}/o.safetensors", "--method", "bogus"], "method"),
        (["init", "{g}", "--out", "{d}/o.safetensors", "--hidden", "2.5"], "--hidden"),
        (["init", "{g}", "--out", "{d}/o.safetensors", "--method", "deep", "--block", "0"], "block"),
        (["init", "{g}", "--out", "{g}"], "input file"),
        (["init", "{g}", "--out", "{d}"], "is a directory"),
        (["init", "{g}"], "missing option"),
        (["experiment", "nonsense", "--out", "{d}/runs"], "experiment"),
        # output paths
        (["reconstruct", "{g}", "--out", "{d}"], "is a directory"),
        (["reconstruct", "{g}", "--out", ""], "empty"),
        (["reconstruct", "{g}", "--out", "{d}/missing/o.safetensors"], "does not exist"),
        (["reconstruct", "{g}", "--out", "{g}"], "input file"),
        (["reconstruct", "{g}", "--out", "{d}/fifo"], "not a regular file"),
        (["reconstruct", "{g}", "--out", "/dev/null"], "not a regular file"),
        (["experiment", "scaling", "--quick", "--out", "{g}"], "not a directory"),
        (["demo", "--builtin", "--json", "{d}"], "is a directory"),
    ],
)
def test_odd_values_and_paths_get_one_line_and_exit_2(files, capsys, args, word):
    os.mkfifo(files / "fifo")
    before = sorted(p.name for p in files.iterdir())
    g_bytes = (files / "g.safetensors").read_bytes()
    argv = [a.format(g=files / "g.safetensors", n=files / "n.safetensors", d=files) for a in args]
    code, err = _run(argv, capsys)
    _assert_refused(code, err, contains=word)
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written, nothing left over
    assert (files / "g.safetensors").read_bytes() == g_bytes and (files / "fifo").is_fifo()


def test_load_norms_is_all_or_nothing(tmp_path):
    g = random_mlp([3, 4, 2], seed=0)
    net = onlynorm.reconstruct(g, seed=0)
    net.save_norms(tmp_path / "norms.safetensors")
    tensors, doc = _io.read_tensors(tmp_path / "norms.safetensors")
    for name, edit in (
        ("bad meta", lambda t, d: d.__setitem__("meta", {"solve": "everything"})),
        ("meta a list", lambda t, d: d.__setitem__("meta", [1])),
        ("bool gamma", lambda t, d: t.__setitem__("layers.1.norm.weight", t["layers.1.norm.weight"] > 0)),
        ("int beta", lambda t, d: t.__setitem__("layers.1.norm.bias", t["layers.1.norm.bias"].to(torch.int32))),
    ):
        t2, d2 = dict(tensors), json.loads(json.dumps(doc))
        edit(t2, d2)
        _io.write_tensors(tmp_path / "bad.safetensors", t2, metadata=d2)
        target = onlynorm.reconstruct(g, seed=0)
        with torch.no_grad():
            for p in target.norm_parameters():
                p.fill_(0.25)
        state = {k: v.clone() for k, v in target.state_dict().items()}
        meta = target.meta.to_dict()
        with pytest.raises(onlynorm.OnlyNormError):
            target.load_norms(tmp_path / "bad.safetensors")
        assert all(torch.equal(state[k], v) for k, v in target.state_dict().items()), name
        assert target.meta.to_dict() == meta, name


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"hidden": 2.5}, "hidden"),
        ({"seed": None}, "seed"),
        ({"dtype": torch.int32}, "dtype"),
        ({"margin": float("nan")}, "margin"),
        ({"domain": (-1e308, 1e308)}, "overflow"),
    ],
)
def test_api_errors_are_onlynorm_errors(kwargs, word):
    with pytest.raises(onlynorm.OnlyNormError, match=word):
        onlynorm.reconstruct(random_mlp([3, 4, 2], seed=0), **kwargs)


@pytest.mark.parametrize(
    "kwargs, word", [({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": float("nan")}, "lr")]
)
def test_train_norm_only_arguments_are_validated(kwargs, word):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    data = (torch.randn(16, 2), torch.randn(16, 1))
    with pytest.raises(onlynorm.OnlyNormError, match=word):
        onlynorm.train_norm_only(model, data, progress=False, **kwargs)


def _wait_until_working(pid: int, timeout: float = 120.0) -> None:
    """Until the child has imported torch and scipy's LAPACK (read from /proc, so a loaded machine only makes this
    slower), then a little longer: the signal must land in the work, not in Python's start-up."""
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = maps.read_text()
        except OSError:
            return
        if "libtorch_cpu" in text and "scipy" in text:
            time.sleep(3.0)
            return
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_runs_leave_nothing_behind(tmp_path, sig, code):
    """A run interrupted mid-work exits quietly with 128+signal, no traceback, no output, no temporary file."""
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import onlynorm_launcher; onlynorm_launcher.main()",  # as the console command runs
            "experiment",
            "scaling",
            "--quick",
            "--out",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ONLYNORM_JOBS": "1"},
    )
    _wait_until_working(proc.pid)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.rglob("*.tmp"))


_SLOW_TORCH_IMPORT = """
import builtins, sys, time
real_import = builtins.__import__
def slow_import(name, *args, **kwargs):  # start-up made long and observable: torch's import announces itself
    if name == "torch" and "torch" not in sys.modules:
        print("importing torch", flush=True)
        time.sleep(60)
    return real_import(name, *args, **kwargs)
builtins.__import__ = slow_import
sys.argv = ["onlynorm", "--version"]
import onlynorm_launcher
onlynorm_launcher.main()
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_during_start_up_exit_quietly(sig, code):
    """Ctrl-C while torch is still being imported (seconds on a cold start): one line, 128+signal, no traceback —
    the console command is a launcher outside the package that installs its handlers first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TORCH_IMPORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "importing torch"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "nothing was written" in err, err
    assert "onlynorm" not in out  # interrupted before the CLI ran


def test_the_console_command_is_the_launcher():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "onlynorm"]
    assert script.value == "onlynorm_launcher:main"


def test_export_refuses_its_own_input_and_a_read_only_output(tmp_path, capsys):
    """`export --onnx` onto the network file it reads, or onto a read-only file: exit 2, one line, nothing
    replaced; a writable file it replaces keeps its permissions."""
    import stat

    net_path = tmp_path / "net.safetensors"
    onlynorm.reconstruct(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()).save(net_path)
    before = net_path.read_bytes()
    _assert_refused(*_run(["export", str(net_path), "--onnx", str(net_path)], capsys), contains="is the input file")
    assert net_path.read_bytes() == before
    protected = tmp_path / "protected.onnx"
    protected.write_bytes(b"keep")
    protected.chmod(0o444)
    _assert_refused(*_run(["export", str(net_path), "--onnx", str(protected)], capsys), contains="read-only")
    assert protected.read_bytes() == b"keep" and stat.S_IMODE(protected.stat().st_mode) == 0o444
    shared = tmp_path / "shared.onnx"
    shared.write_bytes(b"old")
    shared.chmod(0o640)
    code, err = _run(["export", str(net_path), "--onnx", str(shared)], capsys)
    assert code == 0, err
    assert shared.read_bytes() != b"old" and stat.S_IMODE(shared.stat().st_mode) == 0o640


# ---------------------------------------------------------------------------------------------------------------
# The CLI and API contract: every refusal is exactly one line (no blank line either), exit 2, nothing written.


def _assert_exactly_one_line(code: int, err: str, *, contains: str = "") -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected exactly one line on stderr, found:\n{err!r}"
    assert err.startswith("error: ") and "\x1b" not in err and "Traceback" not in err, repr(err)
    assert contains.lower() in err.lower(), err


def _cnn_model(in_shape=(1, 4, 4)) -> torch.nn.Sequential:
    torch.manual_seed(0)
    side = in_shape[1] - 2
    return (
        torch.nn.Sequential(
            torch.nn.Conv2d(in_shape[0], 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * side**2, 2)
        )
        .double()
        .eval()
    )


def input_file_corpus(d: Path) -> dict[str, tuple[Path, str]]:
    """Hostile target files: name → (file, a word the one-line message must contain)."""
    from safetensors.torch import save_file

    good = {k: v.clone() for k, v in random_mlp([3, 4, 2], seed=0).state_dict().items()}
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in good.items()}, str(d / "float8.safetensors"))
    save_file({**good, "0.bias": good["0.bias"] > 0}, str(d / "bool_bias.safetensors"))
    torch.save({**good, "2.bias": good["2.bias"].to(torch.int32)}, d / "int_bias.pt")
    with open(d / "plain_pickle.pt", "wb") as fh:  # a pickle that is not a torch file: torch warns, then refuses
        import pickle

        pickle.dump({"0.weight": [[1.0]]}, fh, protocol=4)
    torch.save(random_mlp([3, 4, 2], seed=0), d / "whole_model.pt")  # torch's refusal has ANSI bold markers
    tensors = {
        "0.weight": torch.randn(2, 1, 3, 3, dtype=torch.float64).to(torch.float8_e5m2),
        "0.bias": torch.zeros(2, dtype=torch.float64),
        "3.weight": torch.randn(2, 8, dtype=torch.float64),
        "3.bias": torch.zeros(2, dtype=torch.float64),
    }
    layers = [CONV, {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "weight": "3.weight", "bias": "3.bias"}]
    _safetensors_with_meta(d / "cnn_float8.safetensors", tensors, _cnn_doc(layers))
    tensors["0.weight"], tensors["0.bias"] = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.ones(2) > 0
    _safetensors_with_meta(d / "cnn_bool_bias.safetensors", tensors, _cnn_doc(layers))
    return {
        "float8 weights": (d / "float8.safetensors", "float8_e4m3fn"),
        "bool bias": (d / "bool_bias.safetensors", "dtype bool"),
        "int bias (.pt)": (d / "int_bias.pt", "dtype int32"),
        "plain pickle .pt": (d / "plain_pickle.pt", "weights-only"),
        "whole model .pt": (d / "whole_model.pt", "weights-only"),
        "cnn float8 weights": (d / "cnn_float8.safetensors", "float8_e5m2"),
        "cnn bool bias": (d / "cnn_bool_bias.safetensors", "dtype bool"),
        "input name over 255 bytes": (d / ("t" * 300 + ".safetensors"), "255"),
    }


@pytest.mark.parametrize("command", ["reconstruct", "init"])
def test_target_files_get_exactly_one_line(tmp_path, capsys, command):
    cases = input_file_corpus(tmp_path)
    out = tmp_path / "out.safetensors"
    failures = []
    for name, (path, word) in cases.items():
        code, err = _run([command, str(path), "--out", str(out)], capsys)
        try:
            _assert_exactly_one_line(code, err, contains=word)
            assert not out.exists()
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_torch_load_warnings_are_silenced(tmp_path):
    """A plain pickle makes torch warn about its protocol before refusing; onlynorm's own torch.load says nothing
    but its one-line refusal (the warning would print above the error)."""
    import warnings

    path, _ = input_file_corpus(tmp_path)["plain pickle .pt"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(onlynorm.FileFormatError, match="weights-only"):
            _io.read_tensors(path)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    "argv, word",
    [
        (["reconstruct", "{d}/plain_pickle.pt", "--out", "{d}/o.safetensors"], "weights-only"),
        (["reconstruct", "{d}/whole_model.pt", "--out", "{d}/o.safetensors"], "weights-only"),
        (
            ["experiment", "scaling", "--quick", "--backend", "dask", "--scheduler", "not a url", "--out", "{d}/r"],
            "--scheduler",
        ),
        (
            ["experiment", "scaling", "--quick", "--backend", "dask", "--scheduler", "foo://x:1", "--out", "{d}/r"],
            "--scheduler",
        ),
    ],
)
def test_console_command_prints_one_line_to_a_pipe(tmp_path, argv, word):
    """As the console command runs, stderr a pipe (not a terminal): no warning lines, no ANSI codes, no traceback
    from a half-made Dask Client's ``__del__`` at exit."""
    input_file_corpus(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", "import onlynorm_launcher; onlynorm_launcher.main()"]
        + [a.format(d=tmp_path) for a in argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_exactly_one_line(proc.returncode, proc.stderr, contains=word)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "r").exists()


def test_long_output_names(tmp_path, capsys):
    """A name over the file system's limit is refused before any work; one at the limit is written (the temporary
    file beside it must fit too)."""
    target = tmp_path / "g.safetensors"
    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=0)).save(target)
    code, err = _run(["reconstruct", str(target), "--out", str(tmp_path / ("o" * 300 + ".safetensors"))], capsys)
    _assert_exactly_one_line(code, err, contains="255")
    at_limit = tmp_path / ("o" * (255 - len(".safetensors")) + ".safetensors")
    code, _err = _run(["reconstruct", str(target), "--out", str(at_limit)], capsys)
    assert code == 0 and at_limit.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["g.safetensors", at_limit.name])


@pytest.mark.parametrize("path", [123, None, 1.5, b"net.safetensors", ["net.safetensors"]])
def test_non_path_arguments_are_file_format_errors(path, tmp_path):
    net = onlynorm.reconstruct(random_mlp([3, 4, 2], seed=0), seed=0)
    for call in (
        lambda: onlynorm.NormNet.load(path),
        lambda: onlynorm.MLPSpec.load(path),
        lambda: onlynorm.targets.load_target(path),
        lambda: net.load_norms(path),
        lambda: net.save(path),
        lambda: net.save_norms(path),
    ):
        with pytest.raises(onlynorm.FileFormatError, match="expected a file name"):
            call()


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to("meta")


@pytest.mark.parametrize(
    "call",
    [
        lambda g: onlynorm.reconstruct(_meta_copy(g)),
        lambda g: onlynorm.random_normnet(_meta_copy(g)),
        lambda g: onlynorm.MLPSpec.from_module(_meta_copy(g)),
        lambda g: onlynorm.verify(onlynorm.reconstruct(g, seed=0), _meta_copy(g), samples=10),
        lambda g: onlynorm.capacity(onlynorm.reconstruct(g, seed=0), _meta_copy(g)),
        lambda g: onlynorm.fit_norms(onlynorm.random_normnet(g), _meta_copy(g), onlynorm.Box(-1, 1)),
        lambda g: onlynorm.solve_norms(onlynorm.random_normnet(g), _meta_copy(g), onlynorm.Box(-1, 1)),
        lambda g: onlynorm.reconstruct(_meta_copy(_cnn_model()), in_shape=(1, 4, 4)),
    ],
    ids=["reconstruct", "random_normnet", "MLPSpec", "verify", "capacity", "fit_norms", "solve_norms", "cnn"],
)
def test_meta_device_targets_are_refused(call):
    with pytest.raises(onlynorm.InvalidTargetError, match="meta device"):
        call(random_mlp([3, 4, 2], seed=0))


@pytest.mark.parametrize(
    "layer, key, value, word",
    [
        (0, "bias", torch.ones(4, dtype=torch.bool), "dtype bool"),
        (1, "bias", torch.ones(2, dtype=torch.int64), "dtype int64"),
        (0, "weight", torch.ones(4, 3).to(torch.float8_e4m3fn), "float8_e4m3fn"),
        (1, "weight", torch.ones(2, 4).to(torch.float8_e5m2), "float8_e5m2"),
    ],
)
def test_target_tensors_must_be_floating_point(layer, key, value, word):
    g = random_mlp([3, 4, 2], seed=0)
    weights, biases = [g[0].weight, g[2].weight], [g[0].bias, g[2].bias]
    (weights if key == "weight" else biases)[layer] = value
    with pytest.raises(onlynorm.InvalidTargetError, match=f"layer {layer}: {key}: .*{word}"):
        onlynorm.MLPSpec(tuple(weights), tuple(biases))
    module = random_mlp([3, 4, 2], seed=0)
    setattr(module[2 * layer], key, torch.nn.Parameter(value, requires_grad=False))
    with pytest.raises(onlynorm.InvalidTargetError, match=word):
        onlynorm.reconstruct(module)


def hostile_network_corpus(d: Path) -> dict[str, tuple[Path, str]]:
    """Network files with recorded options or tensors tampered: name → (file, a word the message must contain)."""
    g = random_mlp([3, 4, 2], seed=0)
    cases = {}
    for method in ("width", "deep"):
        net = onlynorm.reconstruct(g, method=method, seed=0)
        net.save(d / f"{method}.safetensors")
        tensors, doc = _io.read_tensors(d / f"{method}.safetensors")
        gamma = next(k for k in tensors if k.endswith("norm.weight"))
        frozen = next(k for k in tensors if k.endswith(".weight") and "norm" not in k)
        for name, edit, word in (
            ("margin a string", lambda t, m: m["meta"]["options"].__setitem__("margin", "abc"), "meta.options.margin"),
            ("margin negative", lambda t, m: m["meta"]["options"].__setitem__("margin", -1.0), "meta.options.margin"),
            ("margin a list", lambda t, m: m["meta"]["options"].__setitem__("margin", [1e-3]), "meta.options.margin"),
            ("unknown option", lambda t, m: m["meta"]["options"].__setitem__("colour", 3), "meta.options"),
            ("float8 gamma", lambda t, m, k=gamma: t.__setitem__(k, t[k].to(torch.float8_e4m3fn)), "float8_e4m3fn"),
            ("float16 gamma", lambda t, m, k=gamma: t.__setitem__(k, t[k].half()), "float16"),
            ("float32 frozen weight", lambda t, m, k=frozen: t.__setitem__(k, t[k].float()), "float32"),
        ):
            t2, doc2 = dict(tensors), json.loads(json.dumps(doc))
            edit(t2, doc2)
            path = d / f"{method}_{name.replace(' ', '_')}.safetensors"
            _io.write_tensors(path, t2, metadata=doc2)
            cases[f"{method}: {name}"] = (path, word)
    doc2 = json.loads(json.dumps(doc))  # the last network is the deep one
    doc2["meta"]["options"]["block"] = "two"
    _io.write_tensors(d / "deep_block_string.safetensors", tensors, metadata=doc2)
    cases["deep: block a string"] = (d / "deep_block_string.safetensors", "meta.options.block")
    return cases


def test_tampered_network_files_get_exactly_one_line(tmp_path, capsys):
    cases = hostile_network_corpus(tmp_path)
    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=0)).save(tmp_path / "g.safetensors")
    g = str(tmp_path / "g.safetensors")
    failures = []
    for name, (path, word) in cases.items():
        for argv in (
            ["verify", str(path), g, "--samples", "10"],
            ["capacity", str(path), g],
            ["fit", str(path), g, "--out", str(tmp_path / "o.safetensors"), "--budget", "1"],
        ):
            code, err = _run(argv, capsys)
            try:
                _assert_exactly_one_line(code, err, contains=word)
                assert not (tmp_path / "o.safetensors").exists()
            except AssertionError as exc:
                failures.append(f"{name} ({argv[0]}): {exc}")
    assert not failures, "\n".join(failures)


def test_options_set_in_memory_are_checked_when_solving():
    g = random_mlp([3, 4, 2], seed=0)
    frozen = onlynorm.random_normnet(g, seed=0)
    frozen.meta.options["margin"] = "abc"
    with pytest.raises(onlynorm.InvalidOptionError, match="margin: expected a number"):
        onlynorm.solve_norms(frozen, g, onlynorm.Box(-1, 1))


def _cnn_network_files(d: Path, in_shape, method: str, edits: dict) -> tuple[Path, dict[str, Path]]:
    spec = onlynorm.ConvNetSpec.from_module(_cnn_model(in_shape), in_shape=in_shape)
    spec.save(d / "cnn_target.safetensors")
    net = onlynorm.reconstruct(spec, method=method, seed=0, domain=onlynorm.Box(0.0, 1.0))
    net.save(d / "cnn_net.safetensors")
    tensors, doc = _io.read_tensors(d / "cnn_net.safetensors")
    files = {}
    for name, (field, value) in edits.items():
        doc2 = json.loads(json.dumps(doc))
        doc2["architecture"][0][field] = value
        files[name] = d / f"cnn_{name}.safetensors"
        _io.write_tensors(files[name], tensors, metadata=doc2)
    return d / "cnn_target.safetensors", files


@pytest.mark.parametrize("method", ["width", "deep"])
def test_cnn_geometry_edited_in_a_network_file(tmp_path, capsys, method):
    """A stride (padding, dilation) edited in a CNN network's architecture JSON. Where the stages no longer chain,
    loading refuses it; where they still chain (a 3×3 conv on a 3×3 image: stride changes nothing), every command
    that relies on the plan refuses it naming the geometry, and the sampled check passes because the function
    really is the target's."""
    edits = {"stride": ("stride", [2, 2]), "padding": ("padding", [1, 1]), "dilation": ("dilation", [2, 2])}
    out = tmp_path / "o.safetensors"
    target, files = _cnn_network_files(tmp_path, (1, 6, 6), method, edits)
    for path in files.values():
        for argv in (
            ["verify", str(path), str(target), "--samples", "20"],
            ["verify", str(path), str(target), "--samples", "20", "--certify"],
            ["capacity", str(path), str(target)],
            ["fit", str(path), str(target), "--out", str(out), "--budget", "1"],
            ["export", str(path), "--onnx", str(tmp_path / "o.onnx")],
        ):
            code, err = _run(argv, capsys)
            _assert_exactly_one_line(code, err, contains="do not chain")
            assert not out.exists() and not (tmp_path / "o.onnx").exists()
    target, files = _cnn_network_files(tmp_path, (1, 3, 3), method, {"stride": ("stride", [2, 2])})
    for argv in (
        ["verify", str(files["stride"]), str(target), "--samples", "20", "--certify"],
        ["capacity", str(files["stride"]), str(target)],
        ["fit", str(files["stride"]), str(target), "--out", str(out), "--method", "exact"],
    ):
        code, err = _run(argv, capsys)
        _assert_exactly_one_line(code, err, contains="stride 2×2")
        assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_load_norms_refuses_another_dtype(tmp_path, dtype):
    """A norm set in another dtype would be rounded (float64 → float16) or silently widened: refused, and the
    network is left as it was."""
    g = random_mlp([3, 4, 2], seed=0)
    net = onlynorm.reconstruct(g, seed=0)
    net.save_norms(tmp_path / "norms.safetensors")
    tensors, doc = _io.read_tensors(tmp_path / "norms.safetensors")
    _io.write_tensors(tmp_path / "other.safetensors", {k: v.to(dtype) for k, v in tensors.items()}, metadata=doc)
    target = onlynorm.random_normnet(g, seed=0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        onlynorm.InvalidNetworkError, match=f"dtype {str(dtype).removeprefix('torch.')}, expected float64"
    ):
        target.load_norms(tmp_path / "other.safetensors")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    target.load_norms(tmp_path / "norms.safetensors")  # the float64 set itself loads, exactly
    assert all(torch.equal(a, b) for a, b in zip(target.norm_parameters(), net.norm_parameters()))


FIT_METHODS = ["auto", "exact", "layerwise", "gauss-newton", "adam"]
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("net_dtype", DTYPES, ids=["net32", "net64"])
@pytest.mark.parametrize("target_dtype", DTYPES, ids=["target32", "target64"])
@pytest.mark.parametrize("method", FIT_METHODS)
def test_fit_norms_with_float32_and_float64(method, target_dtype, net_dtype):
    """Every fit_norms method with float32 and float64 targets (a trained model saved as safetensors is float32)
    and float32 and float64 frozen networks: the fit runs, keeps the network's dtype and does not get worse."""
    g = random_mlp([3, 4, 2], seed=0, dtype=target_dtype)
    hidden = None if method == "exact" else [4, 4]  # exact needs the theorem's width; the others fit below it
    frozen = onlynorm.random_normnet(g, seed=0, dtype=net_dtype, **({} if hidden is None else {"hidden": hidden}))
    net, report = onlynorm.fit_norms(frozen, g, onlynorm.Box(-1, 1), method=method, steps=5, samples=64)
    assert net.dtype == net_dtype and report.method == method
    assert all(p.dtype == net_dtype for p in net.parameters())
    assert torch.isfinite(torch.tensor(report.final_error)) and report.final_error <= report.initial_error
    if method == "exact":
        assert report.final_error < (1e-9 if net_dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("net_dtype", ["float32", "float64"])
@pytest.mark.parametrize("target_dtype", DTYPES, ids=["target32", "target64"])
@pytest.mark.parametrize("method", ["auto", "layerwise"])
def test_fit_cli_with_float32_and_float64(tmp_path, capsys, method, target_dtype, net_dtype):
    g = random_mlp([3, 4, 2], seed=0, dtype=target_dtype)
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "g.safetensors")
    frozen, out = tmp_path / "frozen.safetensors", tmp_path / "fitted.safetensors"
    onlynorm.random_normnet(g, hidden=[4, 4], dtype=getattr(torch, net_dtype)).save(frozen)
    argv = ["fit", str(frozen), str(tmp_path / "g.safetensors"), "--method", method, "--budget", "1", "--out", str(out)]
    code, err = _run(argv, capsys)
    assert code == 0 and err == "", err
    assert onlynorm.NormNet.load(out).dtype == getattr(torch, net_dtype)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"seed": -1}, "seed"),
        ({"seed": "a"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"method": "newton"}, "method"),
        ({"method": None}, "method"),
        ({"budget_seconds": -1}, "budget_seconds"),
        ({"budget_seconds": float("nan")}, "budget_seconds"),
        ({"budget_seconds": "5"}, "budget_seconds"),
        ({"steps": 0}, "steps"),
        ({"steps": True}, "steps"),
        ({"samples": 2}, "samples"),
        ({"memory_budget": 0}, "memory_budget"),
        ({"memory_budget": "1GB"}, "memory_budget"),
        ({"progress": 3}, "progress"),
    ],
)
def test_fit_norms_bad_options_are_invalid_option_errors(kwargs, word):
    g = random_mlp([3, 4, 2], seed=0)
    with pytest.raises(onlynorm.InvalidOptionError, match=word):
        onlynorm.fit_norms(onlynorm.random_normnet(g, hidden=[4, 4]), g, onlynorm.Box(-1, 1), **kwargs)


@pytest.mark.parametrize(
    "data, error",
    [
        (torch.zeros(0, 3, dtype=torch.float64), onlynorm.InvalidDomainError),
        (torch.zeros(0, dtype=torch.float64), onlynorm.InvalidDomainError),
        (torch.zeros(0, 0, dtype=torch.float64), onlynorm.InvalidDomainError),
        (torch.zeros(5, 3, dtype=torch.float64), onlynorm.InvalidDomainError),
        ([[0.0, 1.0, 2.0]], onlynorm.InvalidOptionError),
    ],
    ids=["0 rows", "0-d empty", "0x0", "5 rows", "a list"],
)
def test_fit_norms_empty_data(data, error):
    g = random_mlp([3, 4, 2], seed=0)
    with pytest.raises(error, match="data"):
        onlynorm.fit_norms(onlynorm.random_normnet(g, hidden=[4, 4]), g, data)


@pytest.mark.parametrize("shape", [(0, 3), (0,), (0, 0)])
def test_fit_cli_empty_data(tmp_path, capsys, shape):
    from safetensors.torch import save_file

    g = random_mlp([3, 4, 2], seed=0)
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "g.safetensors")
    onlynorm.random_normnet(g, hidden=[4, 4]).save(tmp_path / "frozen.safetensors")
    save_file({"x": torch.zeros(shape, dtype=torch.float64)}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "o.safetensors"
    argv = ["fit", str(tmp_path / "frozen.safetensors"), str(tmp_path / "g.safetensors"), "--out", str(out)]
    code, err = _run(argv + ["--data", str(tmp_path / "x.safetensors")], capsys)
    _assert_exactly_one_line(code, err, contains="data")
    assert not out.exists()


def test_cnn_network_with_mlp_target_and_the_reverse(tmp_path, capsys):
    spec = onlynorm.ConvNetSpec.from_module(_cnn_model(), in_shape=(1, 4, 4))
    g = random_mlp([3, 4, 2], seed=0)
    spec.save(tmp_path / "cnn.safetensors")
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "mlp.safetensors")
    for method in ("width", "deep"):
        onlynorm.random_normnet(spec, method=method).save(tmp_path / f"cnn_{method}_net.safetensors")
        onlynorm.random_normnet(g, method=method).save(tmp_path / f"mlp_{method}_net.safetensors")
    out = tmp_path / "o.safetensors"
    for method in ("width", "deep"):
        for net, target, word in (
            (f"cnn_{method}_net", "mlp", "expected a CNN target"),
            (f"mlp_{method}_net", "cnn", "expected an MLP target"),
        ):
            files = [str(tmp_path / f"{net}.safetensors"), str(tmp_path / f"{target}.safetensors")]
            for argv in (["fit", *files, "--out", str(out), "--budget", "1"], ["capacity", *files]):
                code, err = _run(argv, capsys)
                _assert_exactly_one_line(code, err, contains=word)
                assert not out.exists()
            net_obj, target_obj = onlynorm.NormNet.load(files[0]), onlynorm.targets.load_target(files[1])
            for call in (onlynorm.capacity, lambda n, t: onlynorm.fit_norms(n, t, onlynorm.Box(-1, 1))):
                with pytest.raises(onlynorm.InvalidNetworkError, match=word):
                    call(net_obj, target_obj)


def test_a_bare_state_dict_says_it_is_read_as_relu(tmp_path, capsys):
    """A state_dict records no activation: a Tanh model's reads as the ReLU network with its weights. The CLI says
    so on stdout for a bare state_dict, and says nothing for a file MLPSpec.save wrote (it refuses non-ReLU models).
    """
    from safetensors.torch import save_file

    tanh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    save_file(tanh.state_dict(), str(tmp_path / "tanh.safetensors"))
    torch.save(tanh.state_dict(), tmp_path / "tanh.pt")
    with pytest.raises(onlynorm.InvalidTargetError, match="Tanh"):
        onlynorm.MLPSpec.from_module(tanh)
    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=0)).save(tmp_path / "relu.safetensors")
    for name, noted in (("tanh.safetensors", True), ("tanh.pt", True), ("relu.safetensors", False)):
        out = tmp_path / f"{name}.net.safetensors"
        with pytest.raises(SystemExit) as info:
            main(["reconstruct", str(tmp_path / name), "--out", str(out)])
        captured = capsys.readouterr()
        assert info.value.code == 0 and captured.err == "", captured.err
        note = [line for line in captured.out.splitlines() if line.startswith("note:")]
        assert (note != []) == noted, captured.out
        if noted:
            assert len(note) == 1 and name in note[0] and "ReLU" in note[0] and "no activation" in note[0]


def test_init_fit_verify_from_the_command_line(tmp_path, capsys):
    """`onlynorm init` writes the frozen random network (norms at identity) that `fit` takes, without Python."""
    g = random_mlp([3, 4, 2], seed=0).float()  # as trained: float32
    onlynorm.MLPSpec.from_module(g).save(tmp_path / "g.safetensors")
    target, frozen, fitted = (tmp_path / n for n in ("g.safetensors", "frozen.safetensors", "fitted.safetensors"))
    code, err = _run(["init", str(target), "--seed", "3", "--out", str(frozen)], capsys)
    assert code == 0 and err == "", err
    net = onlynorm.NormNet.load(frozen)
    assert net.dtype == torch.float64 and net.meta.method == "width" and net.meta.seed == 3 and net.meta.solve is None
    assert all(bool((p == (1.0 if i % 2 == 0 else 0.0)).all()) for i, p in enumerate(net.norm_parameters()))
    expected = onlynorm.random_normnet(onlynorm.MLPSpec.from_module(g), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    code, err = _run(["fit", str(frozen), str(target), "--low", "0", "--high", "1", "--out", str(fitted)], capsys)
    assert code == 0 and err == "", err
    with pytest.raises(SystemExit) as info:
        main(["verify", str(fitted), str(target), "--samples", "2000", "--low", "0", "--high", "1"])
    assert info.value.code == 0, capsys.readouterr()
    capsys.readouterr()


@pytest.mark.parametrize(
    "args, check",
    [
        (["--method", "deep", "--block", "2"], lambda n: n.meta.method == "deep" and n.meta.options["block"] == 2),
        (["--method", "lowrank", "--rank", "2"], lambda n: n.meta.method == "lowrank"),
        (
            ["--hidden", "4,6", "--dtype", "float32"],
            lambda n: n.dtype == torch.float32 and n.meta.options["hidden"] == [4, 6],
        ),
        (["--method", "sparse", "--density", "0.5"], lambda n: n.meta.method == "sparse"),
    ],
)
def test_init_takes_the_construction_options(tmp_path, capsys, args, check):
    onlynorm.MLPSpec.from_module(random_mlp([3, 4, 2], seed=0)).save(tmp_path / "g.safetensors")
    code, err = _run(["init", str(tmp_path / "g.safetensors"), *args, "--out", str(tmp_path / "f.safetensors")], capsys)
    assert code == 0 and err == "", err
    assert check(onlynorm.NormNet.load(tmp_path / "f.safetensors"))


@pytest.mark.parametrize("method", ["width", "deep"])
def test_init_then_fit_a_cnn(tmp_path, capsys, method):
    onlynorm.ConvNetSpec.from_module(_cnn_model(), in_shape=(1, 4, 4)).save(tmp_path / "cnn.safetensors")
    frozen, fitted = tmp_path / "frozen.safetensors", tmp_path / "fitted.safetensors"
    code, err = _run(["init", str(tmp_path / "cnn.safetensors"), "--method", method, "--out", str(frozen)], capsys)
    assert code == 0 and err == "", err
    assert onlynorm.NormNet.load(frozen).in_shape == (1, 4, 4)
    argv = ["fit", str(frozen), str(tmp_path / "cnn.safetensors"), "--low", "0", "--high", "1", "--out", str(fitted)]
    code, err = _run(argv + ["--budget", "5"], capsys)
    assert code == 0 and err == "", err
    assert onlynorm.NormNet.load(fitted).meta.fit.final_error < 1e-9


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_fit_norms_takes_every_valid_seed(seed):
    """Every seed check_seed accepts works (the held-out points' seed is derived from it and wrapped into range)."""
    g = random_mlp([3, 4, 2], seed=0)
    frozen = onlynorm.random_normnet(g, hidden=[4, 4])
    net, report = onlynorm.fit_norms(frozen, g, onlynorm.Box(-1, 1), seed=seed, method="layerwise", samples=16)
    assert report.final_error <= report.initial_error


def test_an_explicit_activation_is_taken_at_its_word(tmp_path, capsys):
    """`--activation relu` states what a bare state_dict cannot: no note; any other activation is refused in one
    line (CLI) or with UnsupportedActivationError (API), before anything is written."""
    from safetensors.torch import save_file

    from onlynorm.targets import load_target

    save_file(random_mlp([3, 4, 2], seed=0).state_dict(), str(tmp_path / "g.safetensors"))
    out = tmp_path / "f.safetensors"
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", str(tmp_path / "g.safetensors"), "--out", str(out), "--activation", "relu"])
    captured = capsys.readouterr()
    assert info.value.code == 0 and "note:" not in captured.out and out.exists()
    for command in (
        ["reconstruct", "--out", str(tmp_path / "x.safetensors")],
        ["init", "--out", str(tmp_path / "y.safetensors")],
    ):
        code, err = _run([command[0], str(tmp_path / "g.safetensors"), *command[1:], "--activation", "tanh"], capsys)
        _assert_refused(code, err, contains="expected 'relu'")
        assert not (tmp_path / command[2].rsplit("/", 1)[-1]).exists()
    with pytest.raises(onlynorm.UnsupportedActivationError, match="found 'gelu'"):
        load_target(tmp_path / "g.safetensors", activation="gelu")
    assert load_target(tmp_path / "g.safetensors", activation="ReLU").dims == [3, 4, 2]
