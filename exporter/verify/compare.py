"""compare: an engine against the PyTorch eager model, per output, per step, down to the layer.

The one place that holds both sides (the checkpoint and OUT). Both run the same inputs: a batch
with left padding, a prefill, then decode steps fed with the eager model's greedy tokens (so a
difference in one step does not change what later steps see). Per graph and step it reports max
abs, max rel and mean abs error of the logits (real positions only) and of the returned cache.
When a step is out of tolerance, a debug build of the engine (the hidden state after every block
marked as an output) locates the first layer whose hidden state diverges.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dscompile.exporter.verify.eager import EagerEngine
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.quant import Scheme
from dscompile.runtime.engine import Engine, KVCache
from dscompile.errors import OptionError
from dscompile.tolerance import QUANTIZED_ACTIVATIONS, TOLERANCE
from dscompile.tolerance import bound as tolerance_bound



@dataclass
class Stats:
    max_abs: float
    max_rel: float
    mean_abs: float
    ref_max: float
    rel_rms: float = 0.0  # ||actual - ref|| / ||ref||

    @staticmethod
    def of(actual: torch.Tensor, ref: torch.Tensor) -> "Stats":
        a, r = actual.detach().float().cpu(), ref.detach().float().cpu()
        if a.shape != r.shape:
            raise OptionError(f"engine output shape {tuple(a.shape)} differs from eager {tuple(r.shape)}")
        if not r.numel():
            return Stats(0.0, 0.0, 0.0, 0.0)
        d = (a - r).abs()
        rel = d / r.abs().clamp(min=1e-6)
        norm = float(r.double().norm())
        return Stats(float(d.max()), float(rel.max()), float(d.mean()), float(r.abs().max()),
                     float(d.double().norm()) / norm if norm else 0.0)

    def within(self, atol: float, rtol: float) -> bool:
        return self.max_abs <= atol + rtol * self.ref_max


def distribution(actual: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Next-token distributions of logits [N, V]: mean KL(ref || actual) and top-1 agreement."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    if not r.numel():
        return {"kl": 0.0, "top1_agreement": 1.0}
    log_r, log_a = torch.log_softmax(r, -1), torch.log_softmax(a, -1)
    kl = (log_r.exp() * (log_r - log_a)).sum(-1)
    return {"kl": float(kl.mean()), "top1_agreement": float((a.argmax(-1) == r.argmax(-1)).double().mean())}


def tolerance(dtype: str, atol: float | None, rtol: float | None, ref_max: float,
              table: dict | None = None) -> tuple[float, float]:
    """--atol/--rtol when given, else the dtype's named tolerance (from `table`) scaled by max(1, max|ref|)."""
    if atol is not None and atol < 0 or rtol is not None and rtol < 0:
        raise OptionError("--atol and --rtol must be >= 0")
    base = tolerance_bound(dtype, ref_max, table or TOLERANCE)
    return (base if atol is None else atol), (0.0 if rtol is None else rtol)


