"""Bandwidth floors: the bytes a prefill or decode step must read, and its time at a given bandwidth.

A decode step of B tokens reads the weights of its active path (attention, dense MLPs, router,
shared experts, the routed experts the B tokens choose, final norm, lm_head, B embedding rows)
and the latent cache; its floor is those bytes over the read bandwidth. A prefill's floor is the
larger of its weight bytes over the bandwidth and its matmul FLOPs over the GEMM rate.

Shape legend: B batch, S new tokens, P past tokens (the context), L layers, H heads, D hidden,
C kv_lora_rank, R rope dim, E routed experts, K active experts, I intermediate sizes, V vocab.
"""

from __future__ import annotations

from dscompile.model.args import ModelArgs

# Parts a quantized engine keeps in float32 (lowering/quantize.py): the router, the embedding rows
# it looks up; every other part is read at the scheme's bits per weight (scales included), except
# the absorbed per-head MLA matrices of a decode step (`_absorbed_params`).
_FLOAT_PARTS = ("router", "embeddings")


def _attention_params(a: ModelArgs) -> int:
    """Parameters of one MLA block's attention and its two RMSNorms."""
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
    return {
        "attention": L * _attention_params(a),
        "dense_mlp": (L - len(moe)) * 3 * D * a.intermediate_size,
        "router": len(moe) * a.n_routed_experts * D if moe else 0,
        "shared_experts": len(moe) * a.n_shared_experts * expert if moe else 0,
        "routed_experts": len(moe) * experts_read(a, batch) * expert if moe else 0.0,
        "lm_head": a.vocab_size * D + D,
        "embeddings": batch * D,
    }


NATIVE_ABSORBED_BYTES = 1 + 4 / 32  # runtime/native's HeadsMatMulQ8: int8 and a float32 scale per 32 values


def _absorbed_params(a: ModelArgs) -> int:
    """kv_b_proj's parameters: a decode step over the latent cache reads them as float32 W_UK/W_UV."""
    return a.num_hidden_layers * a.kv_lora_rank * a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim)


def step_weight_bytes(a: ModelArgs, batch: int, elt: int, bits_per_weight: float | None = None,
                      absorbed: bool = True, head_bits_per_weight: float | None = None,
                      absorbed_bytes: float = 4.0) -> float:
    """Bytes of weights one step of B tokens reads: every parameter at `elt` bytes, or for a quantized
    engine (`bits_per_weight`) the quantized parts at that rate (lm_head at `head_bits_per_weight`
    where it differs) and the float32 ones at 4 bytes; the absorbed W_UK/W_UV at `absorbed_bytes`
    per value (float32, or NATIVE_ABSORBED_BYTES with --native-kernels)."""
    params = step_weight_params(a, batch)
    if bits_per_weight is None:
        return sum(params.values()) * elt
    q = bits_per_weight / 8
    rate = {k: 4 if k in _FLOAT_PARTS else q for k in params}
    if head_bits_per_weight is not None:
        rate["lm_head"] = head_bits_per_weight / 8
    total = sum(v * rate[k] for k, v in params.items())
    if absorbed:  # kv_b_proj read as absorbed matrices (float32, or the native kernel's int8) instead of quantized
        total += _absorbed_params(a) * (absorbed_bytes - q)
    return total


def decode_floor(a: ModelArgs, batch: int, context: int, elt: int, bandwidth: float,
                 bits_per_weight: float | None = None, head_bits_per_weight: float | None = None,
                 absorbed_bytes: float = 4.0) -> dict[str, float]:
    """Bytes one decode step reads (weights of the active path + the latent cache) and the time at `bandwidth`.

    With `bits_per_weight` (a quantized engine) its weights count at that rate (step_weight_bytes);
    the cache stays at `elt` bytes a value.
    """
    weights = step_weight_bytes(a, batch, elt, bits_per_weight, head_bits_per_weight=head_bits_per_weight,
                                absorbed_bytes=absorbed_bytes)
    cache = batch * context * a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * elt
    total = weights + cache
    return {"weight_bytes": weights, "cache_bytes": cache, "bytes": total, "ms": 1e3 * total / bandwidth}


def prefill_floor(a: ModelArgs, batch: int, tokens: int, elt: int, bandwidth: float, flops: float,
                  bits_per_weight: float | None = None, head_bits_per_weight: float | None = None) -> dict[str, float]:
    """max(all weights read once / bandwidth, matmul FLOPs / GEMM rate) for a prompt of B x S tokens."""
    n = batch * tokens
    # n tokens: (nearly) every expert is read; prefill runs kv_b_proj itself (not absorbed)
    weights = step_weight_bytes(a, n, elt, bits_per_weight, absorbed=False, head_bits_per_weight=head_bits_per_weight)
    active = sum(step_weight_params(a, 1).values()) - a.hidden_size  # per token, embeddings are a lookup
    H = a.num_attention_heads
    attn = a.num_hidden_layers * batch * H * tokens * tokens * (a.qk_head_dim + a.v_head_dim)  # causal half of 2*S*T*d
    work = 2.0 * n * active + 2.0 * attn
    return {"weight_bytes": weights, "flops": work, "bytes": weights,
            "ms": 1e3 * max(weights / bandwidth, work / flops)}
