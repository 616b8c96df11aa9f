"""DeepSeek-V2/V3 in plain PyTorch: the eager reference every engine is checked against.

DeepSeek-V2 paper, section 2: Multi-head Latent Attention (MLA) and DeepSeekMoE. Written for
clarity and for torch.export, not for speed (the compiler makes it fast):
- positions are tensors and nothing branches on data, so one trace serves every length;
- RoPE is real-valued (no complex tensors);
- routed experts are stacked ([E, I, D], as gpt-fast stores them) and computed densely with a
  masked combine, so the traced graph has the same size for 8 experts or 256;
- the cache holds per layer and token only the normalized latent c_KV and the rotated k_rope.

Module and parameter names are the Hugging Face checkpoint names (see model/checkpoint.py).

Shape legend: B batch, S new tokens, P past tokens, T = P + S keys, D hidden, H heads,
C kv_lora_rank, R rope dim, N nope dim, V v_head dim, E routed experts, K active experts,
I expert intermediate, L tokens flattened (B*S).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dscompile.model.args import ModelArgs
from dscompile.model.routing import Routing, route

LayerCache = tuple[torch.Tensor, torch.Tensor]  # (kv_latent [B, P, C], k_rope [B, P, R])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the variance in low precision loses too much
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin [B, S, R/2] for integer positions, YaRN-scaled when the config says so."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.factor = args.rope_cos_sin_factor
        self.register_buffer("inv_freq", args.rope_inv_freq(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq  # [B, S, R/2]
        return angles.cos() * self.factor, angles.sin() * self.factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x by cos/sin (broadcast over the dims between).

    With `interleave`, pairs (x0, x1), (x2, x3) ... rotate together (DeepSeek's layout); otherwise
    the two halves do (rotate_half). The result is laid out as [rotated firsts, rotated seconds]
    either way: q and k share the layout, so their dot products are those of the original layout.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLA(nn.Module):
    """Multi-head Latent Attention, un-absorbed: keys and values are expanded from the latent cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.interleave = args.rope_interleave
        self.softmax_scale = args.softmax_scale
        dim, qk_dim = args.hidden_size, args.qk_head_dim
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: LayerCache,
    ) -> tuple[torch.Tensor, LayerCache]:
        B, S, _ = x.shape
        H = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, H, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos[:, :, None, :], sin[:, :, None, :], self.interleave)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, S, C]: what the cache stores
        k_rope = apply_rope(k_rope, cos, sin, self.interleave)  # [B, S, R], shared by all heads
        latent_all = torch.cat([past[0], latent], dim=1)  # [B, T, C]
        k_rope_all = torch.cat([past[1], k_rope], dim=1)  # [B, T, R]
        T = latent_all.shape[1]

        kv = self.kv_b_proj(latent_all).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, N+R]
        k = torch.cat([k_nope, k_rope_all[:, :, None, :].expand(B, T, H, self.rope_dim)], dim=-1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=self.softmax_scale)
        out = self.o_proj(o.transpose(1, 2).reshape(B, S, H * self.v_dim))
        return out, (latent_all, k_rope_all)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: token -> K experts and their weights, as model/routing.py defines them (in float32)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.routing = Routing.of(args)
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        if args.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [L, D] -> (weights [L, K] float32, expert ids [L, K])."""
        logits = F.linear(x.float(), self.weight.float())  # [L, E]
        return route(logits, getattr(self, "e_score_correction_bias", None), self.routing)


class Experts(nn.Module):
    """Routed experts, stacked: gate_proj/up_proj [E, I, D], down_proj [E, D, I]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, I, D = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """x [L, D], combine [L, E] (routing weight, 0 for experts not chosen) -> [L, D]."""
        h = F.silu(torch.einsum("ld,eid->lei", x, self.gate_proj)) * torch.einsum("ld,eid->lei", x, self.up_proj)
        y = torch.einsum("lei,edi->led", h, self.down_proj)
        return torch.einsum("led,le->ld", y.float(), combine).to(x.dtype)


class MoE(nn.Module):
    """DeepSeekMoE: shared experts always on, plus K of E routed experts per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Gate(args)
        self.experts = Experts(args)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [L, D]
        weights, idx = self.gate(x2)
        combine = torch.zeros(x2.shape[0], self.experts.gate_proj.shape[0], dtype=torch.float32, device=x.device)
        combine = combine.scatter(1, idx, weights)  # [L, E]
        out = self.experts(x2, combine)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x2)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos, sin, mask, past: LayerCache) -> tuple[torch.Tensor, LayerCache]:
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Transformer(nn.Module):
    """The causal LM: embeddings, blocks, final norm, lm_head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.rotary_emb = RotaryEmbedding(args)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def empty_cache(self, batch: int) -> list[LayerCache]:
        w = self.embed_tokens.weight
        a = self.args
        return [
            (w.new_zeros(batch, 0, a.kv_lora_rank), w.new_zeros(batch, 0, a.qk_rope_head_dim))
            for _ in range(a.num_hidden_layers)
        ]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        output_hidden_states: bool = False,
    ):
        """input_ids [B, S] -> (float32 logits [B, S, vocab], cache with S more tokens).

        position_ids default to P..P+S-1; attention_mask [B, P+S] (1 attend, 0 padding) defaults
        to all ones. With `output_hidden_states`, a third value lists the hidden state after each
        block (what `compare` uses to find the first diverging layer).
        """
        B, S = input_ids.shape
        if cache is None:
            cache = self.empty_cache(B)
        P = cache[0][0].shape[1]
        if position_ids is None:
            position_ids = (torch.arange(S, device=input_ids.device) + P).expand(B, S)
        if attention_mask is None:
            attention_mask = torch.ones(B, P + S, dtype=torch.int64, device=input_ids.device)
        mask = causal_mask(attention_mask, S, self.embed_tokens.weight.dtype)
        cos, sin = self.rotary_emb(position_ids)
        h = self.embed_tokens(input_ids)
        present, hidden = [], []
        for layer, past in zip(self.layers, cache):
            h, layer_cache = layer(h, cos, sin, mask, past)
            present.append(layer_cache)
            hidden.append(h)
        logits = self.lm_head(self.norm(h)).float()
        if output_hidden_states:
            return logits, present, hidden
        return logits, present


def causal_mask(attention_mask: torch.Tensor, S: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, S, T] from a padding mask [B, T]: new token i sees key j iff j <= P + i.

    Masked entries get the dtype's most negative finite value, not -inf: a left-padding row
    that sees nothing then softmaxes to a finite (ignored) value instead of NaN.
    """
    T = attention_mask.shape[1]
    key = torch.arange(T, device=attention_mask.device)
    query = torch.arange(S, device=attention_mask.device) + (T - S)
    allowed = (key[None, :] <= query[:, None])[None] & attention_mask[:, None, :].bool()  # [B, S, T]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]
