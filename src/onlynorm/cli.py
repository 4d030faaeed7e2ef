"""``onlynorm`` command line: a thin typer app over the public API.

Every deliberate refusal (:class:`~onlynorm.errors.OnlyNormError`) becomes one line on stderr and exit code 2;
``verify`` exits 1 when the networks disagree beyond the tolerance. Outputs are written atomically.
Set ``ONLYNORM_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from .demos.report import print_rows
from .errors import OnlyNormError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reconstruct ReLU networks exactly by tuning only the BatchNorm γ, β of a frozen random "
                       "network; verify and certify the result.")
console = Console()
err_console = Console(stderr=True)


def _parse_hidden(text: str | None):
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OnlyNormError(f"--hidden: expected an integer or a comma-separated list like 64,128, found {text!r}") from None
    return values[0] if len(values) == 1 else values


def _domain(low: float | None, high: float | None):
    from .domain import Box

    if low is None and high is None:
        return None
    return Box(-1.0 if low is None else low, 1.0 if high is None else high)


class _LayerProgress:
    """A transient rich progress bar fed by the constructions' ``progress(done, total, message)`` callback."""

    def __init__(self, description: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                  console=err_console, transient=True)
        self._description = description
        self._task = None

    def __enter__(self) -> _LayerProgress:
        self._progress.__enter__()
        self._task = self._progress.add_task(self._description, total=None)
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, done: int, total: int, message: str) -> None:
        self._progress.update(self._task, completed=done, total=total, description=f"{self._description}: {message}")


def _reconstruct_help() -> str:
    from .constructions import available_methods, get_construction

    lines = ["Build a frozen random network and solve its BatchNorm γ, β so it computes TARGET on the box.",
             "Methods (--method):"]
    lines += [f"* {name}: {get_construction(name).cost}" for name in available_methods()]
    return "\n\n".join(lines)


@app.command(help=_reconstruct_help())
def reconstruct(
    target: Path = typer.Argument(..., help="Target MLP: safetensors (or .pt) state_dict of nn.Sequential(Linear, ReLU, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the reconstructed network (.safetensors)."),
    method: str = typer.Option("width", help="Construction: width, lowrank, deep or sparse (see above)."),
    seed: int = typer.Option(0, help="Seed of the frozen random weights."),
    low: float | None = typer.Option(None, help="Lower bound of the input box (default -1)."),
    high: float | None = typer.Option(None, help="Upper bound of the input box (default 1)."),
    hidden: str | None = typer.Option(None, help="width: hidden width N per pair (int or list); N < m·n gives least squares."),
    rank: int | None = typer.Option(None, help="lowrank: rank r per layer (default: numerical rank)."),
    block: int | None = typer.Option(None, help="deep: input block size k (default 1)."),
    density: float | None = typer.Option(None, help="sparse: Bernoulli density p of the frozen weights."),
    dtype: str = typer.Option("float64", help="float64 (default, exact to ~1e-13) or float32."),
) -> None:
    import torch

    from . import api
    from .target import load_target

    spec = load_target(target)
    options = {}
    if hidden is not None:
        options["hidden"] = _parse_hidden(hidden)
    for name, value in (("rank", rank), ("block", block), ("density", density)):
        if value is not None:
            options[name] = value
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise OnlyNormError(f"--dtype: expected float64 or float32, found {dtype!r}")
    box = _domain(low, high)
    with _LayerProgress(f"solving ({method})") as progress:
        net = api.reconstruct(spec, method=method, domain=box, seed=seed, dtype=torch_dtype,
                              progress=progress, **options)
    net.save(out)
    print_rows(console, f"reconstructed {target.name} → {out}", net.summary().rows())