def _inputs(vocab: int, batch: int, prompt: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen)
    mask = torch.ones(batch, prompt, dtype=torch.int64)
    for row in range(1, batch):  # later rows are shorter: left padding
        pad = min(prompt - 1, row * max(1, prompt // (2 * batch)))
        mask[row, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, pos, mask


def run_compare(
    engine: Engine,
    eager: EagerEngine,
    *,
    dtype: str = "float32",
    atol: float | None = None,
    rtol: float | None = None,
    decode_steps: int = 4,
    batch: int = 2,
    prompt: int = 8,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    table: dict | None = None,
) -> dict[str, Any]:
    """Prefill + `decode_steps` steps on both; per step: logits and cache error, pass/fail.

    Both sides are fed the eager model's greedy tokens (teacher forcing). Per step also the
    logits' relative RMS error, KL divergence and top-1 agreement of the next-token distributions.
    `table` replaces the dtype's tolerance table (dscompile/tolerance.py), e.g. for kernels that
    quantize activations.
    """
    if decode_steps < 0 or batch < 1 or prompt < 1:
        raise OptionError("--decode-steps must be >= 0, --batch and --prompt-len >= 1")
    ids, pos, mask = _inputs(eager.info.vocab_size, batch, prompt, seed)
    steps: list[dict[str, Any]] = []
    e_cache: KVCache | None = None
    g_cache: KVCache | None = None
    step_ids, step_pos = ids, pos
    total = decode_steps + 1
    for i in range(total):
        ref, e_cache = eager.step(step_ids, step_pos, mask, e_cache)
        got, g_cache = engine.step(step_ids, step_pos, mask, g_cache)
        real = mask[:, -step_ids.shape[1]:].bool()  # logits of padding positions mean nothing
        logits = Stats.of(got[real], ref[real])
        a, r = tolerance(dtype, atol, rtol, logits.ref_max, table)
        # Cache rows of padding positions are never attended to; engines may fill them differently.
        seen = mask.bool()
        cache = [Stats.of(g.cpu()[seen], e[seen]) for ge, ee in zip(g_cache.layers, e_cache.layers) for g, e in zip(ge, ee)]
        worst_cache = max(cache, key=lambda s: s.max_abs)
        ca, cr = tolerance(dtype, atol, rtol, worst_cache.ref_max, table)
        ok = logits.within(a, r) and worst_cache.within(ca, cr)
        entry = {"step": i, "graph": "prefill" if i == 0 else "decode", "new_tokens": int(step_ids.shape[1]),
                 "batch": batch,
                 "logits": vars(logits), **distribution(got[real], ref[real]),
                 "cache": vars(worst_cache), "atol": a, "rtol": r, "passed": ok}
        steps.append(entry)
        if progress is not None:
            progress("compare", i + 1, total)
        step_ids = ref[:, -1].argmax(-1, keepdim=True)  # teacher forcing with eager's greedy token
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1)
    return {"passed": all(s["passed"] for s in steps), "steps": steps, "dtype": dtype, "seed": seed}


def locate_divergence(
    checkpoint: str | Path,
    out: Path,
    manifest: dict[str, Any],
    eager: EagerEngine,
    report: dict[str, Any],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    plot: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Per-layer hidden-state error of a debug build (same dtype and passes, hidden states as outputs).

    The debug build is exported into a scratch folder with the options recorded in the manifest,
    run on the compare's prefill inputs, and its hidden state after each block is compared with
    the eager model's.
    """
    from dscompile.exporter.export import export_checkpoint
    from dscompile.runtime.ort_engine import OrtEngine

    passes = {p["name"]: p for p in manifest["graphs"]["prefill"]["passes"]["passes"]}
    absorb = passes.get("absorb_mla", {}).get("details", {}).get("form", "auto")
    fuse = passes.get("fuse_moe", {}).get("count", 0) > 0 or not eager.model.args.num_moe_layers
    scratch = scratch_dir()
    try:
        quant = manifest.get("quantization")
        export_checkpoint(checkpoint, scratch / "debug", dtype=manifest["dtype"], absorb=absorb, fuse_moe=fuse,
                          debug=True, progress=progress, weights=quant["scheme"] if quant else None,
                          block_size=int(quant["block_size"]) if quant else 32,
                          accuracy_level=0 if quant and not any(quant["accuracy_level"].values()) else None)
        debug = OrtEngine.load(scratch / "debug", provider="cpu")
        batch, prompt = report["steps"][0]["batch"], report["steps"][0]["new_tokens"]
        ids, pos, mask = _inputs(eager.info.vocab_size, batch, prompt, report["seed"])
        got = debug.hidden_states(ids, pos, mask)
        ref = eager.hidden_states(ids, pos, mask, None)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    real = mask.bool()
    errors = [vars(Stats.of(g[real], r[real])) for g, r in zip(got, ref)]
    first = first_diverging_layer(errors, report["dtype"], atol, rtol, lowering_table(manifest))
    if plot is not None:
        plot_layers(errors, plot)
    return {"per_layer": errors, "first_diverging_layer": first, "plot": str(plot) if plot else None}


def first_diverging_layer(errors: list[dict[str, float]], dtype: str, atol: float | None, rtol: float | None,
                          table: dict | None = None) -> int | None:
    for i, e in enumerate(errors):
        a, r = tolerance(dtype, atol, rtol, e["ref_max"], table)
        if e["max_abs"] > a + r * e["ref_max"]:
            return i
    return None


def plot_layers(errors: list[dict[str, float]], path: Path) -> None:
    """Max and mean abs error of the hidden state by layer, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'dscompile[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = range(len(errors))
    ax.semilogy(layers, [max(e["max_abs"], 1e-12) for e in errors], marker="o", label="max |Δ|")
    ax.semilogy(layers, [max(e["mean_abs"], 1e-12) for e in errors], marker=".", label="mean |Δ|")
    ax.set_xticks(list(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("hidden-state error vs eager")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eager_for(checkpoint: str | Path, max_positions: int | None = None, scheme: Scheme | None = None) -> EagerEngine:
    """The fp32 eager reference of a checkpoint (every engine dtype is compared against fp32); with
    `scheme`, its quantized weights fake-quantized (the weights a quantized engine computes with)."""
    return EagerEngine(load_checkpoint(checkpoint, torch.float32, quantize=scheme), max_positions)


def scheme_of(manifest: dict[str, Any]) -> Scheme | None:
    """The quantization scheme an export was made with (manifest "quantization"), or None."""
    q = manifest.get("quantization")
    return None if q is None else Scheme(int(q["bits"]), int(q["block_size"]))


def lowering_table(manifest: dict[str, Any]) -> dict | None:
    """The tolerance table for an engine against its own eager reference: the dtype's, or where
    its quantized kernels quantize activations (manifest quantization.quantized_activations) the
    measured one."""
    quantized = (manifest.get("quantization") or {}).get("quantized_activations") or {}
    return QUANTIZED_ACTIVATIONS if any(quantized.values()) else None


def scheme_cost(engine: Engine, checkpoint: str | Path, **options) -> dict[str, Any]:
    """What quantization costs: a quantized engine against the fp32 eager model, teacher-forced.

    The other distance, the lowering's, is `run_compare` against the eager model with the same
    quantized weights (`eager_for(..., scheme)`, `lowering_table`). This one is reported per step
    (logits relative RMS error, KL divergence, top-1 agreement), not judged.
    """
    fp32 = eager_for(checkpoint, engine.info.max_positions)
    cost = run_compare(engine, fp32, **{k: v for k, v in options.items() if k not in ("atol", "rtol", "table")})
    steps = [{"step": s["step"], "graph": s["graph"], "logits_rel_rms": s["logits"]["rel_rms"], "kl": s["kl"],
              "top1_agreement": s["top1_agreement"]} for s in cost["steps"]]
    return {"distance": "engine vs the fp32 eager model (quantization's cost; not judged)", "steps": steps,
            "mean": {k: sum(s[k] for s in steps) / len(steps) for k in ("logits_rel_rms", "kl", "top1_agreement")}}


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dscompile-debug-"))
