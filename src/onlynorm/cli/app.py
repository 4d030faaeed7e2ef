"""``onlynorm`` command line: a thin typer app over the public API.

Every deliberate refusal (:class:`~onlynorm.errors.OnlyNormError`) becomes one line on stderr and exit code 2;
``verify`` exits 1 when the networks disagree beyond the tolerance. Outputs are written atomically.
Set ``ONLYNORM_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import typer
from rich.file_proxy import FileProxy
from typer._click.exceptions import ClickException
from typer.exceptions import Abort
from typer.main import get_command

from .. import api
from .._io import check_output_dir, check_output_path, plain_text
from .._version import __version__
from ..constructions import available_methods, get_construction
from ..constructions.capacity import capacity as run_capacity
from ..demos.report import print_rows, print_table
from ..errors import InvalidOptionError, OnlyNormError
from ..experiments import run_experiment
from ..nets.normnet import NormNet
from ..nets.onnx import export_onnx
from ..options import check_seed
from ..verify import verify as run_verify
from .common import ACTIVATION_HELP, LayerProgress, console, domain_from_options, err_console, load_target
from .fit import load_fit_data, run_fit

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reconstruct ReLU networks exactly by tuning only the BatchNorm γ, β of a frozen random "
    "network; verify and certify the result.",
)


def _version(value: bool) -> None:
    if value:
        try:
            number = version("onlynorm")
        except PackageNotFoundError:  # running from a source tree that was never installed
            number = __version__
        print(f"onlynorm {number}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the installed version and exit."
    ),
) -> None:
    """Reconstruct ReLU networks exactly by tuning only the BatchNorm γ, β of a frozen random network; verify and
    certify the result."""


def _methods_help(intro: str) -> str:
    """``intro`` and one line per construction (``--method``), as typer shows a command's help."""
    lines = [intro, "Methods (--method):"] + [
        f"* {name}: {get_construction(name).cost}" for name in available_methods()
    ]
    return "\n\n".join(lines)


def _reconstruct_help() -> str:
    return _methods_help("Build a frozen random network and solve its BatchNorm γ, β so it computes TARGET on the box.")


def reconstruct(
    target: Path = typer.Argument(
        ...,
        help="Target: safetensors (or .pt) state_dict of nn.Sequential(Linear, ReLU, "
        "...), or a CNN saved by ConvNetSpec.save.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the reconstructed network (.safetensors)."),
    method: str = typer.Option("width", help="Construction (see above)."),
    seed: int = typer.Option(0, help="Seed of the frozen random weights (0 ≤ seed < 2⁶⁴)."),
    low: float | None = typer.Option(None, help="Lower bound of the input box (default -1)."),
    high: float | None = typer.Option(None, help="Upper bound of the input box (default 1)."),
    dtype: str = typer.Option("float64", help="float64 (default, exact to ~1e-13) or float32."),
    activation: str | None = typer.Option(None, "--activation", help=ACTIVATION_HELP),
    **options: str | None,
) -> None:
    check_output_path(out, inputs=(target,))
    spec = load_target(target, activation)
    torch_dtype = _torch_dtype(dtype)
    given = _given_options(options)
    box = domain_from_options(low, high)
    with LayerProgress(f"solving ({method})") as progress:
        net = api.reconstruct(spec, method=method, domain=box, seed=seed, dtype=torch_dtype, progress=progress, **given)
    net.save(out)
    print_rows(console, f"reconstructed {target.name} → {out}", net.summary().rows())


def _torch_dtype(dtype: str):
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise InvalidOptionError(f"--dtype: expected float64 or float32, found {dtype!r}")
    return torch_dtype


def _given_options(options: dict[str, str | None]) -> dict:
    """The construction options given on the command line, parsed and checked by their declarations."""
    return {name: _option_specs()[name].parse_text(text) for name, text in options.items() if text is not None}


def _init_help() -> str:
    return _methods_help(
        "Write the frozen random network for TARGET by --method, with its norms at identity (γ = 1, β = 0) — the "
        "FROZEN input of `onlynorm fit` (or `onlynorm capacity`). Nothing is solved."
    )


