"""`dscompile bench`: latency of every way to run a checkpoint, side by side, against the bandwidth floor.

One run measures, with the same threads and the same inputs:
- "eager":            our PyTorch reference (model/transformer.py) behind the Engine interface;
- "hf":               transformers' DeepseekV2/V3ForCausalLM (its defaults: SDPA, grouped_mm experts)
                      with its DynamicCache;
- "hf-onnx":          transformers' own ONNX export of the same weights, run in ONNX Runtime (every
                      attempt and its outcome are reported; DeepSeek-V2's complex RoPE stops both
                      exporters, so its RoPE is rewritten in real numbers and transformers' eager
                      attention and batched_mm experts are selected: see `_hf_onnx_attempts`);
- "ours":             our ONNX Runtime engine, every pass on;
- "ours-absorb-none", "ours-no-fuse-moe": the same engine with one pass off (ablations).

For each: prefill latency of `prefill_tokens` tokens (batch 1) and the latency of one decode step
at each context P and batch B (median of `repeats` runs after `warmup` runs). The decode step at
P runs against a cache of P tokens filled with random values (cache contents do not change the
work done); each timed step starts from the same P. Our ORT engine holds that cache as a
generation loop does (`Engine.own_cache`: capacity buffers its decode graph writes in place), so
a step is timed without the one copy of the cache a loop makes every CAPACITY_STEP tokens.

Floors (measured in the same run): read bandwidth = bytes / time of a sum over a tensor far larger
than the last-level cache, read once before every timed run (the bandwidth of a shared machine
drifts by 2x within minutes, so each run is held against the bandwidth of its own moment);
bytes per decode step = the weights the active path must read (attention, dense MLPs, router,
shared experts, the routed experts B tokens choose, final norm, lm_head, B embedding rows) plus
the latent cache; floor = bytes / bandwidth. A result's "floor fraction" is the median over its runs of
floor / run time (1.0 = running at the speed of memory); its "floor_ms" is the floor at the
median of its bandwidth readings. Prefill's floor is the larger of its weight bytes over
the bandwidth and its FLOPs over the fp32 GEMM rate, also read before every prefill run.

Load (`load`): each system is also loaded alone in a fresh process (`exporter/loadmem.py`), for
its load time (ours: OrtEngine.load; eager: reading the checkpoint into our model; hf:
transformers' from_pretrained; hf-onnx: creating its ONNX Runtime session, not the export) and
its resident memory before and after the load and at its peak; for our engines beside the size
of their weights file. (Read in this process, one system's memory would count against the next.)

Ratios between two measurements are taken from the two run alternately, not from the table's
medians (rows minutes apart on a machine whose speed drifts): our engine against transformers
and its ONNX export (prefill, decode at batch 1 for each context, larger batches at the shortest
context; `alternating`), and each system's step at the longest context against the shortest
(`context_scaling`). The targets are judged on these and show the table's ratio beside them.

The bench config (`bench_args`) is DeepSeek-V2-Lite's dimensions with 4 layers, 16 routed
experts and a 32000 vocabulary; its seeded random checkpoint is written once under the cache
folder (~/.cache/dscompile or $DSCOMPILE_HOME) and reused, and so are the engines exported from it
(one folder per set of export options and source version).

Shape legend: B batch, S new tokens, P past tokens (the context), L layers, H heads, D hidden,
C kv_lora_rank, R rope dim, E routed experts, K active experts, I intermediate sizes, V vocab.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import dscompile.exporter.export  # noqa: F401  (loaded before _SOURCE_KEY hashes the sources it stands for)
from dscompile.exporter.loadmem import LOADERS, LoadMeasureError, hf_onnx_session, load_hf_model, measure_load
from dscompile.model.args import ModelArgs
from dscompile.runtime.engine import Engine, KVCache
from dscompile.errors import OptionError

SYSTEMS = ("eager", "hf", "hf-onnx", "ours", "ours-absorb-none", "ours-no-fuse-moe")
OUR_ENGINES = {  # system -> export options
    "ours": {"absorb": "auto", "fuse_moe": True},
    "ours-absorb-none": {"absorb": "none", "fuse_moe": True},
    "ours-no-fuse-moe": {"absorb": "auto", "fuse_moe": False},
}
DEFAULT_CONTEXTS = (128, 1024, 4096)
DEFAULT_BATCHES = (1, 4)
PREFILL_TOKENS = 128
THREADS = 2
BENCH_SEED = 0
BANDWIDTH_BYTES = 1 << 30  # large enough that no cache level holds it
GEMM_SIZE = 1024  # ~2 GFLOP: a reading of ~15 ms before each prefill run
# Pause before and after a probe reading and between calls taken in turn: the threads of whatever
# ran last (torch's after a probe, ONNX Runtime's after a step) spin-wait for a while after their
# work and share the cores with what runs next (measured: a decode step 57 -> 61 ms right after
# a probe; a probe 32.5 -> 24.6 GB/s right after a step).
SETTLE_S = 0.1
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------- the bench config and its files


def bench_args() -> ModelArgs:
    """DeepSeek-V2-Lite's dimensions (deepseek-ai/DeepSeek-V2-Lite config.json) at a size this machine holds.

    4 layers instead of 27 (the first dense, as published), 16 routed experts instead of 64 (6
    active + 2 shared, as published) and a 32000 vocabulary instead of 102400: 2.9 GB of fp32
    weights, of which one decode token reads about 1.58 GB.
    """
    return ModelArgs(
        model_type="deepseek_v2", vocab_size=32000, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=4, num_attention_heads=16, max_position_embeddings=163840,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, scoring_func="softmax",
        rope_type="yarn", rope_factor=40.0, rope_original_max_position_embeddings=4096,
        rope_mscale=0.707, rope_mscale_all_dim=0.707,
    )


def bench_checkpoint(home: Path, progress: Progress | None = None) -> Path:
    """The bench config's seeded checkpoint under `home`, written on first use."""
    from dscompile.model.synthetic import random_state, write_checkpoint

    path = home / "bench" / f"checkpoint-v2lite-4l-seed{BENCH_SEED}"
    if not (path / "config.json").is_file():
        args = bench_args()
        write_checkpoint(path, args, random_state(args, BENCH_SEED))
    if progress:
        progress("checkpoint", 1, 1)
    return path


def _source_key() -> str:
    """Hash of the compiler's sources (as imported with this module): an engine exported by other code is not reused."""
    return _SOURCE_KEY


MEASUREMENT_ONLY = ("bench.py", "cli.py", "loadmem.py")  # code that measures engines, not code that makes them


