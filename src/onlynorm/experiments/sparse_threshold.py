"""``sparse-threshold``: when is the sparse construction's Khatri–Rao system invertible?

For a ``d × d`` layer the frozen matrices ``A ∈ R^{d²×d}`` and ``B ∈ R^{d×d²}`` carry i.i.d. Bernoulli(``p``)
masks. Invertibility of ``M = Aᵀ ⊙ B`` depends (with probability one) only on the pattern, so each trial draws the
masks and computes the **structural rank** of ``M``'s pattern (maximum bipartite matching): cheap enough to reach
``d = 128`` (``M`` is 16384 × 16384). For small ``d`` every trial is also **confirmed numerically** (rank of ``M``
with Gaussian values on the pattern). Per ``d`` a logistic fit in ``log p`` gives the 50% threshold ``p*(d)``, with a
bootstrap confidence band; ``p*`` is then compared with the paper's rate ``√(log d / d)`` and with ``log d / d``.
The full run (docs/RESULTS.md) finds ``p* ≈ 2·log d / d``: the theorem's density is loose by ``~√(d / log d)``.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.linear_model import LogisticRegression

from ..linalg import kr_pattern, structural_rank
from .runner import ExperimentResult, run_trials, trial_seed

QUICK_DIMS = [4, 8, 12, 16, 24]
FULL_DIMS = [4, 8, 16, 32, 64, 96, 128]
NUMERIC_MAX_D = 24


def density_grid(d: int, points: int = 12) -> np.ndarray:
    """Log-spaced densities from ``log d / (2d)`` to ``2√(log d / d)`` (capped at 1): brackets both rates."""
    lo = max(math.log(d) / (2 * d), 1e-3)
    hi = min(1.0, 2 * math.sqrt(math.log(d) / d))
    return np.geomspace(lo, hi, points)


def trial(d: int, p: float, seed: int, numeric: bool) -> dict:
    rng = np.random.default_rng(seed)
    A = rng.random((d * d, d)) < p
    B = rng.random((d, d * d)) < p
    srank = structural_rank(kr_pattern(A, B))
    out = {"d": d, "p": p, "structural_rank": srank, "invertible": srank == d * d, "numeric_invertible": None}
    if numeric:
        Av = A * rng.standard_normal(A.shape)
        Bv = B * rng.standard_normal(B.shape)
        M = (Av.T[:, None, :] * Bv[None, :, :]).reshape(d * d, d * d)
        out["numeric_invertible"] = bool(np.linalg.matrix_rank(M) == d * d)
    return out


def fit_threshold(ps: np.ndarray, ok: np.ndarray, rng: np.random.Generator, boots: int = 200):
    """50% point of a logistic fit of ``ok`` on ``log p``, with a 90% bootstrap interval (NaN if degenerate)."""

    def one(x, y):
        if y.min() == y.max():
            return float("nan")
        model = LogisticRegression(C=1e4).fit(np.log(x)[:, None], y)
        a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
        return math.exp(-b / a) if a > 0 else float("nan")

    point = one(ps, ok)
    samples = []
    for _ in range(boots):
        idx = rng.integers(0, len(ps), len(ps))
        samples.append(one(ps[idx], ok[idx]))
    finite = np.array([s for s in samples if np.isfinite(s)])
    lo, hi = np.percentile(finite, [5, 95]) if finite.size else (float("nan"), float("nan"))
    return point, float(lo), float(hi)


def run(quick: bool, seed: int, console=None) -> ExperimentResult:
    dims = QUICK_DIMS if quick else FULL_DIMS
    per_point = 16 if quick else 24
    trials = []
    for d in dims:
        for pi, p in enumerate(density_grid(d)):
            for t in range(per_point):
                trials.append(
                    {"d": d, "p": float(p), "seed": trial_seed(seed, d, pi, t), "numeric": d <= NUMERIC_MAX_D}
                )
    rows = run_trials(trial, trials, console=console, description="sparse-threshold trials")
    rng = np.random.default_rng(seed)
    per_d = []
    for d in dims:
        sel = [r for r in rows if r["d"] == d]
        ps = np.array([r["p"] for r in sel])
        ok = np.array([r["invertible"] for r in sel], dtype=int)
        p_star, lo, hi = fit_threshold(ps, ok, rng)
        curve = [{"p": float(p), "fraction": float(ok[ps == p].mean())} for p in sorted(set(ps))]
        numeric = [r for r in sel if r["numeric_invertible"] is not None]
        agree = (sum(r["numeric_invertible"] == r["invertible"] for r in numeric) / len(numeric)) if numeric else None
        per_d.append(
            {
                "d": d,
                "p_star": p_star,
                "p_star_lo": lo,
                "p_star_hi": hi,
                "curve": curve,
                "numeric_checked": len(numeric),
                "numeric_agreement": agree,
                "sqrt_log_d_over_d": math.sqrt(math.log(d) / d),
                "log_d_over_d": math.log(d) / d,
            }
        )
    fits = _fit_rates([r for r in per_d if np.isfinite(r["p_star"])])
    data = {
        "experiment": "sparse-threshold",
        "quick": quick,
        "seed": seed,
        "trials_per_point": per_point,
        "dims": dims,
        "per_d": per_d,
        "fits": fits,
    }
    return ExperimentResult("sparse-threshold", data, {"sparse_threshold.png": _figure(per_d, fits)}, _summary(data))


def _fit_rates(per_d: list[dict]) -> dict:
    if len(per_d) < 2:
        return {}
    d = np.array([r["d"] for r in per_d], dtype=float)
    p = np.array([r["p_star"] for r in per_d])
    out = {}
    for name, rate in (("sqrt(log d / d)", np.sqrt(np.log(d) / d)), ("log d / d", np.log(d) / d)):
        logc = float(np.mean(np.log(p) - np.log(rate)))
        resid = np.log(p) - (logc + np.log(rate))
        out[name] = {"constant": math.exp(logc), "rms_log_residual": float(np.sqrt(np.mean(resid**2)))}
    slope, intercept = np.polyfit(np.log(d), np.log(p), 1)
    out["power law"] = {"exponent": float(slope), "constant": float(math.exp(intercept))}
    return out


def _figure(per_d: list[dict], fits: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(per_d):
        xs = [c["p"] for c in r["curve"]]
        ys = [c["fraction"] for c in r["curve"]]
        ax1.plot(xs, ys, "o-", ms=3, color=cmap(i / max(1, len(per_d) - 1)), label=f"d={r['d']}")
    ax1.set_xscale("log")
    ax1.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("density p of the frozen weights")
    ax1.set_ylabel("P(Khatri–Rao system invertible)")
    ax1.set_title("structural invertibility vs density")
    ax1.legend(fontsize=7)
    good = [r for r in per_d if np.isfinite(r["p_star"])]
    d = np.array([r["d"] for r in good], dtype=float)
    ax2.fill_between(
        d, [r["p_star_lo"] for r in good], [r["p_star_hi"] for r in good], alpha=0.25, label="90% bootstrap band"
    )
    ax2.plot(d, [r["p_star"] for r in good], "ko-", ms=4, label="measured p*(d)")
    grid = np.linspace(d.min(), d.max(), 200) if len(d) else np.array([])
    for name, style in (("sqrt(log d / d)", "--"), ("log d / d", "-.")):
        if name in fits:
            rate = np.sqrt(np.log(grid) / grid) if name.startswith("sqrt") else np.log(grid) / grid
            ax2.plot(
                grid,
                fits[name]["constant"] * rate,
                style,
                label=f"{fits[name]['constant']:.2f}·{name} (rms log err {fits[name]['rms_log_residual']:.2f})",
            )
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("d")
    ax2.set_ylabel("50% threshold p*(d)")
    ax2.set_title("threshold vs the theory's rate")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(data: dict) -> str:
    lines = [
        "# sparse-threshold",
        "",
        f"Structural invertibility of the sparse width construction's Khatri–Rao system ({data['trials_per_point']} "
        "trials per density, seed {}).".format(data["seed"]),
        "",
        "| d | p*(d) | 90% band | √(log d/d) | log d/d | numeric check (trials, agreement) |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["per_d"]:
        agree = "—" if r["numeric_agreement"] is None else f"{r['numeric_checked']}, {r['numeric_agreement']:.3f}"
        lines.append(
            f"| {r['d']} | {r['p_star']:.3g} | [{r['p_star_lo']:.3g}, {r['p_star_hi']:.3g}] | "
            f"{r['sqrt_log_d_over_d']:.3g} | {r['log_d_over_d']:.3g} | {agree} |"
        )
    fits = data["fits"]
    if fits:
        lines += ["", "Fits of p*(d):", ""]
        for name in ("sqrt(log d / d)", "log d / d"):
            lines.append(
                f"* p* ≈ {fits[name]['constant']:.3f} · {name}  (rms log residual {fits[name]['rms_log_residual']:.3f})"
            )
        lines.append(
            f"* free power law: p* ≈ {fits['power law']['constant']:.3f} · d^{fits['power law']['exponent']:.3f}"
        )
    return "\n".join(lines) + "\n"
