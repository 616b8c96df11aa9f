"""eval: perplexity of an engine on real text, and its distance to a reference model token by token.

What llama.cpp's `llama-perplexity --kl-divergence` reports for a quantized GGUF against the full
precision one, for any engine of OUT (every dtype, int8/int4 at any block size, the transformers
frontend, sharded engines) against the float32 eager model of a checkpoint or another engine.

Windows. The text is tokenized once (with the special tokens the tokenizer adds, so a bos starts
it) into N tokens t_0..t_{N-1}. A model of context W sees windows of W tokens, each from an empty
cache at positions 0..W-1; window k ends at e_k = min(W + k·stride, N) and starts at e_k - W. Token
t_j (j >= 1) is scored, -log p(t_j | the window's tokens before it), once: in the first window
that holds it past the previous window's end (e_{k-1} <= j < e_k). So every scored token but those
of the first window has at least W - stride tokens of context before it (the first window scores
t_1..t_{W-1} with whatever precedes them), as HF's strided perplexity does; with stride W/2 (the
default) each scored token sees at least half a window, as llama-perplexity's second-half scoring
does. Perplexity = exp(mean NLL over the scored tokens).

Engines whose steps take fewer tokens than W (the manifest's max_prompt_tokens) prefill a window
in chunks, each step continuing the cache of the previous: the logits are those of one long step.

With a reference, both run the same windows; per scored position (the next-token distributions
at position j - 1): KL(reference || engine) = Σ_v p_ref(v) (log p_ref(v) - log p_eng(v)) in
float64, its mean / median / p99 / max, top-1 agreement (same argmax), and the perplexity ratio
engine / reference.

Shape legend: W window (context), S new tokens of a step, V vocab.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dscompile.errors import OptionError, TextError
from dscompile.runtime.contract import KVCache, step_inputs
from dscompile.runtime.engine import Engine

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) run from an empty cache; targets t_j for first <= j < end are scored."""

    begin: int
    end: int
    first: int


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of a text of `n_tokens` (module docstring). OptionError when it is shorter than one
    window or the stride is outside [1, context]."""
    if context < 2:
        raise OptionError(f"--context {context}: a window needs at least 2 tokens")
    if not 1 <= stride < context:  # a window's first token has no logits before it: it scores from its second
        raise OptionError(f"--stride {stride} must be between 1 and the context - 1 ({context - 1})")
    if n_tokens < context:
        raise OptionError(f"the text has {n_tokens} tokens, shorter than one window of {context} "
                          "(give a longer text or a smaller --context)")
    out, end, done = [], context, 1
    while done < n_tokens:
        end = min(end, n_tokens)
        out.append(Window(end - context, end, done))
        done, end = end, end + stride
    return out


def window_logits(engine: Engine, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """float32 logits [W, V] of one window of ids [W], run from an empty cache in steps of at most
    `chunk` tokens, each continuing the previous step's cache."""
    cache: KVCache | None = None
    pieces = []
    for start in range(0, ids.numel(), chunk):
        inputs = step_inputs(ids[start:start + chunk].reshape(1, -1), past=start)
        logits, cache = engine.step(*inputs, cache)
        pieces.append(logits[0].float().cpu())
    return torch.cat(pieces)


def evaluate(
    engine: Engine,
    ids: Sequence[int],
    *,
    context: int,
    stride: int,
    chunk: int,
    reference: Engine | None = None,
    reference_chunk: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of `engine` on token ids `ids` in windows of `context` advancing by `stride`
    (steps of at most `chunk` tokens); with `reference`, the per-token distances to it."""
    tokens = torch.as_tensor(list(ids), dtype=torch.int64)
    plan = windows(int(tokens.numel()), context, stride)
    nll, ref_nll, kl, agree = [], [], [], []
    for k, w in enumerate(plan):
        x = tokens[w.begin:w.end]
        rows = slice(w.first - 1 - w.begin, w.end - 1 - w.begin)  # the positions that predict t_first..t_end-1
        targets = tokens[w.first:w.end]
        log_p = torch.log_softmax(window_logits(engine, x, chunk)[rows].double(), -1)
        nll.append(-log_p.gather(1, targets[:, None])[:, 0])
        if reference is not None:
            log_r = torch.log_softmax(window_logits(reference, x, reference_chunk or chunk)[rows].double(), -1)
            ref_nll.append(-log_r.gather(1, targets[:, None])[:, 0])
            kl.append((log_r.exp() * (log_r - log_p)).sum(-1).clamp(min=0.0))  # >= 0 up to rounding
            agree.append(log_r.argmax(-1) == log_p.argmax(-1))
        if progress is not None:
            progress("eval", k + 1, len(plan))
    nll_all = torch.cat(nll)
    report: dict[str, Any] = {
        "tokens": int(tokens.numel()), "scored_tokens": int(nll_all.numel()), "windows": len(plan),
        "context": context, "stride": stride, "step_tokens": chunk,
        "nll_mean": float(nll_all.mean()), "perplexity": math.exp(float(nll_all.mean())),
    }
    if reference is not None:
        ref_all, kl_all = torch.cat(ref_nll), torch.cat(kl)
        ref_ppl = math.exp(float(ref_all.mean()))
        report["reference"] = {
            "perplexity": ref_ppl, "nll_mean": float(ref_all.mean()),
            "perplexity_ratio": report["perplexity"] / ref_ppl,
            "kl": {"mean": float(kl_all.mean()), "median": float(kl_all.median()),
                   "p99": float(torch.quantile(kl_all, 0.99)), "max": float(kl_all.max())},
            "top1_agreement": float(torch.cat(agree).double().mean()),
        }
    return report


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, sha256 of its bytes) of a UTF-8 text file; TextError/OptionError naming the file when it
    is missing, not UTF-8 or empty."""
    from dscompile.runtime.text import read_utf8

    path = Path(path)
    if not path.is_file():
        raise OptionError(f"{path}: text file not found")
    data = path.read_bytes()
    text = read_utf8(data, str(path))
    if not text.strip():
        raise TextError(f"{path}: the text is empty")
    return text, hashlib.sha256(data).hexdigest()
