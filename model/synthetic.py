"""Tiny deterministic checkpoints in the real Hugging Face layout, for tests, demos and benchmarks.

`make_checkpoint` writes config.json + safetensors exactly as published checkpoints are laid
out (per-expert tensors; optionally transformers 5.x's stacked experts, FP8 block-scaled weights,
several shards with an index), so everything downstream runs the real loading code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from dscompile.model.args import ModelArgs
from dscompile.model.checkpoint import build_model
from dscompile.model.demo_tokenizer import BOS_ID as DEMO_BOS_ID
from dscompile.model.demo_tokenizer import EOS_ID as DEMO_EOS_ID
from dscompile.model.demo_tokenizer import MIN_VOCAB, write_demo_tokenizer
from dscompile.errors import OptionError

VARIANTS = ("v2", "v2-lite", "v3")
LAYOUTS = ("published", "stacked")


def tiny_args(
    variant: str = "v3",
    *,
    layers: int = 2,
    experts: int = 8,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 256,
    yarn: bool = True,
) -> ModelArgs:
    """A small config of the given family: every code path of the full model, a few MB of weights."""
    if variant not in VARIANTS:
        raise OptionError(f"--variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if layers < 1 or experts < 2 or hidden < 8 or heads < 1 or vocab < 2:
        raise OptionError("--layers >= 1, --experts >= 2, --hidden >= 8, --heads >= 1 and --vocab >= 2 are required")
    groups = 4 if experts % 4 == 0 and experts >= 8 else 1
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=experts,
        moe_intermediate_size=32,
        first_k_dense_replace=1 if layers > 1 else 0,
        max_position_embeddings=4096,
    )
    if yarn:  # YaRN as published (factor 40), over a short original context so tests reach the ramp
        common.update(rope_type="yarn", rope_factor=40.0, rope_original_max_position_embeddings=256,
                      max_position_embeddings=256 * 40,
                      rope_mscale=1.0 if variant == "v3" else 0.707, rope_mscale_all_dim=1.0 if variant == "v3" else 0.707)
    if variant == "v3":
        return ModelArgs(model_type="deepseek_v3", q_lora_rank=48, num_experts_per_tok=min(2, experts),
                         n_shared_experts=1, topk_method="noaux_tc", n_group=groups if experts // groups >= 2 else 1,
                         topk_group=max(1, groups // 2), routed_scaling_factor=2.5, norm_topk_prob=True,
                         scoring_func="sigmoid", rope_interleave=True, **common)
    if variant == "v2":
        return ModelArgs(model_type="deepseek_v2", q_lora_rank=48, num_experts_per_tok=min(2, experts),
                         n_shared_experts=2, topk_method="group_limited_greedy" if groups > 1 else "greedy",
                         n_group=groups, topk_group=max(1, groups // 2), routed_scaling_factor=2.0,
                         norm_topk_prob=False, scoring_func="softmax", **common)
    return ModelArgs(model_type="deepseek_v2", q_lora_rank=None, num_experts_per_tok=min(2, experts),
                     n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                     norm_topk_prob=False, scoring_func="softmax", **common)


def random_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in our parameter names (fp32), scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model(args, torch.float32, "meta")
    state: dict[str, torch.Tensor] = {}
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq"):
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(p.shape, generator=gen)
        elif name == "embed_tokens.weight":
            t = torch.randn(p.shape, generator=gen)
        else:
            t = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        state[name] = t.contiguous()
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def to_hf_tensors(args: ModelArgs, state: dict[str, torch.Tensor], layout: str = "published") -> dict[str, torch.Tensor]:
    """Our names -> checkpoint names, with experts unstacked (published) or gate/up fused (stacked)."""
    if layout not in LAYOUTS:
        raise OptionError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        hf = name if name == "lm_head.weight" else f"model.{name}"
        if ".mlp.experts." not in name:
            out[hf] = t
            continue
        prefix, proj = hf.rsplit(".", 1)
        if layout == "published":
            for j in range(t.shape[0]):
                out[f"{prefix}.{j}.{proj}.weight"] = t[j].contiguous()
        elif proj == "gate_proj":
            out[f"{prefix}.gate_up_proj"] = torch.cat([t, state[name.replace("gate_proj", "up_proj")]], dim=1)
        elif proj == "down_proj":
            out[f"{prefix}.down_proj"] = t
    return out


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled float8_e4m3fn, DeepSeek-V3's published format: (fp8 weight, scale_inv per block)."""
    rows, cols = weight.shape
    nb0, nb1 = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(nb0 * block[0], nb1 * block[1])
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(nb0, block[0], nb1, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale_inv[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.float()


def write_checkpoint(
    out_dir: str | Path,
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    *,
    layout: str = "published",
    shards: int = 1,
    fp8: bool = False,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = False,
) -> Path:
    """Write config.json + safetensors (one file, or `shards` files and an index) into out_dir.

    `tokenizer` also writes the demo tokenizer (model/demo_tokenizer.py: tokenizer.json,
    tokenizer_config.json with a chat template, generation_config.json), and config.json names
    its bos and eos ids. The folder is written beside its destination and renamed at the end: an
    interrupted write leaves no half checkpoint.
    """
    out_dir = Path(out_dir)
    if shards < 1:
        raise OptionError(f"--shards must be >= 1, got {shards}")
    if fp8:
        args = replace(args, fp8_block_size=(128, 128))
    tensors = {k: v.to(dtype) for k, v in to_hf_tensors(args, state, layout).items()}
    if fp8:
        for name in [n for n in tensors if _fp8_eligible(n, tensors[n])]:
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name], args.fp8_block_size)
    config = args.to_config()
    with _published(out_dir) as tmp:
        if tokenizer:
            write_demo_tokenizer(tmp, args.vocab_size)
            config.update(bos_token_id=DEMO_BOS_ID, eos_token_id=DEMO_EOS_ID)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        names = sorted(tensors)
        if shards == 1:
            save_file({n: tensors[n] for n in names}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            per = math.ceil(len(names) / shards)
            weight_map = {}
            for i in range(shards):
                part = names[i * per : (i + 1) * per]
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                save_file({n: tensors[n] for n in part}, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in part})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