def init(
    target: Path = typer.Argument(
        ..., help="Target: safetensors (or .pt) state_dict of nn.Sequential(Linear, ReLU, ...), or a CNN file."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the frozen network (.safetensors)."),
    method: str = typer.Option("width", help="Construction whose frozen network to draw (see above)."),
    seed: int = typer.Option(0, help="Seed of the frozen random weights (0 ≤ seed < 2⁶⁴)."),
    dtype: str = typer.Option("float64", help="float64 (default) or float32."),
    activation: str | None = typer.Option(None, "--activation", help=ACTIVATION_HELP),
    **options: str | None,
) -> None:
    check_seed(seed, "--seed")
    check_output_path(out, inputs=(target,))
    torch_dtype = _torch_dtype(dtype)
    given = _given_options(options)
    spec = load_target(target, activation)
    net = api.random_normnet(spec, method=method, seed=seed, dtype=torch_dtype, **given)
    net.save(out)
    print_rows(console, f"frozen network for {target.name} → {out} (norms at identity)", net.summary().rows())


def _option_specs() -> dict:
    """Every construction's declared options by name (one declaration: the API validates against the same)."""

    specs: dict = {}
    for name in available_methods():
        for spec in get_construction(name).option_specs():
            specs.setdefault(spec.name, spec)
    return specs


def _with_option_flags(fn):
    """Give ``fn`` one ``--NAME`` flag per declared construction option (typer reads ``__signature__``)."""

    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    for name, spec in _option_specs().items():
        users = [m for m in available_methods() if any(s.name == name for s in get_construction(m).option_specs())]
        default = typer.Option(None, f"--{name}", help=f"{'/'.join(users)}: {spec.cli_help()}")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=str | None))
    fn.__signature__ = inspect.Signature(params)
    return fn


reconstruct = app.command(help=_reconstruct_help())(_with_option_flags(reconstruct))
init = app.command(help=_init_help())(_with_option_flags(init))


