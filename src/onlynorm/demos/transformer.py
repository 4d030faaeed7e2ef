"""``onlynorm demo --transformer``: a small transformer classifier on the 8×8 digits, reconstructed exactly.

1. Each digit is read as a sequence of 8 tokens — its 8 pixel rows, 8 pixels each (scaled to ``[0, 1]``). A
   transformer (:class:`DigitsTransformer`: a per-token ``Linear(8 → d)`` embedding, a learned class token, a
   learned positional table, pre-norm ``nn.TransformerEncoder`` blocks with a final LayerNorm, a linear head on the
   class token) is trained normally (Adam, cross-entropy, every parameter) for a few epochs.
2. :func:`onlynorm.reconstruct` with its default method for sequence models (``"deep"``) builds a frozen random
   network in which every linear map (embedding, positional table, class token, q/k/v/out projections, MLP layers,
   head) is ``Σ B diag(γ) A`` with only ``γ, β`` solved, and the LayerNorms kept with the target's ``γ, β``.

Reported: wall time (training / reconstruction / verification), the process's peak resident memory, frozen and
tunable counts, the max relative error on fresh random inputs (uniform in ``[0, 1]^{8×8}``, :func:`onlynorm.verify`),
and on the test split the max ``|Δlogit|``, the agreement of predictions with the target and both accuracies.
Everything but the times is determined by the seed.

>>> model = DigitsTransformer(d=8, heads=2, layers=1)
>>> model(torch.zeros(3, TOKENS, PIXELS)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._io import atomic_path
from ..api import reconstruct
from ..constructions.memory import format_bytes
from ..verify import verify
from .digits import fit_classifier, load_digits_split
from .report import print_rows, print_table
from .resnet import peak_rss_bytes

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "DigitsTransformer",
    "Config",
    "DEFAULT",
    "as_tokens",
    "train_transformer",
    "demo",
    "run",
    "TOKENS",
    "PIXELS",
]

#: a digit as a sequence: 8 tokens (pixel rows) of 8 features (pixels)
TOKENS, PIXELS = 8, 8


class DigitsTransformer(nn.Module):
    """``x (batch, 8, 8) ↦ logits (batch, classes)``: ``h = [c; x Eᵀ + e] + P`` (class token ``c``, positional
    table ``P`` of ``tokens + 1`` rows), ``layers`` pre-norm encoder blocks (``heads`` heads, GELU MLP of
    ``ff`` units, no dropout), a final LayerNorm, and ``logits = W h₀ + b`` on the class token's output."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, ff: int | None = None, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(PIXELS, d)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, TOKENS + 1, d))
        block = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=ff or 2 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(x.size(0), -1, -1), self.embed(x)], dim=1) + self.pos
        return self.head(self.encoder(h)[:, 0])


@dataclass(frozen=True)
class Config:
    """The demo's model and training budget (the defaults train in a few seconds on 2 cores)."""

    d: int = 32
    heads: int = 4
    layers: int = 2
    epochs: int = 20
    fresh: int = 256  # fresh random inputs for verify


def as_tokens(X: torch.Tensor) -> torch.Tensor:
    """Flattened 8×8 digits ``(n, 64)`` → ``(n, 8 tokens, 8 pixels)``: token ``i`` is pixel row ``i``."""
    return X.reshape(-1, TOKENS, PIXELS)


def train_transformer(
    Xtr: torch.Tensor, ytr: torch.Tensor, seed: int, *, d: int, heads: int, layers: int, epochs: int, lr: float = 3e-3
) -> DigitsTransformer:
    """A :class:`DigitsTransformer` initialised from ``seed`` and trained on ``(Xtr, ytr)`` (token form), float64,
    returned in eval mode."""
    torch.manual_seed(seed)
    model = DigitsTransformer(d=d, heads=heads, layers=layers).double()
    return fit_classifier(model, Xtr, ytr, seed, epochs, lr=lr)  # type: ignore[return-value]


#: the configuration ``onlynorm demo --transformer`` runs
DEFAULT = Config()