def _hash_sources() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in ("exporter", "passes", "model", "runtime"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name not in MEASUREMENT_ONLY:
                h.update(path.relative_to(root).as_posix().encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:12]


_SOURCE_KEY = _hash_sources()


def _checkpoint_key(checkpoint: Path) -> str:
    """Identity of a checkpoint folder: its path, config and weight files' names, sizes and times."""
    h = hashlib.sha256(str(checkpoint.resolve()).encode())
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def engine_dir(checkpoint: Path, home: Path, options: dict[str, Any]) -> Path:
    """Where the engine of (checkpoint, export options, compiler sources) is cached."""
    opts = "-".join(f"{k}={v}" for k, v in sorted(options.items()))
    key = hashlib.sha256(f"{_checkpoint_key(checkpoint)}|{opts}".encode()).hexdigest()[:12]
    return home / "bench" / "engines" / f"{checkpoint.name}-{key}-{_source_key()}"


def cached_export(checkpoint: Path, home: Path, options: dict[str, Any], progress: Progress | None = None) -> Path:
    """Export (once) and return the engine folder for these options.

    Engines of the same checkpoint and options exported by other sources are deleted first (a
    bench-config engine is several GB).
    """
    from dscompile.exporter.export import export_checkpoint

    out = engine_dir(checkpoint, home, options)
    if not (out / "manifest.json").is_file():
        stem = out.name.rsplit("-", 1)[0]
        for stale in out.parent.glob(f"{stem}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        export_checkpoint(checkpoint, out, force=True, progress=progress, **options)
    return out


# ---------------------------------------------------------------- floors


def _attention_params(a: ModelArgs) -> int:
    H, D, C, R = a.num_attention_heads, a.hidden_size, a.kv_lora_rank, a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q = D * H * a.qk_head_dim
    else:
        q = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * a.qk_head_dim
    return q + D * (C + R) + C + C * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * D + 2 * D


def experts_read(a: ModelArgs, batch: int) -> float:
    """Expected distinct routed experts B tokens choose (uniformly random K of E each); K when B == 1."""
    E, K = a.n_routed_experts, a.num_experts_per_tok
    return E * (1.0 - ((E - K) / E) ** batch)


def step_weight_params(a: ModelArgs, batch: int) -> dict[str, float]:
    """Parameters one decode step of B tokens must read, by part of the model."""
    D, L = a.hidden_size, a.num_hidden_layers
    moe = [i for i in range(L) if a.is_moe_layer(i)]
    expert = 3 * D * a.moe_intermediate_size
    parts = {
        "attention": L * _attention_params(a),
        "dense_mlp": (L - len(moe)) * 3 * D * a.intermediate_size,
        "router": len(moe) * a.n_routed_experts * D if moe else 0,
        "shared_experts": len(moe) * a.n_shared_experts * expert if moe else 0,
        "routed_experts": len(moe) * experts_read(a, batch) * expert if moe else 0.0,
        "lm_head": a.vocab_size * D + D,
        "embeddings": batch * D,
    }
    return parts


# Parts a quantized engine keeps in float32 (exporter/lowering/quantize.py): the router, the embedding rows
# it looks up; every other part is read at the scheme's bits per weight (scales included), except
# the absorbed per-head MLA matrices of a decode step (`_absorbed_params`).
_FLOAT_PARTS = ("router", "embeddings")


def _absorbed_params(a: ModelArgs) -> int:
    """kv_b_proj's parameters: a decode step over the latent cache reads them as float32 W_UK/W_UV."""
    return a.num_hidden_layers * a.kv_lora_rank * a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim)


def step_weight_bytes(a: ModelArgs, batch: int, elt: int, bits_per_weight: float | None = None,
                      absorbed: bool = True) -> float:
    """Bytes of weights one step of B tokens reads: every parameter at `elt` bytes, or for a quantized
    engine (`bits_per_weight`) the quantized parts at that rate and the float32 ones at 4 bytes."""
    params = step_weight_params(a, batch)
    if bits_per_weight is None:
        return sum(params.values()) * elt
    q = bits_per_weight / 8
    total = sum(v * (4 if k in _FLOAT_PARTS else q) for k, v in params.items())
    if absorbed:  # kv_b_proj read as float32 absorbed matrices instead of quantized
        total += _absorbed_params(a) * (4 - q)
    return total


def decode_floor(a: ModelArgs, batch: int, context: int, elt: int, bandwidth: float,
                 bits_per_weight: float | None = None) -> dict[str, float]:
    """Bytes one decode step reads (weights of the active path + the latent cache) and the time at `bandwidth`.

    With `bits_per_weight` (a quantized engine) its weights count at that rate (step_weight_bytes);
    the cache stays at `elt` bytes a value.
    """
    weights = step_weight_bytes(a, batch, elt, bits_per_weight)
    cache = batch * context * a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * elt
    total = weights + cache
    return {"weight_bytes": weights, "cache_bytes": cache, "bytes": total, "ms": 1e3 * total / bandwidth}


def prefill_floor(a: ModelArgs, batch: int, tokens: int, elt: int, bandwidth: float, flops: float,
                  bits_per_weight: float | None = None) -> dict[str, float]:
    """max(all weights read once / bandwidth, matmul FLOPs / GEMM rate) for a prompt of B x S tokens."""
    n = batch * tokens
    # n tokens: (nearly) every expert is read; prefill runs kv_b_proj itself (not absorbed)
    weights = step_weight_bytes(a, n, elt, bits_per_weight, absorbed=False)
    active = sum(step_weight_params(a, 1).values()) - a.hidden_size  # per token, embeddings are a lookup
    H, C = a.num_attention_heads, a.kv_lora_rank
    attn = a.num_hidden_layers * batch * H * tokens * tokens * (a.qk_head_dim + a.v_head_dim)  # causal half of 2*S*T*d
    work = 2.0 * n * active + 2.0 * attn
    del C
    return {"weight_bytes": weights, "flops": work, "bytes": weights,
            "ms": 1e3 * max(weights / bandwidth, work / flops)}


class MachineProbe:
    """What the machine can do right now: read bandwidth (bytes/s, one sum over a tensor of
    `nbytes`) and fp32 GEMM rate (FLOP/s, one `gemm_size`³ matmul), torch threads as set.

    The buffers are allocated once and read again before every timed run, so each run's floor
    comes from what the machine had at that moment: on a shared (virtual) machine both drift by
    up to 2x within minutes, far more than the differences the floor fractions are meant to show."""

    def __init__(self, nbytes: int = BANDWIDTH_BYTES, gemm_size: int = GEMM_SIZE):
        self.nbytes, self.gemm_size = nbytes, gemm_size
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(gemm_size, gemm_size, generator=gen) for _ in range(2))
        self.buffer.sum()  # first touch: page faults are not bandwidth
        self.a @ self.b

    def bandwidth(self) -> float:
        t = time.perf_counter()
        self.buffer.sum()
        return self.nbytes / (time.perf_counter() - t)

    def gemm(self) -> float:
        t = time.perf_counter()
        self.a @ self.b
        return 2.0 * self.gemm_size**3 / (time.perf_counter() - t)

    def median(self, reading: Callable[[], float], repeats: int = 5) -> float:
        return statistics.median(reading() for _ in range(repeats))


# ---------------------------------------------------------------- timing


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int,
            probe: Callable[[], Any] | None = None) -> tuple[list[float], list[Any]]:
    """Milliseconds of `repeats` calls of `fn` after `warmup` calls; with `probe`, each timed call is
    preceded by one reading of the machine (with a pause of SETTLE_S on each side), returned beside the times
    (else an empty list)."""
    for _ in range(warmup):
        fn()
    out, readings = [], []
    for _ in range(repeats):
        if probe is not None:
            time.sleep(SETTLE_S)
            readings.append(probe())
            time.sleep(SETTLE_S)
        t = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t))
    return out, readings


def alternate(fns: list[Callable[[], Any]], repeats: int, warmup: int) -> list[list[float]]:
    """Milliseconds of each of `fns`, run in turn: runs[i][j] is repeat i of fns[j]. Calls taken
    moments apart see the same machine, so their ratio is free of the drift between the table's
    rows (minutes apart)."""
    for _ in range(warmup):
        for fn in fns:
            fn()

    def settled(fn: Callable[[], Any]) -> float:
        time.sleep(SETTLE_S)
        return time_ms(fn, 1, 0)[0][0]

    return [[settled(fn) for fn in fns] for _ in range(repeats)]


def context_scaling(system: "System", short: int, long: int, repeats: int, warmup: int) -> dict | None:
    """Decode step at context `long` over the step at `short` (batch 1), the two run alternately.
    None when the contexts are equal or the system cannot decode."""
    if long <= short:
        return None
    fns = [system.decode(1, short), system.decode(1, long)]
    if None in fns:
        return None
    pairs = alternate(fns, repeats, warmup)
    return {"contexts": [short, long], "ratio": statistics.median(b / a for a, b in pairs),
            "runs_ms": [[round(a, 3), round(b, 3)] for a, b in pairs]}


