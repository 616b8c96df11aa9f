"""The bench config, its checkpoint and the engines exported from it, each made once under the cache folder.

The bench config (`bench_args`) is DeepSeek-V2-Lite's dimensions with 4 layers, 16 routed
experts and a 32000 vocabulary; its seeded random checkpoint is written once under the cache
folder (~/.cache/dscompile or $DSCOMPILE_HOME) and reused, and so are the engines exported from
any checkpoint (one folder per checkpoint, set of export options and version of the compiler's
sources). The engines are exported with `dscompile export`'s defaults (ExportOptions) but for the
options a bench system names (bench/systems.py OUR_ENGINES).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable

from dscompile.exporter.export import export_checkpoint  # imported before _SOURCE_KEY hashes the sources
from dscompile.exporter.options import ExportOptions
from dscompile.model.args import ModelArgs

BENCH_SEED = 0
# The folders of the code that makes an engine (the stages from checkpoint to OUT and the op set they target);
# the verification, the command line and the bench measure or drive engines and are not hashed.
COMPILER_FOLDERS = ("model", "capture", "passes", "lowering", "exporter", "runtime")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


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


def _hash_sources() -> str:
    """Hash of the compiler's sources: every module of the product's folders but the measuring ones."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for folder in COMPILER_FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


# The compiler's sources as imported with this module: an engine exported by other code is not reused
_SOURCE_KEY = _hash_sources()


def checkpoint_key(checkpoint: Path) -> str:
    """Identity of a checkpoint folder: its path, config and weight files' names, sizes and times."""
    h = hashlib.sha256(str(checkpoint.resolve()).encode())
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def engine_dir(checkpoint: Path, home: Path, options: ExportOptions) -> Path:
    """Where the engine of (checkpoint, export options, compiler sources) is cached."""
    opts = "-".join(f"{k}={v}" for k, v in sorted(dataclasses.asdict(options).items()))
    key = hashlib.sha256(f"{checkpoint_key(checkpoint)}|{opts}".encode()).hexdigest()[:12]
    return home / "bench" / "engines" / f"{checkpoint.name}-{key}-{_SOURCE_KEY}"


def cached_export(checkpoint: Path, home: Path, options: dict[str, Any], progress: Progress | None = None) -> Path:
    """Export (once) and return the engine folder for these ExportOptions fields (the others: their defaults).

    Engines of the same checkpoint and options exported by other sources are deleted first (a
    bench-config engine is several GB).
    """
    export_options = ExportOptions(**options, force=True)
    out = engine_dir(checkpoint, home, export_options)
    if not (out / "manifest.json").is_file():
        stem = out.name.rsplit("-", 1)[0]
        for stale in out.parent.glob(f"{stem}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        export_checkpoint(checkpoint, out, export_options, progress=progress)
    return out