@app.command()
def verify(
    net: Path = typer.Argument(..., help="Network written by `onlynorm reconstruct`."),
    target: Path = typer.Argument(..., help="Target MLP file."),
    samples: int = typer.Option(100_000, help="Number of sample points of the box."),
    seed: int = typer.Option(0, help="Seed of the sample points."),
    low: float | None = typer.Option(None, help="Lower bound of the box (default: the one it was solved on)."),
    high: float | None = typer.Option(None, help="Upper bound of the box (default: the one it was solved on)."),
    tolerance: float | None = typer.Option(None, help="Relative tolerance (default 1e-9 in float64)."),
    certify: bool = typer.Option(False, "--certify", help="Also prove equivalence on the whole box (interval bounds)."),
) -> None:
    """Compare NET with TARGET; exit 0 when within tolerance (and certified if asked), 1 when not."""
    from .normnet import NormNet
    from .target import load_target
    from .verify import verify as run_verify

    network = NormNet.load(net)
    spec = load_target(target)
    report = run_verify(network, spec, domain=_domain(low, high), samples=samples, seed=seed,
                               tolerance=tolerance, certify=certify)
    print_rows(console, f"verify {net.name} against {target.name}", report.rows())
    ok = report.passed and (report.certified is not False)
    if not ok:
        raise typer.Exit(1)


@app.command()
def capacity(
    net: Path = typer.Argument(..., help="A frozen (or solved) network file."),
    target: Path = typer.Argument(..., help="Target MLP file."),
) -> None:
    """Can NET's frozen weights express TARGET? Rank and condition of every Khatri–Rao system; exit 1 if not."""
    from .capacity import capacity as run_capacity
    from .normnet import NormNet
    from .target import load_target

    report = run_capacity(NormNet.load(net), load_target(target))
    print_rows(console, f"capacity of {net.name} for {target.name} ({report.method})", report.rows())
    if not report.expressible:
        raise typer.Exit(1)


@app.command()
def demo(
    seed: int = typer.Option(0, help="Seed of the target training and of the frozen network."),
    builtin: bool = typer.Option(False, "--builtin", help="Quick synthetic demo: a random MLP on [0, 2]^6 (seconds)."),
    tasks: bool = typer.Option(False, "--tasks", help="Three digits tasks in one frozen network via swappable norm sets."),
    cnn: bool = typer.Option(False, "--cnn", help="A small CNN (with BatchNorm) on the 8×8 digits, reconstructed exactly."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the results as JSON (atomically)."),
) -> None:
    """The main job: on scikit-learn's digits, reconstruct a trained MLP exactly by solving only BatchNorm γ, β
    of a random frozen network, next to gradient-trained norms of the same network."""
    import importlib

    if builtin + tasks + cnn > 1:
        raise OnlyNormError("choose at most one of --builtin, --tasks, --cnn")
    name = "builtin" if builtin else "tasks" if tasks else "cnn" if cnn else "digits"
    module = importlib.import_module(f".demos.{name}", __package__)
    if not module.run(seed=seed, json_path=json_path, console=console):
        raise typer.Exit(1)


@app.command()
def experiment(
    name: str = typer.Argument(..., help="sparse-threshold, scaling, gd-vs-exact or depth-tradeoff."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes: about a minute."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default runs/NAME)."),
    seed: int = typer.Option(0, help="Seed of every random choice."),
) -> None:
    """Run one experiment of the theory; writes results.json, PNG figures and summary.md into OUT."""
    from .experiments import run_experiment

    run_experiment(name, quick=quick, out=out, seed=seed, console=console)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: OnlyNormError → one line on stderr, exit 2; no tracebacks for bad input."""
    try:
        # standalone mode: typer itself reports usage errors (exit 2) and turns typer.Exit into an exit code
        app(args=argv, prog_name="onlynorm")
    except OnlyNormError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as exc:
        print(f"error: out of memory ({exc or 'allocation failed'}); try --method deep or lowrank", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # an onlynorm bug, not the user's input: one line, unless debugging
        if os.environ.get("ONLYNORM_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set ONLYNORM_DEBUG=1 for a traceback and please "
              "report it)", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":  # pragma: no cover
    main()
