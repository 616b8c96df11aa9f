"""`dsc::latent_attention`: MLA attention in latent space (the absorbed decode form).

All heads attend to one shared key [kv_latent; k_rope] (C+R values per token) and one shared
value kv_latent (C values per token), so this is multi-query attention over the MLA cache:

    scores[b,h,s,t] = (q_latent[b,h,s]·kv_latent[b,t] + q_rope[b,h,s]·k_rope[b,t]) * scale + mask
    out[b,h,s]      = softmax_t(scores[b,h,s]) @ kv_latent[b]          (softmax in float32)

The reference below is the definition. On CUDA the op runs the split-K flash-decoding Triton
kernel in `triton_kernels.py` when Triton is importable.

Shapes: B batch, S new tokens, T keys (past + new), H heads, C kv_lora_rank, R rope dim.
"""

import torch
from torch import Tensor

from dscompile.runtime.ops.kernels import triton_kernels


def _check_ranks(q_latent: Tensor, q_rope: Tensor, kv_latent: Tensor, k_rope: Tensor,
                 mask: Tensor) -> None:
    # Ranks only: comparing symbolic sizes here would add guards to exported graphs.
    for name, t, rank in (("q_latent", q_latent, 4), ("q_rope", q_rope, 4),
                          ("kv_latent", kv_latent, 3), ("k_rope", k_rope, 3), ("mask", mask, 4)):
        if t.dim() != rank:
            raise ValueError(f"latent_attention: {name} must have {rank} dims, got shape "
                             f"{tuple(t.shape)}")


def check_latent_attention_args(q_latent: Tensor, q_rope: Tensor, kv_latent: Tensor,
                                k_rope: Tensor, mask: Tensor) -> None:
    """Raises ValueError naming the first tensor whose shape does not fit the others."""
    _check_ranks(q_latent, q_rope, kv_latent, k_rope, mask)
    B, H, S, C = q_latent.shape
    T, R = kv_latent.shape[1], k_rope.shape[-1]
    expected = {
        "q_rope": (q_rope, (B, H, S, R)),
        "kv_latent": (kv_latent, (B, T, C)),
        "k_rope": (k_rope, (B, T, R)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"latent_attention: {name} has shape {tuple(t.shape)}, expected "
                             f"{shape} from q_latent {tuple(q_latent.shape)} and kv_latent "
                             f"{tuple(kv_latent.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, (B, H, S, T))
    except RuntimeError:
        raise ValueError(f"latent_attention: mask of shape {tuple(mask.shape)} does not "
                         f"broadcast to [B, H, S, T] = {(B, H, S, T)}") from None


def latent_attention_reference(q_latent: Tensor, q_rope: Tensor, kv_latent: Tensor,
                               k_rope: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The op's definition in plain torch, float32 throughout; returns q_latent's dtype."""
    check_latent_attention_args(q_latent, q_rope, kv_latent, k_rope, mask)
    kv = kv_latent.float()
    scores = (torch.einsum("bhsc,btc->bhst", q_latent.float(), kv)
              + torch.einsum("bhsr,btr->bhst", q_rope.float(), k_rope.float()))
    scores = scores * scale + mask.float()
    # A row whose every score is -inf would give 0/0; a finite max keeps it at exp(-inf) = 0,
    # and the clamped denominator then yields zeros instead of NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.einsum("bhst,btc->bhsc", p, kv)
    return out.to(q_latent.dtype)


@torch.library.custom_op("dsc::latent_attention", mutates_args=())
def latent_attention(q_latent: Tensor, q_rope: Tensor, kv_latent: Tensor, k_rope: Tensor,
                     mask: Tensor, scale: float) -> Tensor:
    """MLA latent-space attention: [B,H,S,C] queries against the shared [B,T,C+R] cache."""
    return latent_attention_reference(q_latent, q_rope, kv_latent, k_rope, mask, scale)


@latent_attention.register_fake
def _latent_attention_fake(q_latent, q_rope, kv_latent, k_rope, mask, scale):
    _check_ranks(q_latent, q_rope, kv_latent, k_rope, mask)
    return q_latent.new_empty(q_latent.shape)


@latent_attention.register_kernel("cuda")
def _latent_attention_cuda(q_latent, q_rope, kv_latent, k_rope, mask, scale):
    kernels = triton_kernels("latent_attention")
    if kernels is None:  # without Triton the op still runs its definition (counted and warned: ops/kernels.py)
        return latent_attention_reference(q_latent, q_rope, kv_latent, k_rope, mask, scale)
    check_latent_attention_args(q_latent, q_rope, kv_latent, k_rope, mask)
    return kernels.triton_latent_attention(q_latent, q_rope, kv_latent, k_rope, mask, scale)
