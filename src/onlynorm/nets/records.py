"""Typed records of how a network was made and solved, with a JSON round trip.

* :class:`SolveRecord` — one solved system (or group of systems) of one target layer. Its ``relative_residual``
  has ONE definition for every construction, ``‖Ŵ − W‖_F / ‖W‖_F`` (:func:`onlynorm.linalg.relative_residual`), and ``residual``
  is ``max |Ŵ − W|`` (absolute, entrywise), where ``Ŵ`` is the weight the frozen network realises.
* :class:`SolveInfo` — all records of a solve, whether every layer is exact, notes, and the box.
* :class:`Phase`, :class:`FitReport` — what :func:`onlynorm.fit_norms` did (per method run: held-out error
  before/after, seconds, iterations).
* :class:`NetMeta` — what a :class:`~onlynorm.nets.normnet.NormNet` knows about itself (method, seed, options, target
  dims, image shape, solve info, fit report); saved as JSON next to the weights.

The JSON form is a plain dictionary of the same keys: :meth:`NetMeta.from_dict` reads it and validates every
field's JSON type, so a tampered file is refused with the field named.

>>> rec = SolveRecord(layer=0, kind="square", residual=1e-15, relative_residual=2e-16, exact=True)
>>> meta = NetMeta(method="width", seed=0, target_dims=[3, 2])
>>> NetMeta.from_dict(meta.to_dict()) == meta
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..domain import Box
from ..errors import FileFormatError, InvalidDomainError

__all__ = ["SolveRecord", "SolveInfo", "Phase", "FitReport", "NetMeta"]


def _bad(source: str, what: str, expected: str, found: Any) -> FileFormatError:
    shown = repr(found)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return FileFormatError(
        f"{source}: metadata field {what!r} must be {expected}, found {shown} "
        f"({type(found).__name__}); the file is corrupt or was edited — re-create it"
    )


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _ints(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


@dataclass(frozen=True)
class SolveRecord:
    """One target layer's solve: ``kind`` (``square``, ``least-squares``, ``min-norm``, ``lowrank``, ``batched``),
    ``residual = max|Ŵ − W|``, ``relative_residual = ‖Ŵ − W‖_F/‖W‖_F``, ``exact``, the pivot-ratio ``rcond``, how it
    was computed (``precision``, refinement ``steps``) and construction-specific ``details`` (rank, blocks...)."""

    layer: int
    kind: str
    residual: float
    relative_residual: float
    exact: bool
    rcond: float | None = None
    precision: str | None = None
    steps: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "layer": self.layer,
            "kind": self.kind,
            "residual": self.residual,
            "relative_residual": self.relative_residual,
            "exact": self.exact,
            "rcond": self.rcond,
            "precision": self.precision,
            "steps": self.steps,
        }
        out.update(self.details)
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "network") -> SolveRecord:
        if not isinstance(d, dict):
            raise _bad(source, "solve.layers[]", "an object", d)
        known = {"layer", "kind", "residual", "relative_residual", "exact", "rcond", "precision", "steps"}
        for key, ok, expected in (
            ("layer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer"),
            ("residual", _number, "a number"),
            ("relative_residual", _number, "a number"),
            ("exact", lambda v: isinstance(v, bool), "true or false"),
        ):
            if not ok(d.get(key)):
                raise _bad(source, f"solve.layers[].{key}", expected, d.get(key))
        rcond = d.get("rcond")
        if rcond is not None and not _number(rcond):
            raise _bad(source, "solve.layers[].rcond", "a number or null", rcond)
        precision = d.get("precision")
        if precision is not None and not isinstance(precision, str):
            raise _bad(source, "solve.layers[].precision", "a string or null", precision)
        return cls(
            layer=d["layer"],
            kind=str(d.get("kind", "")),
            residual=float(d["residual"]),
            relative_residual=float(d["relative_residual"]),
            exact=d["exact"],
            rcond=None if rcond is None else float(rcond),
            precision=precision,
            steps=d.get("steps") if isinstance(d.get("steps"), int) else None,
            details={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class SolveInfo:
    """All records of one solve, the box it was solved for, and notes (approximations, truncations)."""

    records: tuple[SolveRecord, ...]
    domain: Box
    notes: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return all(r.exact for r in self.records)

    @property
    def max_relative_residual(self) -> float | None:
        return max((r.relative_residual for r in self.records), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "layers": [r.to_dict() for r in self.records],
            "notes": list(self.notes),
            "domain": self.domain.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "network") -> SolveInfo:
        if not isinstance(d, dict):
            raise _bad(source, "solve", "an object", d)
        layers, notes, domain = d.get("layers", []), d.get("notes", []), d.get("domain")
        if not isinstance(layers, list):
            raise _bad(source, "solve.layers", "a list", layers)
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise _bad(source, "solve.notes", "a list of strings", notes)
        if (
            not isinstance(domain, dict)
            or not isinstance(domain.get("low"), (list, int, float))
            or not isinstance(domain.get("high"), (list, int, float))
        ):
            raise _bad(source, "solve.domain", 'an object {"low": [...], "high": [...]}', domain)
        try:
            box = Box.from_dict(domain)
        except InvalidDomainError as exc:
            raise FileFormatError(f"{source}: metadata field 'solve.domain' is not a valid box ({exc})") from None
        return cls(records=tuple(SolveRecord.from_dict(r, source) for r in layers), domain=box, notes=tuple(notes))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SolveInfo) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Phase:
    """One method's run: relative RMS error on the held-out points before and after it, wall time, iterations."""

    name: str
    error_before: float
    error_after: float
    seconds: float
    iterations: int
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    #: held-out error after each iteration (gauss-newton: after each *accepted* step)
    history: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any, source: str = "network") -> Phase:
        if not isinstance(d, dict):
            raise _bad(source, "fit.phases[]", "an object", d)
        name, notes, details, history = d.get("name"), d.get("notes", []), d.get("details", {}), d.get("history", [])
        if not isinstance(name, str):
            raise _bad(source, "fit.phases[].name", "a string", name)
        for key in ("error_before", "error_after", "seconds"):
            if not _number(d.get(key)):
                raise _bad(source, f"fit.phases[].{key}", "a number", d.get(key))
        if not (isinstance(d.get("iterations"), int) and not isinstance(d.get("iterations"), bool)):
            raise _bad(source, "fit.phases[].iterations", "an integer", d.get("iterations"))
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise _bad(source, "fit.phases[].notes", "a list of strings", notes)
        if not isinstance(details, dict):
            raise _bad(source, "fit.phases[].details", "an object", details)
        if not isinstance(history, list) or not all(_number(h) for h in history):
            raise _bad(source, "fit.phases[].history", "a list of numbers", history)
        return cls(
            name=name,
            error_before=float(d["error_before"]),
            error_after=float(d["error_after"]),
            seconds=float(d["seconds"]),
            iterations=d["iterations"],
            notes=list(notes),
            details=dict(details),
            history=[float(h) for h in history],
        )