def compare_alternately(ours: "System", reference: "System", configs: list[tuple[str, int, int]],
                        prefill_tokens: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Our time over the reference's for each (phase, batch, context), the two run alternately;
    configs either cannot run are left out."""
    rows = []
    for phase, batch, context in configs:
        if phase == "prefill":
            fns = [ours.prefill(batch, prefill_tokens), reference.prefill(batch, prefill_tokens)]
        else:
            fns = [ours.decode(batch, context), reference.decode(batch, context)]
        if None in fns:
            continue
        pairs = alternate(fns, repeats, warmup)
        rows.append({"system": ours.name, "reference": reference.name, "phase": phase, "batch": batch,
                     "context": context, "time_ratio": statistics.median(a / b for a, b in pairs),
                     "runs_ms": [[round(a, 3), round(b, 3)] for a, b in pairs]})
        del fns
    return rows


def _inputs(vocab: int, batch: int, tokens: int, past: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen)
    pos = (torch.arange(tokens) + past).expand(batch, tokens).contiguous()
    mask = torch.ones(batch, past + tokens, dtype=torch.int64)
    return ids, pos, mask


class System:
    """Something that runs the model: a prefill and a decode step to time, and what its cache holds."""

    name = ""

    def prefill(self, batch: int, tokens: int) -> Callable[[], Any]:
        raise NotImplementedError

    def decode(self, batch: int, context: int) -> Callable[[], Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EngineSystem(System):
    """An `Engine` (ours: eager or ONNX Runtime) over the IO contract."""

    def __init__(self, name: str, engine: Engine, args: ModelArgs):
        self.name, self.engine, self.args = name, engine, args

    def prefill(self, batch, tokens):
        ids, pos, mask = _inputs(self.args.vocab_size, batch, tokens, 0, 1)
        return lambda: self.engine.step(ids, pos, mask, None)

    def decode(self, batch, context):
        info = self.engine.info
        gen = torch.Generator().manual_seed(2)
        cache = KVCache([(torch.randn(batch, context, info.kv_lora_rank, generator=gen).to(info.cache_dtype),
                          torch.randn(batch, context, info.qk_rope_head_dim, generator=gen).to(info.cache_dtype))
                         for _ in range(info.num_layers)])
        cache = self.engine.own_cache(cache)  # as a generation loop holds it (ORT: in-place buffers)
        ids, pos, mask = _inputs(self.args.vocab_size, batch, 1, context, 3)
        return lambda: self.engine.step(ids, pos, mask, cache)  # each call's new cache is dropped

    def close(self):
        self.engine = None


class HFSystem(System):
    """transformers' DeepseekV2/V3ForCausalLM with its DynamicCache (its default attention and experts)."""

    name = "hf"

    def __init__(self, checkpoint: Path, args: ModelArgs):
        self.model = load_hf_model(checkpoint)
        self.args = args
        self.attn = self.model.config._attn_implementation
        self.experts = getattr(self.model.config, "_experts_implementation", None)

    def _cache(self, batch: int, context: int):
        """A DynamicCache of `context` random tokens, filled through its public `update`.

        Each layer's entries are shaped as the model's own first step writes them (transformers
        5 stores MLA's latent and rotated key, not expanded keys and values).
        """
        from transformers import DynamicCache

        probe = DynamicCache(config=self.model.config)
        ids, pos, mask = _inputs(self.args.vocab_size, batch, 1, 0, 4)
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=probe, use_cache=True)
        cache = DynamicCache(config=self.model.config)
        gen = torch.Generator().manual_seed(2)
        for i, layer in enumerate(probe.layers):
            k, v = layer.keys, layer.values
            cache.update(torch.randn(*k.shape[:-2], context, k.shape[-1], generator=gen).to(k.dtype),
                         torch.randn(*v.shape[:-2], context, v.shape[-1], generator=gen).to(v.dtype), i)
        return cache

    def cache_bytes_per_token(self) -> int:
        """Bytes transformers' DynamicCache holds per token, all layers (measured on its tensors)."""
        tokens = 8
        ids, pos, mask = _inputs(self.args.vocab_size, 1, tokens, 0, 5)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return total // tokens

    def prefill(self, batch, tokens):
        ids, pos, mask = _inputs(self.args.vocab_size, batch, tokens, 0, 1)

        def run():
            from transformers import DynamicCache

            with torch.no_grad():
                return self.model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                  past_key_values=DynamicCache(config=self.model.config), use_cache=True)

        return run

    def decode(self, batch, context):
        cache = self._cache(batch, context)
        ids, pos, mask = _inputs(self.args.vocab_size, batch, 1, context, 3)

        def run():
            with torch.no_grad():
                out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                                 use_cache=True)
            cache.crop(-1)  # every timed step starts from the same context
            return out

        return run

    def close(self):
        self.model = None


# ---------------------------------------------------------------- transformers' own ONNX export