@contextlib.contextmanager
def _published(out_dir: Path) -> Iterator[Path]:
    """A temp folder beside `out_dir` that replaces it when the block ends, and is removed if it fails."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3 quantizes the linear layers' weights; embeddings, norms, router and lm_head stay."""
    if t.dim() != 2 or not name.endswith(".weight"):
        return False
    return not any(k in name for k in ("embed_tokens", "norm", "lm_head", "mlp.gate.weight"))


def make_checkpoint(
    out_dir: str | Path,
    variant: str = "v3",
    *,
    layers: int = 2,
    experts: int = 8,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 512,
    seed: int = 0,
    layout: str = "published",
    shards: int = 1,
    fp8: bool = False,
    yarn: bool = True,
    tokenizer: bool | None = None,
) -> Path:
    """Generate and write a random checkpoint of the given family (deterministic for a seed).

    `tokenizer` (default: when the vocabulary holds one, `vocab >= MIN_VOCAB`) writes the demo
    tokenizer and chat template beside the weights.
    """
    args = tiny_args(variant, layers=layers, experts=experts, hidden=hidden, heads=heads, vocab=vocab, yarn=yarn)
    tokenizer = vocab >= MIN_VOCAB if tokenizer is None else tokenizer
    return write_checkpoint(out_dir, args, random_state(args, seed), layout=layout, shards=shards, fp8=fp8,
                            tokenizer=tokenizer)


def write_streamed_checkpoint(
    out_dir: str | Path,
    args: ModelArgs,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 4 << 30,
    progress=None,
) -> Path:
    """A random checkpoint of any size (a published config's), written one shard at a time.

    Unlike `make_checkpoint`, no state dict of the whole model is built: each tensor is generated
    on its own (seeded by `seed` and its name, so the same arguments give the same bytes), in the
    published per-expert layout, and shards of about `shard_bytes` are written with an index as
    they fill. Peak memory is one shard plus the largest tensor in float32. Values are scaled as in
    `random_state`. `progress(done_bytes, total_bytes)` is called after each shard.
    """
    out_dir = Path(out_dir)
    model = build_model(args, torch.float32, "meta")
    shapes: list[tuple[str, tuple[int, ...], str]] = []  # (checkpoint name, shape, kind)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq") or (args.tie_word_embeddings and name == "lm_head.weight"):
            continue
        kind = ("norm" if name.endswith("norm.weight") or name.endswith("layernorm.weight") else
                "bias" if name.endswith("e_score_correction_bias") else
                "embed" if name == "embed_tokens.weight" else "linear")
        hf = name if name == "lm_head.weight" else f"model.{name}"
        if ".mlp.experts." in name:
            prefix, proj = hf.rsplit(".", 1)
            shapes += [(f"{prefix}.{j}.{proj}.weight", tuple(p.shape[1:]), kind) for j in range(p.shape[0])]
        else:
            shapes.append((hf, tuple(p.shape), kind))
    elt = torch.empty((), dtype=dtype).element_size()
    total = sum(math.prod(s) * (4 if k == "bias" else elt) for _, s, k in shapes)
    with _published(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(args.to_config(), indent=2, sort_keys=True) + "\n")
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        size = done = 0
        files: list[str] = []

        def flush() -> None:
            nonlocal shard, size, done
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({n: fname for n in shard})
            done += size
            shard, size = {}, 0
            if progress is not None:
                progress(done, total)

        for name, shape, kind in shapes:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            t = torch.randn(shape, generator=gen)
            if kind == "norm":
                t = 1.0 + 0.1 * t
            elif kind == "bias":
                t = 0.1 * t
            elif kind == "linear":
                t /= math.sqrt(shape[-1])
            t = t if kind == "bias" else t.to(dtype)
            shard[name] = t.contiguous()
            size += t.numel() * t.element_size()
            if size >= shard_bytes:
                flush()
        if shard:
            flush()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir
