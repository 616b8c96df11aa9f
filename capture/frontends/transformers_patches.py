"""Every change that capturing transformers' DeepSeek model needs, each undone on exit.

`export_patches(model)` applies the two patches for one capture:

- `real_valued_rope(model)`: DeepSeek-V2's rotary embedding in real numbers. transformers builds
  complex frequencies (torch.polar) and rotates q and k through view_as_complex, and neither the
  ONNX exporter nor our lowering handles complex tensors. The rewrite applies the same rotation to
  the same interleaved pairs (a, b) -> (a·cos - b·sin, a·sin + b·cos), read with two strided slices
  and written back interleaved, so the cache and the logits are those of transformers' code (to
  float rounding). DeepSeek-V3's RoPE is real already and is left alone.
- `export_implementations(model)`: selects transformers' own export-friendly implementations through
  its public setters. Experts: "batched_mm" gathers each token's K expert matrices and multiplies
  them with one bmm, so its shapes are static. The default "grouped_mm" is traced as transformers'
  custom op `transformers::grouped_mm_fallback` (float32 or CPU; `aten._grouped_mm` in bf16 on
  CUDA) behind a token sort (sort, histc, cumsum), with no ONNX translation. "eager" loops over
  the experts that were hit and fails the trace on a data-dependent guard. Attention: "sdpa" (also
  transformers' default), so each layer's attention is one `aten.scaled_dot_product_attention`
  node, as in our model's capture.

`prefilled_cache(config, past)` is the one piece of transformers' internals this frontend relies on:
it builds the DynamicCache the contract's past enters (see its docstring for why `update` is not
used).

Two things that are not patches of transformers' code, done by the contract module
(frontends/transformers.py) and by a pass:
- the mask: transformers takes a prepared 4D mask as it is, so the contract passes the causal +
  padding mask of the contract (model/transformer.py `causal_mask`). transformers' own mask builder
  indexes the padding mask by cache positions, which the in-place decode graph (cache buffers with
  spare rows) would read out of range; with a mask given, its SDPA call keeps `is_causal` False.
- the cache append: transformers appends to its [B, 1, P, *] view of the past; the pass
  passes/squeeze_cache_append.py (the first of the pipeline) rewrites each append as the same values
  concatenated on the contract's [B, P, *] past, the form the in-place decode graph rewrites.

Shape legend: B batch, S new tokens, P past tokens, T = P + S, H heads, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch
from torch import nn

EXPORT_ATTENTION = "sdpa"
EXPORT_EXPERTS = "batched_mm"


def _modeling_module(model: nn.Module):
    """The transformers module that defines the model's classes (modeling_deepseek_v2 or _v3)."""
    return sys.modules[type(model).__module__]


@contextlib.contextmanager
def real_valued_rope(model: nn.Module) -> Iterator[bool]:
    """DeepSeek-V2's complex RoPE computed in real numbers (same numbers). Yields whether it applied.

    The model's rotary module returns [cos, sin] [B, 1, S, R] (cos and sin of the R/2 angles, times
    transformers' attention scaling, ready to broadcast over heads) instead of complex frequencies
    [B, S, R/2]. The modeling module's `apply_rotary_emb` rotates the interleaved pairs of
    q [B, H, S, R] and k [B, 1, S, R] with them (read as strided slices, written back interleaved).
    A complex input (from a model outside this context) still goes through transformers' own
    function.
    """
    module = _modeling_module(model)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    original = getattr(module, "apply_rotary_emb", None)
    if rotary is None or original is None:  # DeepSeek-V3: cos/sin already
        yield False
        return
    if rotary.rope_type not in ("default", "yarn"):  # dynamic types recompute inv_freq in forward
        raise NotImplementedError(f"real-valued RoPE: rope type {rotary.rope_type!r} is not rewritten")

    def rope(x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        inv_freq = rotary.inv_freq.to(device=x.device, dtype=torch.float)  # as transformers' forward
        angles = position_ids[:, None, :, None].float() * inv_freq  # [B, 1, S, R/2]
        return torch.cat((angles.cos(), angles.sin()), dim=-1) * rotary.attention_scaling  # [B, 1, S, R]

    def apply(xq: torch.Tensor, xk: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cos_sin.is_complex():
            return original(xq, xk, cos_sin)
        cos, sin = cos_sin.chunk(2, dim=-1)  # [B, 1, S, R/2] each

        def rotate(x: torch.Tensor) -> torch.Tensor:
            a, b = x[..., 0::2].float(), x[..., 1::2].float()  # the (re, im) of each pair
            rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)  # [..., R/2, 2]
            return rotated.flatten(-2).type_as(x)

        return rotate(xq), rotate(xk)

    rotary.forward = rope  # an instance attribute shadows the class's method, for this model only
    module.apply_rotary_emb = apply
    try:
        yield True
    finally:
        del rotary.forward
        module.apply_rotary_emb = original


@contextlib.contextmanager
def export_implementations(model: nn.Module, attention: str = EXPORT_ATTENTION,
                           experts: str = EXPORT_EXPERTS) -> Iterator[None]:
    """The model's attention and experts implementations set through transformers' public setters;
    the ones it had are set back on exit."""
    config = model.config
    saved_attention = config._attn_implementation
    saved_experts = getattr(config, "_experts_implementation", None)
    model.set_attn_implementation(attention)
    model.set_experts_implementation(experts)
    try:
        yield
    finally:
        model.set_attn_implementation(saved_attention)
        if saved_experts is not None:
            model.set_experts_implementation(saved_experts)


@contextlib.contextmanager
def export_patches(model: nn.Module) -> Iterator[None]:
    """All the patches above, for one capture of `model`."""
    with export_implementations(model), real_valued_rope(model):
        yield


def prefilled_cache(config, past: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers DynamicCache that holds `past`: per layer (latent [B, 1, P, C], k_rope [B, 1, P, R]).

    Each layer is set to the state its first `update(latent, k_rope)` would leave it in (keys and
    values are the past itself, dtype and device recorded, initialized), without making that call.
    `update` would first concatenate the past to an empty `torch.tensor([])`, which torch.export
    lifts as a tensor constant (plus an in-place detach_): on the meta device a constant without
    values and without a source, which the weights writer cannot read, and one more concatenation
    per cache tensor. The model's own `update` then appends the new tokens with one concatenation,
    as our model does.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    if len(cache.layers) != len(past):
        raise ValueError(f"the cache has {len(cache.layers)} layers, the past {len(past)}")
    for layer, (keys, values) in zip(cache.layers, past):
        layer.keys, layer.values = keys, values
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.is_initialized = True
    return cache