def _fit_extras(d: dict, source: str) -> dict[str, Any]:
    """The optional fields of a stored fit report (files written before they existed have none)."""
    out: dict[str, Any] = {}
    for key in ("stopped", "budget_source"):
        if key in d:
            if not isinstance(d[key], str):
                raise _bad(source, f"fit.{key}", "a string", d[key])
            out[key] = d[key]
    for key in ("budget_seconds", "agreement"):
        if d.get(key) is not None:
            if not _number(d[key]):
                raise _bad(source, f"fit.{key}", "a number or null", d[key])
            out[key] = float(d[key])
    return out


@dataclass
class FitReport:
    """Outcome of :func:`onlynorm.fit_norms`."""

    method: str
    train_samples: int
    held_out_samples: int
    initial_error: float
    phases: list[Phase] = field(default_factory=list)
    exact: bool = False
    notes: list[str] = field(default_factory=list)
    #: why the fit ended: "exact", "converged", "budget", "steps" or "done" (closed form / layer-wise)
    stopped: str = ""
    #: the wall-time budget used (given, or auto's default) and where it came from
    budget_seconds: float | None = None
    budget_source: str = ""
    #: argmax agreement with the target on the held-out points (outputs with ≥ 2 columns: classifiers)
    agreement: float | None = None

    @property
    def final_error(self) -> float:
        return self.phases[-1].error_after if self.phases else self.initial_error

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def iterations(self) -> int:
        return sum(p.iterations for p in self.phases)

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r} in this report; phases: {[p.name for p in self.phases]}")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form stored in a network's metadata (``meta.fit``), with the derived totals for readers."""
        d = asdict(self)
        d.update(final_error=self.final_error, seconds=self.seconds)
        return d

    to_dict = as_dict

    @classmethod
    def from_dict(cls, d: Any, source: str = "network") -> FitReport:
        """Read (and type-check) the stored form; the derived ``final_error``/``seconds`` are recomputed."""
        if not isinstance(d, dict):
            raise _bad(source, "fit", "an object", d)
        method, phases, notes = d.get("method"), d.get("phases", []), d.get("notes", [])
        if not isinstance(method, str):
            raise _bad(source, "fit.method", "a string", method)
        for key in ("train_samples", "held_out_samples"):
            if not (isinstance(d.get(key), int) and not isinstance(d.get(key), bool) and d[key] >= 0):
                raise _bad(source, f"fit.{key}", "a non-negative integer", d.get(key))
        if not _number(d.get("initial_error")):
            raise _bad(source, "fit.initial_error", "a number", d.get("initial_error"))
        if not isinstance(phases, list):
            raise _bad(source, "fit.phases", "a list", phases)
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise _bad(source, "fit.notes", "a list of strings", notes)
        return cls(
            method=method,
            train_samples=d["train_samples"],
            held_out_samples=d["held_out_samples"],
            initial_error=float(d["initial_error"]),
            phases=[Phase.from_dict(p, source) for p in phases],
            exact=bool(d.get("exact", False)),
            notes=list(notes),
            **_fit_extras(d, source),
        )

    def table(self) -> tuple[list[str], list[list[str]]]:
        header = ["phase", "held-out rel RMS before", "after", "seconds", "iterations"]
        rows = [
            [p.name, f"{p.error_before:.3e}", f"{p.error_after:.3e}", f"{p.seconds:.3f}", str(p.iterations)]
            for p in self.phases
        ]
        return header, rows

    def rows(self) -> list[tuple[str, str]]:
        out = [
            ("method", self.method),
            ("points (train / held-out)", f"{self.train_samples} / {self.held_out_samples}"),
            ("held-out rel RMS at start", f"{self.initial_error:.3e}"),
            ("held-out rel RMS at end", f"{self.final_error:.3e}"),
            ("exact", "yes" if self.exact else "no"),
            ("seconds", f"{self.seconds:.3f}"),
        ]
        if self.budget_seconds is not None:
            out.append(("budget (s)", f"{self.budget_seconds:.3f} ({self.budget_source or 'given'})"))
        if self.stopped:
            out.append(("stopped", self.stopped))
        if self.agreement is not None:
            out.append(("argmax agreement (held-out)", f"{self.agreement:.4f}"))
        return out + [("note", n) for n in self.notes + [n for p in self.phases for n in p.notes]]

    def __str__(self) -> str:
        header, rows = self.table()
        lines = ["  ".join(header)] + ["  ".join(r) for r in rows]
        w = max(len(k) for k, _ in self.rows())
        return "\n".join(lines + [f"{k:<{w}}  {v}" for k, v in self.rows()])


