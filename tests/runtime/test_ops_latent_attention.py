"""dsc::latent_attention: reference vs an explicit dense attention, fake impl under export, errors.

Shapes: B batch, S new tokens, T keys (past + new), H heads, C kv_lora_rank, R rope dim.
"""

import pytest
import torch

import dscompile.runtime.ops  # noqa: F401  (registers the dsc ops)
from dscompile.runtime.ops.latent_attention import latent_attention_reference
from helpers import assert_op_close as assert_close




def make_inputs(B, H, S, T, C, R, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, C, generator=g).to(dtype)
    qr = torch.randn(B, H, S, R, generator=g).to(dtype)
    kv = torch.randn(B, T, C, generator=g).to(dtype)
    kr = torch.randn(B, T, R, generator=g).to(dtype)
    return q, qr, kv, kr


def causal_mask(B, S, T, dtype=torch.float32, fully_masked=()):
    """[B, 1, S, T]: query s sits at position T-S+s; rows in fully_masked as (b, s) see nothing."""
    t = torch.arange(T)
    pos = T - S + torch.arange(S)
    allowed = (t[None, :] <= pos[:, None]).expand(B, 1, S, T).clone()
    for b, s in fully_masked:
        allowed[b, 0, s] = False
    mask = torch.zeros(B, 1, S, T, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def dense_attention(q, qr, kv, kr, mask, scale):
    """Plain MQA: every head's query [q; q_rope] against key [kv; k_rope], value kv, in fp32."""
    B, H, S, C = q.shape
    query = torch.cat([q, qr], dim=-1).float()                       # [B, H, S, C+R]
    key = torch.cat([kv, kr], dim=-1).float()[:, None]               # [B, 1, T, C+R]
    value = kv.float()[:, None]                                      # [B, 1, T, C]
    scores = query @ key.transpose(-1, -2) * scale + mask.float()    # [B, H, S, T]
    return scores.softmax(dim=-1) @ value


SHAPES = [
    # B, H, S, T, C, R, fully masked (b, s) rows
    pytest.param(1, 1, 1, 1, 8, 4, (), id="one-key"),
    pytest.param(2, 4, 1, 37, 24, 8, (), id="decode-odd-T"),
    pytest.param(3, 3, 5, 17, 12, 6, ((1, 0), (2, 4)), id="prefill-causal-fully-masked"),
    pytest.param(2, 16, 2, 70, 40, 12, ((0, 1),), id="many-heads"),
]


@pytest.mark.parametrize("B,H,S,T,C,R,fully", SHAPES)
def test_reference_matches_dense(B, H, S, T, C, R, fully):
    q, qr, kv, kr = make_inputs(B, H, S, T, C, R)
    mask = causal_mask(B, S, T, fully_masked=fully)
    scale = (C + R) ** -0.5
    out = torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, scale)
    assert out.shape == (B, H, S, C) and out.dtype == torch.float32
    assert_close(out, dense_attention(q, qr, kv, kr, mask, scale), torch.float32,
                 f"latent_attention {(B, H, S, T, C, R)}")


def test_reference_bf16():
    q, qr, kv, kr = make_inputs(2, 8, 3, 45, 32, 16, dtype=torch.bfloat16)
    mask = causal_mask(2, 3, 45, dtype=torch.bfloat16, fully_masked=((1, 2),))
    out = torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, 0.125)
    assert out.dtype == torch.bfloat16
    assert_close(out, dense_attention(q, qr, kv, kr, mask, 0.125), torch.bfloat16,
                 "latent_attention bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_are_finite(dtype):
    q, qr, kv, kr = make_inputs(2, 2, 1, 9, 8, 4, dtype=dtype)
    mask = torch.full((2, 1, 1, 9), torch.finfo(dtype).min, dtype=dtype)
    out = torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, 1.0)
    assert torch.isfinite(out).all()
    # The finite mask swamps every score equally, so the row averages the values uniformly.
    uniform = kv.float().mean(dim=1)[:, None, None, :].expand(2, 2, 1, 8)
    assert_close(out, uniform, dtype, "fully masked row")


def test_reference_handles_minus_inf_mask_without_nan():
    q, qr, kv, kr = make_inputs(1, 2, 1, 5, 8, 4)
    mask = torch.full((1, 1, 1, 5), float("-inf"))
    out = latent_attention_reference(q, qr, kv, kr, mask, 1.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_mask_broadcasts_per_head():
    q, qr, kv, kr = make_inputs(1, 3, 2, 6, 8, 4)
    mask = torch.randn(1, 3, 2, 6)                                   # a different mask per head
    out = torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, 0.3)
    assert_close(out, dense_attention(q, qr, kv, kr, mask, 0.3), torch.float32, "per-head mask")


class _Attend(torch.nn.Module):
    def forward(self, q, qr, kv, kr, mask):
        return torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, 0.25)


def test_fake_impl_exports_with_dynamic_dims():
    B, T = torch.export.Dim("B", max=64), torch.export.Dim("T", max=4096)
    args = (*make_inputs(2, 4, 1, 9, 16, 8), causal_mask(2, 1, 9))
    dynamic = ({0: B}, {0: B}, {0: B, 1: T}, {0: B, 1: T}, {0: B, 3: T})
    ep = torch.export.export(_Attend(), args, dynamic_shapes=dynamic)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert "dsc.latent_attention.default" in targets, targets
    other = (*make_inputs(3, 4, 1, 20, 16, 8, seed=1), causal_mask(3, 1, 20))
    assert_close(ep.module()(*other), _Attend()(*other), torch.float32, "exported program")


@pytest.mark.parametrize("bad,name", [
    ("q_rope", "q_rope"), ("kv_latent_rank", "kv_latent"), ("k_rope", "k_rope"), ("mask", "mask"),
])
def test_invalid_shapes_name_the_tensor(bad, name):
    q, qr, kv, kr = make_inputs(2, 4, 1, 9, 16, 8)
    mask = causal_mask(2, 1, 9)
    if bad == "q_rope":
        qr = qr[..., :5]
    elif bad == "kv_latent_rank":
        kv = kv[0]
    elif bad == "k_rope":
        kr = kr[:, :4]
    else:
        mask = mask[..., :4]
    with pytest.raises(ValueError, match=name):
        torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, 1.0)
