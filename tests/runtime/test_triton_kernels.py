"""Triton kernels of the dsc ops against their reference implementations.

`triton`-marked tests run the kernels on CPU tensors under TRITON_INTERPRET=1 (tiny sizes: the
interpreter runs every program in Python). `gpu`-marked tests run the compiled kernels through
the registered ops on CUDA and skip elsewhere.

Shapes: B batch, S new tokens, T keys, H heads, C kv_lora_rank, R rope dim; MoE: T tokens,
D hidden, E experts, K active experts, I expert intermediate.
"""

import os

# Set before triton is first imported, as Triton documents. The kernels module decides between
# interpreter and compiler at each launch, so the fixtures below pin the mode per test and the
# rest of the session keeps the environment it started with.
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: E402, F401
    from dscompile.runtime.ops import triton_kernels as tk  # noqa: E402
    _TRITON_MISSING = None
except ImportError as exc:      # the ops still work without Triton; only these tests cannot
    tk = None
    _TRITON_MISSING = f"triton is not importable: {exc}"
finally:
    if _PREVIOUS_INTERPRET is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

import dscompile.runtime.ops  # noqa: E402, F401  (registers the dsc ops)
from dscompile.runtime.ops import latent_attention as la_mod  # noqa: E402
from dscompile.runtime.ops import moe as moe_mod  # noqa: E402
from dscompile.model.routing import Routing, route  # noqa: E402
from helpers import assert_op_close as assert_close  # noqa: E402


needs_triton = pytest.mark.skipif(_TRITON_MISSING is not None, reason=str(_TRITON_MISSING))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---- inputs -----------------------------------------------------------------------------------

def attention_inputs(B, H, S, T, C, R, dtype=torch.float32, fully_masked=(), device="cpu",
                     seed=0):
    g = torch.Generator().manual_seed(seed)
    q, qr = torch.randn(B, H, S, C, generator=g), torch.randn(B, H, S, R, generator=g)
    kv, kr = torch.randn(B, T, C, generator=g), torch.randn(B, T, R, generator=g)
    pos = T - S + torch.arange(S)
    allowed = (torch.arange(T)[None, :] <= pos[:, None]).expand(B, 1, S, T).clone()
    for b, s in fully_masked:
        allowed[b, 0, s] = False
    mask = torch.zeros(B, 1, S, T).masked_fill(~allowed, torch.finfo(dtype).min)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, qr, kv, kr, mask))


def moe_inputs(T, D, I, E, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x2d = torch.randn(T, D, generator=g)
    w1 = torch.randn(E, I, D, generator=g) / D ** 0.5
    w3 = torch.randn(E, I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    gate_weight = torch.randn(E, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x2d, gate_weight, w1, w2, w3))


# ---- interpreter ------------------------------------------------------------------------------

ATTENTION_CASES = [
    # B, H, S, T, C, R, fully masked (b, s), block_t, num_splits
    pytest.param(1, 1, 1, 1, 8, 4, (), 16, None, id="one-key"),
    pytest.param(2, 5, 1, 37, 24, 7, (), 16, 3, id="odd-T-C-R-splits"),
    pytest.param(2, 3, 3, 21, 12, 6, ((0, 1),), 16, 2, id="causal-S3-fully-masked-splits"),
    pytest.param(1, 20, 1, 40, 16, 8, ((0, 0),), 16, 1, id="two-head-blocks-one-split"),
]


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("B,H,S,T,C,R,fully,block_t,splits", ATTENTION_CASES)
def test_latent_attention_kernel_interpreted(interpreter, B, H, S, T, C, R, fully, block_t,
                                             splits):
    q, qr, kv, kr, mask = attention_inputs(B, H, S, T, C, R, fully_masked=fully)
    scale = (C + R) ** -0.5
    out = tk.triton_latent_attention(q, qr, kv, kr, mask, scale, block_t=block_t,
                                     block_h=16, num_splits=splits)
    ref = la_mod.latent_attention_reference(q, qr, kv, kr, mask, scale)
    assert_close(out, ref, torch.float32, f"triton latent_attention {(B, H, S, T, C, R)}")


@pytest.mark.triton
@needs_triton
def test_latent_attention_kernel_interpreted_bf16(interpreter):
    q, qr, kv, kr, mask = attention_inputs(2, 4, 1, 33, 20, 8, dtype=torch.bfloat16,
                                           fully_masked=((1, 0),))
    out = tk.triton_latent_attention(q, qr, kv, kr, mask, 0.2, block_t=16, num_splits=2)
    assert out.dtype == torch.bfloat16
    ref = la_mod.latent_attention_reference(q, qr, kv, kr, mask, 0.2)
    assert_close(out, ref, torch.bfloat16, "triton latent_attention bf16")


MOE_CASES = [
    # T, D, I, E, K, block_m, block_n, block_k
    pytest.param(1, 24, 20, 8, 2, 16, 16, 16, id="one-token-idle-experts"),
    pytest.param(13, 40, 24, 6, 3, 16, 16, 16, id="odd-D-I"),
    pytest.param(40, 16, 16, 4, 2, 16, 16, 16, id="several-blocks-per-expert"),
]


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("T,D,I,E,K,block_m,block_n,block_k", MOE_CASES)
def test_moe_experts_kernel_interpreted(interpreter, T, D, I, E, K, block_m, block_n, block_k):
    x2d, gate_weight, w1, w2, w3 = moe_inputs(T, D, I, E)
    weights, idx = route(x2d @ gate_weight.t(), None, Routing(K, 1, 1, "greedy", False, 1.7))
    out = tk.triton_moe_experts(x2d, w1, w2, w3, weights, idx, block_m=block_m,
                                block_n=block_n, block_k=block_k)
    ref = moe_mod.moe_experts_reference(x2d, w1, w2, w3, weights, idx)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    assert_close(out, ref, torch.float32, f"triton moe experts T={T}")


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_with_kernel_matches_op(interpreter, dtype):
    # The composition the CUDA kernel registers: torch routing + Triton experts + shared MLP.
    x2d, gate_weight, w1, w2, w3 = moe_inputs(9, 32, 16, 8, dtype=dtype)
    bias = torch.randn(8) * 0.1
    sw1, sw3 = w1[0] * 0.5, w3[1] * 0.5
    sw2 = w2[2] * 0.5
    x = x2d.view(3, 3, 32)
    args = (gate_weight, bias, w1, w2, w3, sw1, sw2, sw3, 3, 4, 2, "noaux_tc", True, 2.5)
    out = moe_mod.moe_reference(x, *args, experts=tk.triton_moe_experts)
    ref = torch.ops.dsc.moe(x, *args)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref, dtype, f"moe layer with Triton experts {dtype}")


