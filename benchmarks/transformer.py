"""Transformer reconstruction and ONNX export: time, error and sizes, one row per model.

    .venv/bin/python benchmarks/transformer.py [--d 64] [--heads 4] [--layers 2] [--method deep] [--tied 0,1]
                                               [--models encoder,decoder] [--no-onnx] [--json out.json]

Models (float64): ``encoder`` — a pre-norm GELU ``nn.TransformerEncoder`` (dim_feedforward = 4d, final LayerNorm);
``decoder`` — a pre-norm GELU ``nn.TransformerDecoder`` with a causal target mask and cross-attention on a memory of
its own length (dim_feedforward = 4d, final LayerNorm); ``gpt`` (not in the default list) — a GPT-style causal model
(token and learned position embeddings, LM head). The error is ``max |f − g| / max |g|`` against the model's
own forward on fresh inputs of sequence lengths 1, 8 and 32 (batch 4). With ONNX (needs the onnx extra):
``net.to_onnx`` time and node count, the exported graph's error against the network under onnxruntime on the same
inputs, and onnxruntime's time for one batch of length 32 over the network's forward in torch (ratio in one run).
``--tied 0,1`` runs every model untied and tied (one frozen draw per map, ``deep`` only), each with the time of one
forward of a batch of length 32 (best of 5); the ratios between the two rows are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import onlynorm

LENGTHS = (1, 8, 32)
VOCAB = 11


class Decoder(nn.Module):
    def __init__(self, d: int, heads: int, layers: int):
        super().__init__()
        layer = nn.TransformerDecoderLayer(d, heads, 4 * d, activation="gelu", batch_first=True, norm_first=True)
        self.dec = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(d))

    def forward(self, tgt, memory):
        t = tgt.size(1)
        return self.dec(tgt, memory, tgt_mask=torch.ones(t, t, dtype=torch.bool).triu(1), tgt_is_causal=True)


class GPT(nn.Module):
    """Token + learned position embeddings (vocabulary 11, up to 64 positions), causal pre-norm blocks of
    ``nn.MultiheadAttention`` and a GELU MLP, a final LayerNorm and an LM head."""

    def __init__(self, d: int, heads: int, layers: int, vocab: int = VOCAB, max_len: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.1 * torch.randn(1, max_len, d))
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(layers))
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2 * layers + 1))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(layers)
        )
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        t = idx.size(1)
        x = self.tok(idx) + self.pos[:, :t]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            h = self.ln[2 * i](x)
            x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            x = x + mlp(self.ln[2 * i + 1](x))
        return self.head(self.ln[-1](x))


def build(model: str, d: int, heads: int, layers: int) -> nn.Module:
    if model == "decoder":
        return Decoder(d, heads, layers).double().eval()
    if model == "gpt":
        return GPT(d, heads, layers).double().eval()
    layer = nn.TransformerEncoderLayer(d, heads, 4 * d, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False).double().eval()


def inputs(model: str, t: int, d: int, batch: int = 4) -> tuple[torch.Tensor, ...]:
    if model == "gpt":
        return (torch.randint(0, VOCAB, (batch, t)),)
    x = torch.randn(batch, t, d, dtype=torch.float64)
    return (x, torch.randn(batch, t, d, dtype=torch.float64)) if model == "decoder" else (x,)


def _seconds(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def onnx_row(f: onlynorm.nets.SeqNet, model: str, d: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "net.onnx"
    start = time.perf_counter()
    info = f.to_onnx(path)
    seconds = time.perf_counter() - start
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    errors = []
    for t in LENGTHS:
        x = inputs(model, t, d)
        with torch.no_grad():
            want = f(*x).numpy()
        got = session.run(None, {n: v.numpy() for n, v in zip(names, x)})[0]
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
    x = inputs(model, LENGTHS[-1], d)
    feed = {n: v.numpy() for n, v in zip(names, x)}
    with torch.no_grad():
        torch_s = _seconds(lambda: f(*x))
    ort_s = _seconds(lambda: session.run(None, feed))
    return {
        "onnx_seconds": round(seconds, 3),
        "onnx_nodes": info["nodes"],
        "onnx_megabytes": round(path.stat().st_size / 1e6, 1),
        "onnx_dynamic": info["dynamic"],
        "onnx_max_rel_error": max(errors),
        "onnxruntime_over_torch": round(ort_s / torch_s, 2),
    }


def case(model: str, d: int, heads: int, layers: int, method: str, export: bool, seed: int = 0, tied: int = 0) -> dict:
    torch.manual_seed(seed)
    g = build(model, d, heads, layers)
    options = {"tied": tied} if tied else {}
    start = time.perf_counter()
    f = onlynorm.reconstruct(g, example_input=inputs(model, 8, d, batch=2), method=method, seed=seed, **options)
    seconds = time.perf_counter() - start
    x = inputs(model, LENGTHS[-1], d)
    with torch.no_grad():
        forward_s = _seconds(lambda: f(*x))
    report = onlynorm.verify(f, g, inputs=[inputs(model, t, d) for t in LENGTHS])
    summary = f.summary()
    row = {
        "model": model,
        "d": d,
        "heads": heads,
        "layers": layers,
        "method": method,
        "tied": tied,
        "seconds": round(seconds, 3),
        "forward_seconds": round(forward_s, 4),
        "max_rel_error": report.max_rel_error,
        "frozen_parameters": summary.frozen_parameters,
        "tunable_parameters": summary.tunable_parameters,
        "target_parameters": summary.target_parameters,
    }
    return row | (onnx_row(f, model, d) if export else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--method", default="deep")
    parser.add_argument("--models", default="encoder,decoder", help="comma-separated: encoder, decoder, gpt")
    parser.add_argument("--tied", default="0", help="comma-separated 0/1: untied and/or tied rows (deep only)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export rows")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for tied in (int(v) for v in args.tied.split(",")):
            rows.append(case(model, args.d, args.heads, args.layers, args.method, not args.no_onnx, tied=tied))
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