def _first_reason(err: BaseException) -> str:
    """The line of a (multi-page) exporter error that says what failed: torch.onnx puts it under
    '## Exception summary'; other exporters say it first."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        hit = rest[0] if rest else lines[0]
    else:
        hit = lines[0] if lines else ""
    return f"{type(err).__name__}: {hit}"[:400]


def _hf_cache_names(prefix: str, num_layers: int) -> list[str]:
    """The exported transformers graph's cache IO names: `{prefix}.{i}.key`, `{prefix}.{i}.value` per layer."""
    return [f"{prefix}.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]


class _HFDecodeGraph(torch.nn.Module):
    """transformers' model with its cache as flat tensors, the form an ONNX graph can take and return."""

    def __init__(self, model, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, position_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


@contextlib.contextmanager
def _real_valued_rope(model):
    """transformers' DeepSeek-V2 rotary embedding rewritten without complex tensors, for the exporters.

    Its code builds complex frequencies (torch.polar) and rotates through view_as_complex, which
    neither torch.onnx exporter converts. Inside this context the model's rotary module returns
    the same rotation as real [..., dim/2, 2] (cos, sin) pairs, and the module's apply_rotary_emb
    applies it as (a·cos - b·sin, a·sin + b·cos) on the same interleaved pairs: the same numbers,
    nothing else of transformers' model changed. Yields True when there was something to rewrite.
    """
    module = sys.modules[type(model).__module__]
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(module, "apply_rotary_emb"):
        yield False
        return

    def rope(x, position_ids):
        freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * rotary.attention_scaling  # [B, S, R/2, 2]

    def apply(xq, xk, cos_sin):
        cos_sin = cos_sin.unsqueeze(1)  # [B, 1, S, R/2, 2]: broadcast over heads
        cos, sin = cos_sin[..., 0], cos_sin[..., 1]

        def rotate(x):
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)

        return rotate(xq), rotate(xk)

    saved = module.apply_rotary_emb
    rotary.forward = rope  # an instance attribute shadows the class's method
    module.apply_rotary_emb = apply
    try:
        yield True
    finally:
        del rotary.forward
        module.apply_rotary_emb = saved


EXPORTABLE_IMPLEMENTATIONS = {"attention": "eager", "experts": "batched_mm"}


def _hf_onnx_attempts(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Try transformers' model through torch.onnx, stopping at the first graph that exports.

    1. The model as loaded (its default SDPA attention and grouped_mm experts), with its cache:
       dynamo, then TorchScript.
    2. Where both fail: the same model, with DeepSeek-V2's complex RoPE rewritten in real numbers
       (`_real_valued_rope`, shown to give transformers' logits first; V3's RoPE is real already)
       and with transformers' own export-friendly implementations selected through its public
       setters (eager attention: torchlib maps SDPA to an MHA `Attention` that rejects MLA's
       one-head latent key; batched_mm experts: grouped_mm is a custom op with no ONNX
       translation, and the eager expert loop is data-dependent): with the cache (dynamo, then
       TorchScript), then without.

    An exported graph is then run in ONNX Runtime on a fresh input and compared with transformers'
    model as loaded (`ort_max_abs_diff`). Returns {"file", "with_cache", "rope", "implementations",
    "rope_rewrite_max_abs_diff", "ort_max_abs_diff", "attempts": [{"exporter", "graph", "rope",
    "ok", "error", "seconds"}], "cache_dims"}.
    """
    import warnings

    args = ModelArgs.from_json(checkpoint / "config.json")
    hf = HFSystem(checkpoint, args)
    L = args.num_hidden_layers
    wrapper = _HFDecodeGraph(hf.model, L).eval()
    probe = hf._cache(1, 4)
    past = [t for layer in probe.layers for t in (layer.keys, layer.values)]
    ids, pos, mask = _inputs(args.vocab_size, 1, 1, 4, 6)
    names = ["input_ids", "position_ids", "attention_mask"]
    names += _hf_cache_names("past", L)
    outs = ["logits"] + _hf_cache_names("present", L)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in names[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    auto = torch.export.Dim.AUTO
    # *past is one element of the inputs for torch.export: its shapes are one nested tuple
    # (a decode graph: one new token, so S is static; a dynamic S makes SDPA's is_causal symbolic)
    shapes = ({0: auto}, {0: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    plain_ids, _, plain_mask = _inputs(args.vocab_size, 1, 4, 0, 6)
    plain_axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    class NoCache(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    cached = (wrapper, (ids, pos, mask, *past), names, outs)
    plain = (NoCache(hf.model), (plain_ids, plain_mask), list(plain_axes), ["logits"])
    plans = {("dynamo", "decode with cache"): (*cached, {"dynamic_shapes": shapes}),
             ("torchscript", "decode with cache"): (*cached, {"dynamic_axes": axes}),
             ("dynamo", "no cache"): (*plain, {"dynamic_shapes": ({0: auto, 1: auto}, {0: auto, 1: auto})}),
             ("torchscript", "no cache"): (*plain, {"dynamic_axes": plain_axes})}
    loaded = {"attention": hf.model.config._attn_implementation,
              "experts": getattr(hf.model.config, "_experts_implementation", None)}
    result: dict[str, Any] = {"file": None, "with_cache": False, "attempts": [], "rope": "transformers' code",
                              "implementations": loaded, "cache_dims": [t.shape[-1] for t in past]}

    def attempt(rope: str, exporter: str, graph: str) -> bool:
        module, example, in_names, out_names, dyn = plans[exporter, graph]
        path = out / f"hf-{exporter}-{graph.replace(' ', '-')}{'-real-rope' if rope == 'real-valued' else ''}.onnx"
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    torch.onnx.export(module, example, str(path), dynamo=True, opset_version=23, external_data=True,
                                      input_names=in_names, output_names=out_names, verbose=False, **dyn)
                else:
                    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17,
                                      input_names=in_names, output_names=out_names, **dyn)
            ok, error = True, None
        except Exception as err:  # every exporter failure is a finding to report, not a crash
            ok, error = False, _first_reason(err)
        result["attempts"].append({"exporter": f"torch.onnx.export ({exporter})", "graph": graph, "rope": rope,
                                   "ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 1)})
        if ok:
            result.update(file=str(path), with_cache=graph == "decode with cache")
        return ok

    def exported() -> dict[str, Any]:
        result["ort_max_abs_diff"] = _check_hf_onnx(Path(result["file"]), hf, args, result["with_cache"])
        return result

    if attempt("transformers'", "dynamo", "decode with cache") or attempt("transformers'", "torchscript",
                                                                         "decode with cache"):
        return exported()
    with _real_valued_rope(hf.model) as rewritten, torch.no_grad():
        got = wrapper(ids, pos, mask, *past)[0] if rewritten else None
    if rewritten:
        with torch.no_grad():
            want = wrapper(ids, pos, mask, *past)[0]
        result["rope_rewrite_max_abs_diff"] = diff = float((got - want).abs().max())
        if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
            result["rope"] = "real-valued rewrite refused: its logits differ from transformers' code"
            return result
        result["rope"] = "rewritten in real numbers (nothing else of transformers' code changed)"
    hf.model.set_attn_implementation(EXPORTABLE_IMPLEMENTATIONS["attention"])
    hf.model.set_experts_implementation(EXPORTABLE_IMPLEMENTATIONS["experts"])
    result["implementations"] = dict(EXPORTABLE_IMPLEMENTATIONS)
    try:
        with _real_valued_rope(hf.model):
            rope = "real-valued" if rewritten else "transformers'"
            ok = any(attempt(rope, exporter, graph) for exporter, graph in plans)
    finally:
        hf.model.set_attn_implementation(loaded["attention"])
        if loaded["experts"] is not None:
            hf.model.set_experts_implementation(loaded["experts"])
    return exported() if ok else result


def _check_hf_onnx(path: Path, hf: "HFSystem", args: ModelArgs, with_cache: bool) -> float:
    """Max |logits| difference between the exported graph in ONNX Runtime and transformers' model
    as loaded, on an input unlike the export's example (another context length and tokens)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if with_cache:
        cache = hf._cache(1, 7)
        past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        ids, pos, mask = _inputs(args.vocab_size, 1, 1, 7, 9)
        feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
        feeds.update({name: t.numpy() for name, t in zip(_hf_cache_names("past", args.num_hidden_layers), past)})
        with torch.no_grad():
            want = _HFDecodeGraph(hf.model, args.num_hidden_layers)(ids, pos, mask, *past)[0]
    else:
        ids, _, mask = _inputs(args.vocab_size, 1, 5, 0, 9)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        with torch.no_grad():
            want = hf.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    got = torch.from_numpy(session.run(["logits"], feeds)[0])
    return float((got - want).abs().max())


HF_ONNX_TIMEOUT_S = 900
HF_ONNX_RECIPE = "r2"  # bump when _hf_onnx_attempts changes what it tries: cached reports are keyed by it


def hf_onnx_export(checkpoint: Path, home: Path) -> dict[str, Any]:
    """transformers' own ONNX export of `checkpoint` (see `_hf_onnx_attempts`), cached per checkpoint and versions.

    The attempts run in a child process: exporters print pages of graph dumps on failure, hold
    the model's memory, and may not finish; the child is given up after HF_ONNX_TIMEOUT_S.
    """
    import subprocess

    import transformers

    key = (f"{_checkpoint_key(checkpoint)}-torch{torch.__version__}-transformers{transformers.__version__}"
           f"-{HF_ONNX_RECIPE}")
    out = home / "bench" / "hf-onnx" / key.replace("+", "_")
    report = out / "attempts.json"
    if report.is_file():
        return json.loads(report.read_text())
    out.mkdir(parents=True, exist_ok=True)
    code = ("import json, sys; from pathlib import Path; from exporter.bench import _hf_onnx_attempts; "
            "r = _hf_onnx_attempts(Path(sys.argv[1]), Path(sys.argv[2])); Path(sys.argv[3]).write_text(json.dumps(r))")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(out), str(report)], env=env,
                              capture_output=True, text=True, timeout=HF_ONNX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"file": None, "with_cache": False, "attempts": [
            {"exporter": "torch.onnx.export", "graph": "all", "ok": False, "seconds": HF_ONNX_TIMEOUT_S,
             "error": f"gave up after {HF_ONNX_TIMEOUT_S} s"}]}
    if proc.returncode != 0 or not report.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"file": None, "with_cache": False, "attempts": [
            {"exporter": "torch.onnx.export", "graph": "all", "ok": False,
             "seconds": round(time.perf_counter() - start, 1), "error": f"exporter process failed: {tail[:300]}"}]}
    return json.loads(report.read_text())