@pytest.mark.triton
@needs_triton
def test_moe_shard_layer_with_kernel_matches_op(interpreter):
    # The sharded op's CUDA composition: one rank's experts (4 of 8, from expert 4) through the Triton kernel.
    x2d, gate_weight, w1, w2, w3 = moe_inputs(9, 32, 16, 8)
    x = x2d.view(3, 3, 32)
    tail = (None, None, None, 3, 4, 2, "group_limited_greedy", False, 2.0)
    out = moe_mod.moe_reference(x, gate_weight, None, w1[4:], w2[4:], w3[4:], *tail,
                                experts=moe_mod.local_experts(tk.triton_moe_experts, 4))
    ref = torch.ops.dsc.moe_shard(x, gate_weight, None, w1[4:], w2[4:], w3[4:], *tail, torch.tensor(4))
    assert_close(out, ref, torch.float32, "moe_shard with Triton experts")
    assert out.abs().max() > 0  # some tokens chose the experts held here


@pytest.mark.triton
@needs_triton
def test_align_by_expert_layout():
    idx = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1]])
    sorted_ids, expert_of_block, num_padded = tk.align_by_expert(idx, num_experts=5, block_m=4)
    n = idx.numel()
    used = int(num_padded)
    assert used == 4 * 4                      # experts 0, 1, 2, 3 each fill one padded block
    rows = sorted_ids[:used].view(-1, 4)
    for block, e in zip(rows, expert_of_block[: used // 4].tolist()):
        real = block[block < n]
        assert (idx.flatten()[real] == e).all()
    assert sorted(sorted_ids[sorted_ids < n].tolist()) == list(range(n))


@pytest.mark.triton
@needs_triton
def test_kernels_really_run_under_interpreter(interpreter, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path must not call the reference")

    monkeypatch.setattr(la_mod, "latent_attention_reference", refuse)
    monkeypatch.setattr(moe_mod, "moe_experts_reference", refuse)
    tk._JITTED.clear()
    q, qr, kv, kr, mask = attention_inputs(1, 2, 1, 20, 8, 4)
    attn = tk.triton_latent_attention(q, qr, kv, kr, mask, 0.5, block_t=16, num_splits=2)
    x2d, gate_weight, w1, w2, w3 = moe_inputs(3, 16, 16, 4)
    weights, idx = route(x2d @ gate_weight.t(), None, Routing(2, 1, 1, "greedy", False, 1.0))
    experts = tk.triton_moe_experts(x2d, w1, w2, w3, weights, idx, block_n=16, block_k=16)
    assert torch.isfinite(attn).all() and attn.abs().sum() > 0
    assert torch.isfinite(experts).all() and experts.abs().sum() > 0
    # Every kernel was jitted for the interpreter, none for the compiler.
    assert {interp for (_, interp) in tk._JITTED} == {True} and len(tk._JITTED) == 4


@pytest.mark.triton
@needs_triton
def test_cpu_tensors_without_interpreter_are_refused(compiled):
    q, qr, kv, kr, mask = attention_inputs(1, 2, 1, 4, 8, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tk.triton_latent_attention(q, qr, kv, kr, mask, 1.0)


# ---- CUDA -------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,T", [(1, 1, 1), (4, 1, 1000), (3, 2, 4099)])
def test_latent_attention_op_on_cuda(compiled, dtype, B, S, T):
    H, C, R = 16, 512, 64
    inputs = attention_inputs(B, H, S, T, C, R, dtype=dtype, fully_masked=((0, 0),),
                              device="cuda")
    out = torch.ops.dsc.latent_attention(*inputs, (C + R) ** -0.5)
    torch.cuda.synchronize()
    ref = la_mod.latent_attention_reference(*inputs, (C + R) ** -0.5)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"cuda latent_attention {dtype} B={B} S={S} T={T}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_moe_op_on_cuda(compiled, dtype, T):
    x2d, gate_weight, w1, w2, w3 = moe_inputs(T, 256, 128, 16, dtype=dtype, device="cuda")
    bias = torch.randn(16, device="cuda") * 0.1
    shared = (w1[0] * 0.5, w2[1] * 0.5, w3[2] * 0.5)
    args = (gate_weight, bias, w1, w2, w3, *shared, 4, 4, 2, "noaux_tc", True, 2.5)
    out = torch.ops.dsc.moe(x2d, *args)
    torch.cuda.synchronize()
    # The reference on the same device routes from bit-identical logits: no top-k near-tie flips.
    ref = moe_mod.moe_reference(x2d, *args)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"cuda moe {dtype} T={T}")
