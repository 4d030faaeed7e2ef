"""What the commands share: the consoles, the progress bar the constructions feed, the box from ``--low/--high``,
and reading a target file (with the note that a bare state_dict is assumed to be a ReLU MLP)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..domain import Box
from ..targets.convert import RELU_ASSUMED, read_target

__all__ = ["console", "err_console", "LayerProgress", "domain_from_options", "load_target", "ACTIVATION_HELP"]

console = Console()
err_console = Console(stderr=True)


def domain_from_options(low: float | None, high: float | None, stored=None):
    """The box from ``--low/--high``; a bound not given comes from ``stored`` (the box a network was solved on)
    if there is one, else from the default ``[-1, 1]``."""
    if low is None and high is None:
        return stored
    if stored is not None:
        return Box(stored.low if low is None else low, stored.high if high is None else high)
    return Box(-1.0 if low is None else low, 1.0 if high is None else high)


class LayerProgress:
    """A transient rich progress bar fed by the constructions' ``progress(done, total, message)`` callback; nothing
    at all when stderr is not a terminal (a transient bar still leaves an empty line there, before any error)."""

    def __init__(self, description: str):
        self._progress = (
            Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            )
            if err_console.is_terminal
            else None
        )
        self._description = description
        self._task = TaskID(0)

    def __enter__(self) -> LayerProgress:
        if self._progress is not None:
            self._progress.__enter__()
            self._task = self._progress.add_task(self._description, total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, done: int, total: int, message: str) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=done, total=total, description=f"{self._description}: {message}"
            )


#: the ``--activation`` option of every command that reads a target file
ACTIVATION_HELP = (
    "The target model's activation, for a bare state_dict (it records only weights): relu. Without it, ReLU is "
    "assumed and a note says so; any other activation is refused."
)


def load_target(path: Path, activation: str | None = None):
    """The target in ``path``; a bare state_dict gets a note on stdout that its activation is assumed to be ReLU
    (unless ``activation`` states it)."""
    spec, relu_assumed = read_target(path, activation=activation)
    if relu_assumed:
        console.print(RELU_ASSUMED.format(name=Path(path).name), highlight=False, soft_wrap=True, markup=False)
    return spec