_META_FIELDS = ("method", "seed", "options", "target_dims", "target_parameters", "in_shape", "solve", "fit")


@dataclass
class NetMeta(Mapping):
    """How a NormNet was made: ``method``, ``seed``, ``options``, ``target_dims``, ``target_parameters``,
    ``in_shape`` (image targets), ``solve`` (a :class:`SolveInfo` once solved), ``fit`` (a :class:`FitReport` once
    :func:`onlynorm.fit_norms` tuned it) and ``extra`` (keys other tools add, kept as they are).

    A mapping view (``meta["seed"]``, ``meta.get("solve")``) reads the JSON form: it yields exactly what
    :meth:`to_dict` writes.
    """

    method: str | None = None
    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    target_dims: list[int] | None = None
    target_parameters: int | None = None
    in_shape: list[int] | None = None
    solve: SolveInfo | None = None
    fit: FitReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for name in _META_FIELDS:
            value = getattr(self, name)
            if name == "options":
                out[name] = dict(value)
            elif value is not None:
                out[name] = value.to_dict() if name in ("solve", "fit") else value
        return out

    @classmethod
    def from_dict(cls, d: Any, source: str = "network") -> NetMeta:
        """Read (and type-check) a metadata dictionary: the layout :meth:`to_dict` writes."""
        if d is None:
            return cls()
        if isinstance(d, NetMeta):
            return d
        if not isinstance(d, dict):
            raise _bad(source, "meta", "an object", d)
        method, seed, options = d.get("method"), d.get("seed"), d.get("options", {})
        if method is not None and not isinstance(method, str):
            raise _bad(source, "method", "a string", method)
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise _bad(source, "seed", "a non-negative integer", seed)
        if not isinstance(options, dict):
            raise _bad(source, "options", "an object", options)
        for key in ("target_dims", "in_shape"):
            if d.get(key) is not None and not (_ints(d[key]) and all(v >= 1 for v in d[key])):
                raise _bad(source, key, "a list of positive integers", d[key])
        params = d.get("target_parameters")
        if params is not None and not (isinstance(params, int) and not isinstance(params, bool) and params >= 0):
            raise _bad(source, "target_parameters", "a non-negative integer", params)
        solve = d.get("solve")
        if isinstance(solve, SolveInfo):
            info: SolveInfo | None = solve
        else:
            info = None if solve is None else SolveInfo.from_dict(solve, source)
        fit = d.get("fit")
        report = fit if isinstance(fit, FitReport) or fit is None else FitReport.from_dict(fit, source)
        return cls(
            method=method,
            seed=seed,
            options=dict(options),
            target_dims=d.get("target_dims"),
            target_parameters=params,
            in_shape=d.get("in_shape"),
            solve=info,
            fit=report,
            extra={k: v for k, v in d.items() if k not in _META_FIELDS},
        )

    def replace(self, **changes: Any) -> NetMeta:
        """A copy with some fields changed (the solve writes its :class:`SolveInfo` on the solved copy)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        d["options"], d["extra"] = dict(d["options"]), dict(d["extra"])
        return NetMeta(**d)

    # ------------------------------------------------------------------ mapping view (the JSON layout)
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        """``meta[key] = value``: a typed field (validated) or an extra key."""
        if key in _META_FIELDS:
            typed = NetMeta.from_dict({key: value}, "meta")
            setattr(self, key, getattr(typed, key))
        else:
            self.extra[key] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NetMeta):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]