@app.command()
def fit(
    frozen: Path = typer.Argument(
        ..., help="Frozen network: a NormNet file (onlynorm reconstruct/NormNet.save, or with_norms(model).save)."
    ),
    target: Path = typer.Argument(..., help="Target MLP/CNN file."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the fitted network (.safetensors)."),
    data: Path | None = typer.Option(
        None, help="Inputs to fit on: a safetensors file holding one tensor (n, features)."
    ),
    low: float | None = typer.Option(None, help="Lower bound of the box to sample (default -1; not with --data)."),
    high: float | None = typer.Option(None, help="Upper bound of the box to sample (default 1; not with --data)."),
    method: str = typer.Option("auto", help="auto, exact, layerwise, gauss-newton or adam."),
    budget: float | None = typer.Option(None, help="Wall-time budget in seconds (auto, gauss-newton, adam)."),
    seed: int = typer.Option(0, help="Seed of the sampled points and splits."),
    activation: str | None = typer.Option(None, "--activation", help=ACTIVATION_HELP),
) -> None:
    """Fit only the BatchNorm γ, β of FROZEN to TARGET — exact where the network can express it, the best
    approximation otherwise; prints the report (held-out error per phase)."""
    check_seed(seed, "--seed")
    check_output_path(out, inputs=tuple(p for p in (frozen, target, data) if p is not None))
    net, report = run_fit(
        frozen,
        target,
        load_fit_data(data, low, high),
        method=method,
        budget=budget,
        seed=seed,
        progress_factory=LayerProgress,
        activation=activation,
    )
    net.save(out)
    header, rows = report.table()
    print_table(console, f"fitted {frozen.name} to {target.name} → {out}", header, rows)
    print_rows(console, "summary", report.rows())


@app.command()
def verify(
    net: Path = typer.Argument(..., help="Network written by `onlynorm reconstruct`."),
    target: Path = typer.Argument(..., help="Target file."),
    samples: int = typer.Option(100_000, help="Number of sample points of the box."),
    seed: int = typer.Option(0, help="Seed of the sample points."),
    low: float | None = typer.Option(None, help="Lower bound of the box (default: the one it was solved on)."),
    high: float | None = typer.Option(None, help="Upper bound of the box (default: the one it was solved on)."),
    tolerance: float | None = typer.Option(None, help="Relative tolerance (default 1e-9 in float64)."),
    certify: bool = typer.Option(
        False,
        "--certify",
        help="Also prove equivalence on the whole box; exit 0 only if the proven bound meets the tolerance too.",
    ),
    activation: str | None = typer.Option(None, "--activation", help=ACTIVATION_HELP),
) -> None:
    """Compare NET with TARGET; exit 0 when within tolerance (and, with --certify, proven within it), 1 when not."""

    network = NormNet.load(net)
    spec = load_target(target, activation)
    stored = network.meta.solve.domain if network.meta.solve is not None else None
    report = run_verify(
        network,
        spec,
        domain=domain_from_options(low, high, stored),
        samples=samples,
        seed=seed,
        tolerance=tolerance,
        certify=certify,
    )
    print_rows(console, f"verify {net.name} against {target.name}", report.rows())
    if not report.ok:
        err_console.print(f"not verified: {report.failure()}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def capacity(
    net: Path = typer.Argument(..., help="A frozen (or solved) network file."),
    target: Path = typer.Argument(..., help="Target file (an MLP, or a CNN saved by ConvNetSpec.save)."),
    activation: str | None = typer.Option(None, "--activation", help=ACTIVATION_HELP),
) -> None:
    """Can NET's frozen weights express TARGET? Rank and condition of every Khatri–Rao system; exit 1 if not."""

    report = run_capacity(NormNet.load(net), load_target(target, activation))
    print_rows(console, f"capacity of {net.name} for {target.name} ({report.method})", report.rows())
    if not report.expressible:
        raise typer.Exit(1)


@app.command()
def export(
    net: Path = typer.Argument(..., help="Network written by `onlynorm reconstruct` (.safetensors)."),
    onnx: Path = typer.Option(
        ..., "--onnx", help="Where to write the ONNX file (needs the onnx extra: pip install onlynorm\\[onnx])."
    ),
) -> None:
    """Export NET as ONNX: MatMul/Conv, BatchNormalization, Relu, pooling; float64 or float32."""

    check_output_path(onnx, inputs=(net,))
    info = export_onnx(NormNet.load(net), onnx)
    print_rows(
        console,
        f"exported {net.name} → {onnx}",
        [
            ("opset", str(info["opset"])),
            ("nodes", str(info["nodes"])),
            ("dtype", info["dtype"]),
            ("input shape", " × ".join(map(str, info["inputs"]))),
        ],
    )


@app.command()
def demo(
    seed: int = typer.Option(0, help="Seed of the target training and of the frozen network."),
    builtin: bool = typer.Option(False, "--builtin", help="Quick synthetic demo: a random MLP on [0, 2]^6 (seconds)."),
    tasks: bool = typer.Option(
        False, "--tasks", help="Three digits tasks in one frozen network via swappable norm sets."
    ),
    cnn: bool = typer.Option(
        False, "--cnn", help="A small CNN (with BatchNorm) on the 8×8 digits, reconstructed exactly."
    ),
    resnet: bool = typer.Option(
        False,
        "--resnet",
        help="A CIFAR-geometry ResNet-20 reconstructed exactly by "
        "method='deep' (minutes), and what ResNet-18/50 at 224×224 would need.",
    ),
    imagenet: bool = typer.Option(
        False,
        "--imagenet",
        help="With --resnet: also reconstruct ResNet-18 and ResNet-50 at 3×224×224 by deep, tied=True "
        "and verify them on 2 images (about 15 more minutes on 2 cores).",
    ),
    transformer: bool = typer.Option(
        False,
        "--transformer",
        help="A small transformer on the digits read as 8 tokens of 8 pixels, reconstructed exactly (seconds).",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON (atomically)."),
) -> None:
    """The main job: on scikit-learn's digits, reconstruct a trained MLP exactly by solving only BatchNorm γ, β
    of a random frozen network, next to gradient-trained norms of the same network."""

    if builtin + tasks + cnn + resnet + transformer > 1:
        raise OnlyNormError("choose at most one of --builtin, --tasks, --cnn, --resnet, --transformer")
    if json_path is not None:
        check_output_path(json_path)
    if imagenet and not resnet:
        raise OnlyNormError("--imagenet extends --resnet: use onlynorm demo --resnet --imagenet")
    flags = {"builtin": builtin, "tasks": tasks, "cnn": cnn, "resnet": resnet, "transformer": transformer}
    name = next((flag for flag, given in flags.items() if given), "digits")
    module = importlib.import_module(f"..demos.{name}", __package__)  # onlynorm.demos.NAME, beside this package
    extra = {"imagenet": True} if imagenet else {}
    if not module.run(seed=seed, json_path=json_path, console=console, **extra):
        raise typer.Exit(1)


@app.command()
def experiment(
    name: str = typer.Argument(
        ...,
        help="sparse-threshold, scaling, gd-vs-exact, depth-tradeoff, under-parameterized, fine-tune-capacity or "
        "ln-tuning-capacity.",
    ),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: about a minute."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default runs/NAME)."),
    seed: int = typer.Option(0, help="Seed of every random choice."),
    backend: str = typer.Option("local", help="local (this machine's cores) or dask (a Dask cluster)."),
    scheduler: str | None = typer.Option(
        None,
        help="dask: scheduler address like tcp://HOST:8786 (default: $ONLYNORM_SCHEDULER, else a "
        "LocalCluster of one-thread worker processes).",
    ),
    reference: bool = typer.Option(
        False,
        "--reference",
        help="under-parameterized: add a long multi-start search per cell (best-known error) on the goal grid.",
    ),
) -> None:
    """Run one experiment of the theory; writes results.json, PNG figures and summary.md into OUT."""

    check_seed(seed, "--seed")
    if out is not None:
        check_output_dir(out)

    if backend == "dask" and not scheduler:
        scheduler = os.environ.get("ONLYNORM_SCHEDULER") or None
    run_experiment(
        name,
        quick=quick,
        out=out,
        seed=seed,
        console=console,
        backend=backend,
        scheduler=scheduler,
        reference=reference,
    )


class _Terminated(Exception):
    """Raised by the SIGTERM handler so that ``finally`` blocks (temporary files) run before exit 143."""


def _terminate(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise _Terminated()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every refusal is one line on stderr and exit 2 — OnlyNormError, usage errors, memory;
    Ctrl-C / SIGTERM exit 130 / 143 quietly, leaving no partial file. Unexpected errors: one line, exit 3."""

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = get_command(app).main(args=argv, prog_name="onlynorm", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C inside a command into Exit(130), which is returned here
            raise KeyboardInterrupt
        sys.exit(code if isinstance(code, int) else 0)
    except OnlyNormError as exc:
        _fail(f"error: {exc}", 2)
    except ClickException as exc:  # usage errors: one line, not a box
        _fail(f"error: {exc.format_message()} (see onlynorm --help)", 2)
    except (KeyboardInterrupt, Abort):
        _fail("interrupted; nothing was written", 130)
    except _Terminated:
        _fail("terminated; nothing was written", 143)
    except MemoryError as exc:
        _fail(
            f"error: out of memory ({exc or 'allocation failed'}); try --method deep or lowrank, or fewer --samples", 2
        )
    except RecursionError:
        _fail("error: the input is nested too deeply to process; expected a flatter architecture description", 2)
    except OSError as exc:  # the file system refused (name too long, permission, disk full): the input, not a bug
        if exc.errno is None:
            _internal(exc)
        where = f": {exc.filename!r:.120}" if exc.filename else ""
        _fail(f"error: cannot access a file{where} ({exc.strerror or exc}); check the path and the disk", 2)
    except Exception as exc:  # an onlynorm bug, not the user's input: one line, unless debugging
        _internal(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _internal(exc: BaseException) -> None:
    if os.environ.get("ONLYNORM_DEBUG"):
        raise exc
    first = str(exc).splitlines()[0] if str(exc) else ""
    _fail(
        f"internal error: {type(exc).__name__}: {first} (set ONLYNORM_DEBUG=1 for a traceback and please report it)", 3
    )


def _fail(message: str, code: int) -> None:
    stream = sys.stderr
    while isinstance(stream, FileProxy):  # an interrupted rich progress bar can leave stderr redirected into it
        stream = stream.rich_proxied_file
    print(plain_text(message), file=stream, flush=True)  # one line without escape codes, whatever the message held
    sys.exit(code)