def demo(seed: int = 0, config: Config = DEFAULT) -> tuple[dict[str, Any], DigitsTransformer, Any, tuple]:
    """Train, reconstruct and measure; returns ``(document, target model, reconstructed SeqNet, (Xte, yte))``."""
    start = time.perf_counter()
    Xtr, ytr, Xte, yte = load_digits_split(seed)
    Xtr, Xte = as_tokens(Xtr), as_tokens(Xte)
    t0 = time.perf_counter()
    target = train_transformer(
        Xtr, ytr, seed, d=config.d, heads=config.heads, layers=config.layers, epochs=config.epochs
    )
    train_seconds = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    net = reconstruct(target, example_input=Xte[:2], seed=seed)  # the default method for sequence models
    solve_seconds, solve_cpu = time.perf_counter() - t0, time.process_time() - c0
    fresh = torch.rand(config.fresh, TOKENS, PIXELS, generator=torch.Generator().manual_seed(seed), dtype=Xte.dtype)
    t0 = time.perf_counter()
    report = verify(net, target, inputs=[fresh])
    verify_seconds = time.perf_counter() - t0
    with torch.no_grad():
        logits, target_logits = net(Xte), target(Xte)
    s = net.summary()
    doc: dict[str, Any] = {
        "config": asdict(config),
        "seed": seed,
        "method": str(net.meta.options.get("method")),
        "target_parameters": s.target_parameters,
        "frozen_parameters": s.frozen_parameters,
        "tunable_parameters": s.tunable_parameters,
        "layer_norms": sum(isinstance(m, nn.LayerNorm) for m in net.modules()),
        "target_accuracy": float((target_logits.argmax(1) == yte).double().mean()),
        "reconstructed_accuracy": float((logits.argmax(1) == yte).double().mean()),
        "agreement": float((logits.argmax(1) == target_logits.argmax(1)).double().mean()),
        "test_max_abs_logit_error": float((logits - target_logits).abs().max()),
        "test_images": int(Xte.shape[0]),
        "fresh_inputs": config.fresh,
        "fresh_max_rel_error": report.max_rel_error,
        "verified": report.passed,
        "train_seconds": train_seconds,
        "solve_seconds": solve_seconds,
        "solve_cpu_seconds": solve_cpu,
        "verify_seconds": verify_seconds,
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": peak_rss_bytes(),
        "seconds": time.perf_counter() - start,
    }
    return doc, target, net, (Xte, yte)


def run(
    seed: int = 0, json_path: Path | None = None, console: Console | None = None, *, config: Config | None = None
) -> bool:
    """Run :func:`demo`, print its tables, write the JSON document; ``True`` when every test prediction agrees with
    the target's and the fresh inputs verify within tolerance."""
    doc, _, _, _ = demo(seed, config or DEFAULT)
    c = doc["config"]
    name = f"target (d={c['d']}, {c['layers']}×{c['heads']} heads)"
    print_table(
        console,
        "digits as 8 tokens of 8 pixels: a transformer reconstructed by tuning only normalization parameters",
        ["network", "test acc", "agreement", "max |Δlogit|", "parameters", "seconds"],
        [
            [
                name,
                f"{doc['target_accuracy']:.3f}",
                "1.000",
                "0",
                f"{doc['target_parameters']:,}",
                f"{doc['train_seconds']:.1f} (training)",
            ],
            [
                "frozen random, γ, β solved",
                f"{doc['reconstructed_accuracy']:.3f}",
                f"{doc['agreement']:.3f}",
                f"{doc['test_max_abs_logit_error']:.1e}",
                f"{doc['tunable_parameters']:,} γ, β",
                f"{doc['solve_seconds']:.2f} (solve)",
            ],
        ],
    )
    print_rows(
        console,
        f"reconstruction (method={doc['method']!r})",
        [
            ("build + solve", f"{doc['solve_seconds']:.2f} s wall, {doc['solve_cpu_seconds']:.2f} s CPU"),
            ("frozen / tunable parameters", f"{doc['frozen_parameters']:,} / {doc['tunable_parameters']:,}"),
            ("peak memory (process)", format_bytes(doc["peak_rss_bytes"])),
            ("LayerNorms kept (γ, β set to the target's)", str(doc["layer_norms"])),
            (
                f"max relative error, {doc['fresh_inputs']} fresh inputs in [0,1]^8×8",
                f"{doc['fresh_max_rel_error']:.2e} ({'passed' if doc['verified'] else 'FAILED'})",
            ),
        ],
    )
    if json_path is not None:
        with atomic_path(json_path) as out:
            out.write_text(json.dumps(doc, indent=2))
    return doc["agreement"] == 1.0 and bool(doc["verified"])