class HFOnnxSystem(System):
    """transformers' exported graph in ONNX Runtime (decode needs the graph exported with its cache).

    Sizes the exporter fixed in the graph (torch.export specializes a dimension the example input
    has as 1) are respected: a measurement the graph cannot take returns None and is listed in
    `unmeasured`."""

    name = "hf-onnx"

    def __init__(self, path: Path, args: ModelArgs, with_cache: bool, threads: int, cache_shapes: list):
        self.session = hf_onnx_session(path, threads)
        self.args, self.with_cache, self.cache_shapes = args, with_cache, cache_shapes
        ids = next(i for i in self.session.get_inputs() if i.name == "input_ids")
        self.fixed_batch, self.fixed_tokens = (d if isinstance(d, int) else None for d in ids.shape)
        self.unmeasured: list[str] = []

    def _runner(self, what: str, batch: int, tokens: int, past: int) -> Callable[[], Any] | None:
        """A timed call of the graph on these sizes, or None (noted in `unmeasured`) where the graph
        declares other fixed sizes or refuses them when run (sizes fixed inside: Reshape constants)."""
        if self.fixed_batch not in (None, batch) or self.fixed_tokens not in (None, tokens):
            self.unmeasured.append(f"{what} (the graph's inputs fix batch {self.fixed_batch or 'B'} x "
                                   f"{self.fixed_tokens or 'S'} new tokens)")
            return None
        import onnxruntime as ort

        feeds = self._feeds(batch, tokens, past)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refusal is expected here and reported below, not logged
        try:
            self.session.run(None, feeds, quiet)
        except Exception as err:  # onnxruntime's own error types: a size the graph cannot run is a finding
            node = re.search(r"Name:'([^']*)'", str(err))
            self.unmeasured.append(f"{what} (fails in ONNX Runtime{' at node ' + node[1] if node else ''}: "
                                   "the exporter fixed these sizes inside the graph)")
            return None
        return lambda: self.session.run(None, feeds)

    def _feeds(self, batch: int, tokens: int, past: int) -> dict:
        ids, pos, mask = _inputs(self.args.vocab_size, batch, tokens, past, 1)
        if not self.with_cache:
            return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
        names = _hf_cache_names("past", len(self.cache_shapes) // 2)
        for name, dim in zip(names, self.cache_shapes):  # [key dim, value dim] per layer, interleaved
            feeds[name] = torch.randn(batch, 1, past, dim).numpy()
        return feeds

    def prefill(self, batch, tokens):
        return self._runner(f"prefill of {tokens} tokens", batch, tokens, 0)

    def decode(self, batch, context):
        return self._runner(f"decode B={batch}", batch, 1, context) if self.with_cache else None

    def close(self):
        self.session = None


# ---------------------------------------------------------------- the run


def parse_ints(text: str, option: str, minimum: int = 1) -> list[int]:
    """'128,1024' -> [128, 1024], or an OptionError naming the option."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise OptionError(f"{option} {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < minimum:
        raise OptionError(f"{option} {text!r}: every value must be >= {minimum}")
    return sorted(set(values))


def parse_engines(items: list[str]) -> dict[str, Path]:
    """['before=/path/OUT', ...] -> {name: folder}: exported engine folders measured as extra systems."""
    engines: dict[str, Path] = {}
    for item in items:
        name, _, folder = item.partition("=")
        if not name or not folder or name in SYSTEMS or name in engines:
            raise OptionError(f"--engine {item!r}: expected NAME=FOLDER with a new name "
                              f"(not one of {', '.join(SYSTEMS)})")
        if not (Path(folder) / "manifest.json").is_file():
            raise OptionError(f"--engine {item!r}: {folder} has no manifest.json (not an engine folder)")
        engines[name] = Path(folder)
    return engines


def parse_llama_cpp(items: list[str]) -> dict[str, tuple[Path, Path]]:
    """['q4_0=/path/llama-bench:/path/model-q4_0.gguf', ...] -> {name: (binary, gguf)}."""
    found: dict[str, tuple[Path, Path]] = {}
    for item in items:
        name, _, rest = item.partition("=")
        binary, _, gguf = rest.partition(":")
        if not name or not binary or not gguf or name in SYSTEMS or name in found:
            raise OptionError(f"--llama-cpp {item!r}: expected NAME=LLAMA_BENCH:GGUF with a new name")
        for path, what in ((Path(binary), "llama-bench binary"), (Path(gguf), "GGUF file")):
            if not path.is_file():
                raise OptionError(f"--llama-cpp {item!r}: {path}: {what} not found")
        found[name] = (Path(binary), Path(gguf))
    return found


def llama_bench_rows(name: str, binary: Path, gguf: Path, options: "BenchOptions", bandwidth: Callable[[], float],
                     run=subprocess.run) -> tuple[list[dict[str, Any]], str | None]:
    """llama.cpp's own `llama-bench` on a GGUF of the same model: prefill of `prefill_tokens` from empty and
    decode (32 tokens after a prefilled depth = each context), batch 1, `threads` threads, `repeats` runs.

    Each call is one process that loads the model itself, so its steps cannot be interleaved with ours;
    the read bandwidth is taken just before each call (its floor fraction). Returns (rows, None) or
    ([], why it could not run)."""
    rows = []
    tests = [("prefill", 0, ["-p", str(options.prefill_tokens), "-n", "0"])]
    tests += [("decode", c, ["-p", "0", "-n", "32", "-d", str(c)]) for c in options.contexts]
    for phase, context, extra in tests:
        bw = bandwidth()
        cmd = [str(binary), "-m", str(gguf), "-t", str(options.threads), "-o", "json", "-r", str(options.repeats),
               *extra]
        done = run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return [], f"llama-bench exited with {done.returncode}: {last}"
        try:
            entry = json.loads(done.stdout)[0]
            tokens = int(entry["n_gen"] if phase == "decode" else entry["n_prompt"])
            samples = [ns / 1e6 for ns in entry["samples_ns"]]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return [], f"llama-bench printed no results JSON ({type(err).__name__}: {err})"
        per = [ms / tokens for ms in samples] if phase == "decode" else samples  # decode: ms per token
        rows.append({"system": name, "phase": phase, "batch": 1, "context": context, "ms": statistics.median(per),
                     "best_ms": min(per), "runs_ms": [round(r, 3) for r in per],
                     "runs_bandwidth": [round(bw)] * len(per), "runs_gemm_flops": [], "llama_cpp": {
                         "cmd": " ".join(cmd), "gguf_bytes": gguf.stat().st_size}})
    return rows, None


def parse_systems(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if not names or bad:
        raise OptionError(f"--systems {text!r}: each must be one of {', '.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in names]


@dataclass
class BenchOptions:
    contexts: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    repeats: int = 5
    warmup: int = 2
    prefill_tokens: int = PREFILL_TOKENS
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    threads: int = THREADS
    bandwidth_bytes: int = BANDWIDTH_BYTES
    gemm_size: int = GEMM_SIZE
    extra_engines: dict[str, Path] = field(default_factory=dict)  # name -> an engine folder exported elsewhere
    llama_cpp: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (llama-bench, GGUF)

    def check(self) -> None:
        if self.repeats < 1:
            raise OptionError(f"--repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise OptionError(f"--warmup must be >= 0, got {self.warmup}")
        if self.prefill_tokens < 1:
            raise OptionError(f"--prefill-tokens must be >= 1, got {self.prefill_tokens}")
        if self.threads < 1:
            raise OptionError(f"--threads must be >= 1, got {self.threads}")
        if not self.contexts or min(self.contexts) < 1:
            raise OptionError("--contexts: every value must be >= 1")
        if not self.batches or min(self.batches) < 1:
            raise OptionError("--batch: every value must be >= 1")


def run_bench(checkpoint: Path | None, home: Path, options: BenchOptions, progress: Progress | None = None) -> dict:
    """Measure every system in `options.systems` on `checkpoint` (None: the bench config). Returns the report."""
    from dscompile.exporter.verify.eager import EagerEngine
    from dscompile.model.checkpoint import load_checkpoint
    from dscompile.runtime.ort_engine import OrtEngine

    options.check()
    report = progress or (lambda stage, done, total: None)
    torch.set_num_threads(options.threads)
    checkpoint = Path(checkpoint) if checkpoint is not None else bench_checkpoint(home, report)
    args = ModelArgs.from_json(checkpoint / "config.json")
    elt = 4  # float32: the dtype every system here runs in
    # the manifest's "quantization" of each --engine exported with --weights
    quantizations = {name: q for name, folder in options.extra_engines.items()
                     if (q := json.loads((Path(folder) / "manifest.json").read_text()).get("quantization"))}
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "model": args.to_config(), "dtype": "float32",
        "threads": options.threads, "repeats": options.repeats, "warmup": options.warmup,
        "prefill": {"tokens": options.prefill_tokens, "batch": 1},
        "contexts": options.contexts, "batches": options.batches,
        "systems": options.systems + list(options.extra_engines) + list(options.llama_cpp),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "results": [], "skipped": {}, "engines": {}, "context_scaling": {},
        "alternating": [], "load": {},
    }
    engines = {}
    todo = [s for s in options.systems if s in OUR_ENGINES]
    for i, name in enumerate(todo):  # exports first: they are slow and memory-hungry, not measured
        engines[name] = cached_export(checkpoint, home, OUR_ENGINES[name])
        result["engines"][name] = {"dir": str(engines[name]), "options": OUR_ENGINES[name]}
        report("export", i + 1, len(todo))

    probe = MachineProbe(options.bandwidth_bytes, options.gemm_size)
    bw0, gemm0 = probe.median(probe.bandwidth), probe.median(probe.gemm)
    total = len(result["systems"]) * (1 + len(options.contexts) * len(options.batches))
    done = 0

    def measure(system: System) -> None:
        nonlocal done
        rows = []
        fn = system.prefill(1, options.prefill_tokens)
        if fn is not None:
            runs, readings = time_ms(fn, options.repeats, options.warmup, lambda: (probe.bandwidth(), probe.gemm()))
            rows.append(("prefill", 1, 0, runs, [b for b, _ in readings], [g for _, g in readings]))
        done += 1
        report("measure", done, total)
        for batch in options.batches:
            for context in options.contexts:
                fn = system.decode(batch, context)
                if fn is not None:
                    runs, readings = time_ms(fn, options.repeats, options.warmup, probe.bandwidth)
                    rows.append(("decode", batch, context, runs, readings, []))
                del fn
                done += 1
                report("measure", done, total)
        for phase, batch, context, runs, bandwidths, gemms in rows:
            result["results"].append({"system": system.name, "phase": phase, "batch": batch, "context": context,
                                      "ms": statistics.median(runs), "best_ms": min(runs),
                                      "runs_ms": [round(r, 3) for r in runs],
                                      "runs_bandwidth": [round(b) for b in bandwidths],
                                      "runs_gemm_flops": [round(g) for g in gemms]})
        scaling = context_scaling(system, min(options.contexts), max(options.contexts), options.repeats,
                                  options.warmup)
        if scaling is not None:
            result["context_scaling"][system.name] = scaling

    def load(name: str) -> System | None:
        if name == "eager":
            return EngineSystem(name, EagerEngine(load_checkpoint(checkpoint)), args)
        if name in OUR_ENGINES or name in options.extra_engines:
            folder = engines[name] if name in OUR_ENGINES else options.extra_engines[name]
            result["engines"].setdefault(name, {"dir": str(folder), "options": None})
            return EngineSystem(name, OrtEngine.load(folder, provider="cpu", threads=options.threads), args)
        if name == "hf":
            try:
                import transformers  # noqa: F401
            except ImportError as err:
                result["skipped"]["hf"] = f"transformers is not installed ({err})"
                return None
            return HFSystem(checkpoint, args)
        if name == "hf-onnx":  # the graph hf_onnx_export wrote, if any
            export = result.get("hf_onnx_export", {})
            if not export.get("file"):
                return None
            return HFOnnxSystem(Path(export["file"]), args, export["with_cache"], options.threads,
                                export["cache_dims"])
        raise AssertionError(name)

    def measure_load_of(name: str) -> None:
        """Load time and resident memory of `name` alone, in a fresh process (exporter/loadmem.py); for
        our engines beside the size of their weights file."""
        if name in OUR_ENGINES or name in options.extra_engines:
            folder = engines[name] if name in OUR_ENGINES else options.extra_engines[name]
            spec: tuple = ("ours", str(folder), options.threads)
        elif name == "hf-onnx":
            spec = ("hf-onnx", result["hf_onnx_export"]["file"], options.threads)
        else:
            spec = (name, str(checkpoint))
        entry: dict[str, Any] = {"loader": LOADERS[spec[0]][1]}
        try:
            entry.update(measure_load(spec))
            entry["rss_growth"] = entry["rss_after"] - entry["rss_before"]
            # What the process holds once it has run: weights an engine maps count when read (loadmem)
            entry["resident_growth"] = entry.get("pss_after_step", entry["pss_after"]) - entry["pss_before"]
        except LoadMeasureError as err:  # a finding of this run, not a reason to lose its other measurements
            entry["error"] = str(err)
        if spec[0] == "ours":
            weights = json.loads((Path(spec[1]) / "manifest.json").read_text())["weights"]
            # the file holds every graph's and program's tensors (the same bytes once), which can be more
            # than the parameters: both are shown
            entry["weights_bytes"], entry["parameter_bytes"] = weights["bytes"], weights.get("parameter_bytes")
            entry["growth_over_weights"] = (entry["resident_growth"] / weights["bytes"]
                                            if "resident_growth" in entry else None)
        result["load"][name] = entry

    for name in result["systems"]:
        if name == "hf-onnx":
            continue  # measured right after "hf", whose loaded model it exports
        system = load(name)
        if system is None:
            done += 1 + len(options.contexts) * len(options.batches)
            continue
        measure(system)
        if name == "hf":
            result["cache_hf_bytes_per_token"] = system.cache_bytes_per_token()
        system.close()
        del system
        gc.collect()
        measure_load_of(name)
        if name == "hf" and "hf-onnx" in options.systems:
            hf_export = result["hf_onnx_export"] = hf_onnx_export(checkpoint, home)
            if hf_export["file"] is not None:
                hf_onnx = load("hf-onnx")
                measure(hf_onnx)
                hf_onnx.close()
                measure_load_of("hf-onnx")
                gaps = list(dict.fromkeys(hf_onnx.unmeasured))
                if not hf_export["with_cache"]:
                    gaps.insert(0, "decode: only the graph without a cache exported")
                if gaps:
                    result["skipped"]["hf-onnx"] = "; ".join(gaps)
            else:
                result["skipped"]["hf-onnx"] = (f"transformers' model did not export in any of "
                                                f"{len(hf_export['attempts'])} attempts (hf_onnx_export)")
            gc.collect()
    if "hf-onnx" in options.systems and "hf" not in options.systems:
        result["skipped"]["hf-onnx"] = "measured only with the hf system (--systems must include hf)"

    # ours against each transformers system, run alternately (the targets' ratios); both loaded at once
    references = [n for n in ("hf", "hf-onnx") if n in options.systems and "ours" in options.systems]
    configs = ([("prefill", 1, 0)] + [("decode", 1, p) for p in options.contexts]
               + [("decode", b, min(options.contexts)) for b in options.batches if b > 1])
    # ...and each quantized engine (--engine) against ours in float32 (its time ratio)
    quantized = list(quantizations) if "ours" in options.systems else []
    pairs = [(name, False) for name in references] + [(name, True) for name in quantized]
    ours = None  # loaded once another system is
    for i, (name, ours_is_reference) in enumerate(pairs):
        other = load(name)  # None: transformers missing, or its model did not export (listed under "skipped")
        if other is not None:
            ours = ours or load("ours")
            first, second = (other, ours) if ours_is_reference else (ours, other)
            result["alternating"] += compare_alternately(first, second, configs, options.prefill_tokens,
                                                         options.repeats, options.warmup)
            other.close()
            del other, first, second
            gc.collect()
        report("compare", i + 1, len(pairs))
    if ours is not None:
        ours.close()
        del ours
        gc.collect()
    for name, (binary, gguf) in options.llama_cpp.items():
        rows, why = llama_bench_rows(name, binary, gguf, options, probe.bandwidth)
        result["results"] += rows
        if why:
            result["skipped"][name] = why
        result["engines"][name] = {"llama_cpp": str(binary), "gguf": str(gguf), "bytes": gguf.stat().st_size}

    bw1, gemm1 = probe.median(probe.bandwidth), probe.median(probe.gemm)
    del probe
    paired = [b for r in result["results"] for b in r["runs_bandwidth"]]
    bandwidth = statistics.median(paired) if paired else max(bw0, bw1)
    paired_gemm = [g for r in result["results"] for g in r["runs_gemm_flops"]]
    gemm = statistics.median(paired_gemm) if paired_gemm else max(gemm0, gemm1)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bandwidth"] = {"bytes_per_s": bandwidth, "start": bw0, "end": bw1, "tensor_bytes": options.bandwidth_bytes,
                           "paired_min": min(paired, default=None), "paired_max": max(paired, default=None)}
    result["gemm_flops"] = gemm
    result["gemm"] = {"flops": gemm, "start": gemm0, "end": gemm1, "size": options.gemm_size}
    from dscompile.exporter.export import cache_layout

    layout = cache_layout(args, torch.float32)
    result["cache"] = {"ours_bytes_per_token": layout["bytes_per_token"],
                       "mha_equivalent_bytes_per_token": layout["mha_equivalent_bytes_per_token"],
                       "transformers_bytes_per_token": result.pop("cache_hf_bytes_per_token", None)}
    hf_ms = {(r["phase"], r["batch"], r["context"]): r["ms"] for r in result["results"] if r["system"] == "hf"}
    hfo_ms = {(r["phase"], r["batch"], r["context"]): r["ms"] for r in result["results"] if r["system"] == "hf-onnx"}

    def floor(r: dict, bandwidth: float, flops: float) -> dict:
        bpw = quantized_bits.get(r["system"])
        if r["phase"] == "decode":
            return decode_floor(args, r["batch"], r["context"], elt, bandwidth, bpw)
        return prefill_floor(args, r["batch"], options.prefill_tokens, elt, bandwidth, flops, bpw)

    quantized_bits = {}  # system -> bits per weight, for engines exported with --weights
    every = step_weight_params(args, 1 << 20)  # every expert read
    parameters = sum(every.values()) - every["embeddings"] + args.vocab_size * args.hidden_size
    for name, (_, gguf) in options.llama_cpp.items():  # its average over every tensor, float parts included
        quantized_bits[name] = 8 * gguf.stat().st_size / parameters
    for name, quant in quantizations.items():
        quantized_bits[name] = float(quant["bits_per_weight"])
        result["engines"].setdefault(name, {"dir": str(options.extra_engines[name])})["quantization"] = quant["scheme"]

    for r in result["results"]:
        r["bandwidth"] = statistics.median(r["runs_bandwidth"])
        r["gemm_flops"] = statistics.median(r["runs_gemm_flops"]) if r["runs_gemm_flops"] else None
        at_median = floor(r, r["bandwidth"], r["gemm_flops"] or gemm)
        r["floor_bytes"], r["floor_ms"] = at_median["bytes"], at_median["ms"]
        # each run against the machine as read just before it, then the median over runs
        flops = r["runs_gemm_flops"] or [gemm] * len(r["runs_ms"])
        r["floor_fraction"] = statistics.median(floor(r, b, f)["ms"] / t for b, f, t in
                                                zip(r["runs_bandwidth"], flops, r["runs_ms"]))
        key = (r["phase"], r["batch"], r["context"])
        r["speedup_vs_hf"] = hf_ms[key] / r["ms"] if key in hf_ms else None
        r["speedup_vs_hf_onnx"] = hfo_ms[key] / r["ms"] if key in hfo_ms else None
    result["floors"] = {
        "decode": [{"batch": b, "context": p, **decode_floor(args, b, p, elt, bandwidth)}
                   for b in options.batches for p in options.contexts],
        "prefill": prefill_floor(args, 1, options.prefill_tokens, elt, bandwidth, gemm),
        "step_weight_params_batch1": step_weight_params(args, 1),
    }
    result["targets"] = targets(result)
    return result


# ---------------------------------------------------------------- targets, table, plot


def _find(result: dict, system: str, phase: str, batch: int, context: int) -> dict | None:
    return next((r for r in result["results"] if r["system"] == system and r["phase"] == phase
                 and r["batch"] == batch and r["context"] == context), None)


def _alternating(result: dict, reference: str, phase: str, batch: int, context: int) -> float | None:
    """Our time over `reference`'s for that row, measured alternately; None where not measured."""
    row = next((r for r in result.get("alternating", []) if r["reference"] == reference and r["phase"] == phase
                and r["batch"] == batch and r["context"] == context), None)
    return row["time_ratio"] if row else None


def targets(result: dict) -> list[dict[str, Any]]:
    """Issue 6's targets for "ours", where this run measured what they need.

    A target comparing two measurements is judged on the two run alternately (`alternating`,
    `context_scaling`); "table" is the same ratio from the table's medians, taken minutes apart."""
    out = []

    def add(name: str, value: float | None, goal: str, ok: bool | None, table: float | None = None) -> None:
        out.append({"target": name, "value": value, "goal": goal, "table": table,
                    "passed": None if value is None else ok})

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["ms"] / b["ms"] if a and b else None

    for context, need in ((128, 0.85), (1024, 0.80), (4096, 0.80)):
        r = _find(result, "ours", "decode", 1, context)
        if r:
            add(f"decode B=1 P={context}: fraction of bandwidth floor", r["floor_fraction"], f">= {need}",
                r["floor_fraction"] >= need)
    for reference, label, needs in (("hf", "transformers eager", ((1024, 1.7), (4096, 5.0))),
                                    ("hf-onnx", "transformers' ONNX export", ((1024, 5.0), (4096, 15.0)))):
        for context, need in needs:
            ours, theirs = _find(result, "ours", "decode", 1, context), _find(result, reference, "decode", 1, context)
            t = _alternating(result, reference, "decode", 1, context)
            if ours and reference in result["systems"]:
                v = 1.0 / t if t else None
                table = ratio(theirs, ours)
                add(f"decode B=1 P={context}: speedup vs {label}", v, f">= {need}", v is not None and v >= need,
                    table)
    scaling = result.get("context_scaling", {}).get("ours")
    long, short = _find(result, "ours", "decode", 1, 4096), _find(result, "ours", "decode", 1, 128)
    if long and short:
        v = scaling["ratio"] if scaling and scaling["contexts"] == [128, 4096] else None
        add("decode B=1: step at P=4096 / step at P=128", v, "<= 1.2", v is not None and v <= 1.2,
            ratio(long, short))
    for phase, batch, context, name in (("decode", 4, 128, "decode B=4 P=128"),
                                        ("prefill", 1, 0, f"prefill {result['prefill']['tokens']} tokens")):
        ours, theirs = _find(result, "ours", phase, batch, context), _find(result, "hf", phase, batch, context)
        if ours and theirs:
            v = _alternating(result, "hf", phase, batch, context)
            add(f"{name}: time / transformers eager's", v, "<= 0.8", v is not None and v <= 0.8,
                ratio(ours, theirs))
    return out


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else format(v, spec) + unit


def _load_lines(load: dict[str, dict]) -> list[str]:
    """One row per system: load time, RSS growth and RSS after load (and our weights file beside
    them), then what each loader does."""
    if not load:
        return []
    lines = ["load: each system alone in a fresh process, after its imports; RSS growth = RSS after load - "
             "before; resident = PSS growth once loaded and run one step (16-token prompt + 1 decode step; "
             "counts mapped weights once); MB = 1e6 bytes; growth/weights = resident / the engine's weights file"]
    mb = lambda v: f"{v / 1e6:.0f}"  # noqa: E731
    for name, e in load.items():
        if "error" in e:
            lines.append(f"load    {name:18s} failed: {e['error']}")
            continue
        params = f" (parameters {mb(e['parameter_bytes'])} MB)" if e.get("parameter_bytes") else ""
        weights = (f"; weights file {mb(e['weights_bytes'])} MB{params}, growth/weights "
                   f"{e['growth_over_weights']:.2f}x" if "weights_bytes" in e else "")
        lines.append(f"load    {name:18s} {e['load_s']:7.2f} s  resident +{mb(e['resident_growth'])} MB, "
                     f"RSS +{mb(e['rss_growth'])} MB -> "
                     f"{mb(e['rss_after'])} MB, peak {mb(e['rss_peak'])} MB{weights} (after: "
                     f"{mb(e['rss_anon_after'])} MB anonymous, {mb(e['rss_file_after'])} MB file-backed; "
                     f"imports before the load {e['import_s']:.1f} s, {mb(e['rss_start'])} -> "
                     f"{mb(e['rss_before'])} MB)")
    loaders: dict[str, list[str]] = {}
    for name, e in load.items():
        loaders.setdefault(e["loader"], []).append(name)
    lines += [f"load    {', '.join(names)}: {loader}" for loader, names in loaders.items()]
    return lines


def table_lines(result: dict) -> list[str]:
    """The report as text: one row per measurement, then load time and memory, cache, floors,
    skipped systems, targets."""
    bw = result["bandwidth"]
    spread = (f"{bw['paired_min'] / 1e9:.1f}-{bw['paired_max'] / 1e9:.1f} over the run"
              if bw.get("paired_min") is not None else "no paired readings")
    lines = [f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s median (sum over {bw['tensor_bytes'] / 2**30:.1f} GiB, "
             f"{result['threads']} threads, read before every timed run: {spread}; "
             f"start {bw['start'] / 1e9:.1f}, end {bw['end'] / 1e9:.1f}); "
             f"GEMM {result['gemm_flops'] / 1e9:.0f} GFLOP/s ({result['gemm']['size']}³, median of the readings "
             f"before prefill runs); load {result['machine']['loadavg_start'][0]:.1f} -> "
             f"{result['machine']['loadavg_end'][0]:.1f}",
             f"median (and best) of {result['repeats']} runs after {result['warmup']} warm-up; prefill "
             f"{result['prefill']['tokens']} tokens, batch 1; floor% = median over runs of (floor at the bandwidth "
             "read just before the run) / run time; vs X = X's median / this median",
             f"{'system':18s} {'phase':8s} {'B':>2} {'P':>5} {'ms':>9} {'best ms':>9} {'GB/s':>5} {'floor ms':>9} "
             f"{'floor%':>7} {'vs hf':>6} {'vs hf-onnx':>10}"]
    for r in result["results"]:
        lines.append(f"{r['system']:18s} {r['phase']:8s} {r['batch']:>2} {r['context'] or '-':>5} {r['ms']:9.1f} "
                     f"{r['best_ms']:9.1f} {r['bandwidth'] / 1e9:5.1f} "
                     f"{r['floor_ms']:9.1f} {100 * r['floor_fraction']:6.0f}% "
                     f"{_fmt(r['speedup_vs_hf'], '5.2f', 'x'):>6} "
                     f"{_fmt(r['speedup_vs_hf_onnx'], '9.2f', 'x'):>10}")
    if result.get("context_scaling"):
        short, long = next(iter(result["context_scaling"].values()))["contexts"]
        lines.append(f"decode B=1 step at P={long} / step at P={short}, the two run alternately: " + ", ".join(
            f"{name} {v['ratio']:.2f}x" for name, v in result["context_scaling"].items()))
    lines += _load_lines(result.get("load", {}))
    c = result["cache"]
    lines.append(f"cache bytes/token: ours {c['ours_bytes_per_token']}, MHA-equivalent "
                 f"{c['mha_equivalent_bytes_per_token']}, transformers' DynamicCache "
                 f"{c['transformers_bytes_per_token'] if c['transformers_bytes_per_token'] is not None else '-'}")
    w = result["floors"]["decode"][0]
    lines.append(f"decode floor B=1: {w['weight_bytes'] / 1e9:.3f} GB of weights + cache "
                 f"({result['model']['num_hidden_layers']} layers x (C+R) x 4 bytes per token)")
    for attempt in result.get("hf_onnx_export", {}).get("attempts", []):
        rope = f", {attempt['rope']} RoPE" if "rope" in attempt else ""
        lines.append(f"hf-onnx: {attempt['exporter']}, {attempt['graph']}{rope}: "
                     f"{'exported' if attempt['ok'] else attempt['error']} ({attempt['seconds']} s)")
    export = result.get("hf_onnx_export", {})
    if export.get("file"):
        rope = (f"RoPE {export['rope']} (logits {export['rope_rewrite_max_abs_diff']:.1e} from transformers' code), "
                if "rope_rewrite_max_abs_diff" in export else "")
        impl = export.get("implementations", {})
        lines.append(f"hf-onnx graph: {rope}attention {impl.get('attention')}, experts {impl.get('experts')}; "
                     f"ONNX Runtime vs transformers' model as loaded: max abs diff "
                     f"{export.get('ort_max_abs_diff', float('nan')):.1e}")
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    if result.get("alternating"):
        lines.append("run alternately, our time / transformers': " + ", ".join(
            f"{r['reference']} {r['phase']} B={r['batch']}{' P=' + str(r['context']) if r['context'] else ''} "
            f"{r['time_ratio']:.2f}" for r in result["alternating"]))
    for t in result["targets"]:
        mark = {True: "pass", False: "MISS", None: "n/a"}[t["passed"]]
        table = f"  (table medians: {t['table']:.2f})" if t.get("table") is not None else ""
        lines.append(f"target  {t['target']:58s} {_fmt(t['value'], '.2f'):>6} ({t['goal']}) {mark}{table}")
    return lines


def plot(result: dict, path: Path) -> None:
    """PNG: decode step latency vs context, one line per system (solid B=1, dashed larger batches) and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    for bi, batch in enumerate(result["batches"]):
        for si, system in enumerate(result["systems"]):
            rows = sorted((r for r in result["results"] if r["system"] == system and r["phase"] == "decode"
                           and r["batch"] == batch), key=lambda r: r["context"])
            if rows:
                ax.plot([r["context"] for r in rows], [r["ms"] for r in rows], styles[bi % 4], marker="o",
                        color=f"C{si}", label=f"{system} B={batch}")
        floors = sorted((f for f in result["floors"]["decode"] if f["batch"] == batch), key=lambda f: f["batch"])
        ax.plot([f["context"] for f in floors], [f["ms"] for f in floors], styles[bi % 4], color="black",
                label=f"bandwidth floor B={batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (past tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"decode latency, {result['threads']} threads, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, sort_keys=True, default=str)
