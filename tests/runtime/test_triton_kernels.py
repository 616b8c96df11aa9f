"""Triton kernels of the dsc ops against their reference implementations.

`triton`-marked tests run the kernels on CPU tensors in Triton's interpreter (tiny sizes: it runs
every program in Python). `gpu`-marked tests run the compiled kernels through the registered ops
on CUDA, check that the kernel (not the torch fallback) ran, and skip elsewhere. One process
cannot do both (runtime/ops/triton_kernels.py): tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports Triton where there is no GPU, and leaves it unset where there is one.

Shapes: B batch, S new tokens, T keys, H heads, C kv_lora_rank, R rope dim; MoE: T tokens,
D hidden, E experts, K active experts, I expert intermediate.
"""

import os
import subprocess
import sys

import pytest
import torch

try:
    import triton  # noqa: F401  (tests/conftest.py chose the process's mode before this import)
    from dscompile.runtime.ops import triton_kernels as tk
    _TRITON_MISSING = None
except ImportError as exc:      # the ops still work without Triton; only these tests cannot
    tk = None
    _TRITON_MISSING = f"triton is not importable: {exc}"

import dscompile.runtime.ops  # noqa: F401  (registers the dsc ops)
from dscompile.runtime.ops import kernels as kernel_calls
from dscompile.runtime.ops import latent_attention as la_mod
from dscompile.runtime.ops import moe as moe_mod
from dscompile.model.routing import Routing, route
from helpers import assert_op_close as assert_close


needs_triton = pytest.mark.skipif(_TRITON_MISSING is not None, reason=str(_TRITON_MISSING))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def interpreter():
    """Interpreted kernels need a process whose Triton was imported with TRITON_INTERPRET=1."""
    if not tk.interpreting():
        pytest.skip("Triton runs compiled in this process (a CUDA GPU is present, tests/conftest.py): "
                    "run the interpreter tests in their own process, TRITON_INTERPRET=1 pytest -m triton")


@pytest.fixture
def compiled():
    """Compiled kernels: a GPU test process must never have imported Triton for its interpreter."""
    if tk.interpreting():
        if os.environ.get("DSCOMPILE_TRITON_MODE_FROM_USER") == "interpret":
            pytest.skip("TRITON_INTERPRET=1 was set for this run: Triton runs interpreted in this process")
        pytest.fail("Triton was imported for its interpreter in a GPU test process: every compiled launch "
                    "would fail (tests/conftest.py decides the mode before anything imports Triton)")


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
    # Every kernel was jitted for the interpreter, the process's mode.
    assert len(tk._JITTED) == 4
    assert all(isinstance(f, tk.InterpretedFunction) for f in tk._JITTED.values())


@pytest.mark.triton
@needs_triton
def test_combine_reads_many_splits_in_blocks(interpreter):
    # More splits than one SPLIT_BLOCK, and a count that is not a multiple of it: the combine
    # kernel loops over blocks of splits (it once held them all in registers, which spilled).
    T = 16 * (2 * tk.SPLIT_BLOCK + 3)
    q, qr, kv, kr, mask = attention_inputs(1, 2, 1, T, 16, 8, fully_masked=())
    scale = 24 ** -0.5
    out = tk.triton_latent_attention(q, qr, kv, kr, mask, scale, block_t=16, num_splits=2 * tk.SPLIT_BLOCK + 3)
    assert_close(out, la_mod.latent_attention_reference(q, qr, kv, kr, mask, scale), torch.float32,
                 "combine over 35 splits")


def test_default_splits_never_outweigh_the_cache():
    if tk is None:
        pytest.skip(_TRITON_MISSING)
    # V3 at batch 1 on a 132-SM GPU: the GPU-filling count is capped by the cache's bytes.
    H, C, R, T, block_t = 128, 512, 64, 4096, 32
    cache = T * (C + R) * 2
    per_split = H * (C + 2) * 4
    splits = tk._default_num_splits(torch.device("cpu"), 4, T // block_t, cache, per_split)
    assert splits * per_split <= cache
    assert tk._default_num_splits(torch.device("cpu"), 1, 1000, 10**12, 1) == 4  # uncapped: the CPU target


_MODE_PROBE = """
import os, torch
{before}
from dscompile.runtime.ops import triton_kernels as tk
{after}
print("interpreting", tk.interpreting())
g = torch.Generator().manual_seed(0)
q, qr = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 8, generator=g)
kv, kr = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 8, generator=g)
mask = torch.zeros(1, 1, 1, 5)
try:
    out = tk.triton_latent_attention(q, qr, kv, kr, mask, 0.3)
    from dscompile.runtime.ops.latent_attention import latent_attention_reference
    print("ran", float((out - latent_attention_reference(q, qr, kv, kr, mask, 0.3)).abs().max()))
except ValueError as err:
    print("refused", err)
"""


def _probe(before: str, after: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _MODE_PROBE.format(before=before, after=after)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.triton
@needs_triton
def test_the_mode_is_fixed_when_triton_is_imported():
    # Imported for the compiler, TRITON_INTERPRET set afterwards: CPU tensors are refused in one
    # clear line (Triton's library functions are compiled ones: the interpreter would fail on them).
    out = _probe("", "os.environ['TRITON_INTERPRET'] = '1'")
    assert "interpreting False" in out and "refused" in out and "TRITON_INTERPRET=1 before" in out
    # Imported for the interpreter: it runs interpreted.
    out = _probe("os.environ['TRITON_INTERPRET'] = '1'", "")
    assert "interpreting True" in out
    assert float(out.split("ran ")[1]) < 1e-5


@pytest.mark.triton
@needs_triton
def test_remote_expert_ids_contribute_nothing(interpreter):
    # A sharded layer's local experts: choices of experts held elsewhere arrive as id E.
    x2d, gate_weight, w1, w2, w3 = moe_inputs(6, 16, 16, 4)
    weights, idx = route(x2d @ gate_weight.t(), None, Routing(2, 1, 1, "greedy", False, 1.0))
    local = idx < 2
    got = tk.triton_moe_experts(x2d, w1[:2], w2[:2], w3[:2], weights, torch.where(local, idx, 2),
                                block_n=16, block_k=16, remote=True)
    want = moe_mod.local_experts(moe_mod.moe_experts_reference, 0)(x2d, w1[:2], w2[:2], w3[:2], weights, idx)
    assert_close(got, want, torch.float32, "remote ids")
    assert got.abs().sum() > 0


# ---- CUDA -------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,S,T", [(1, 1, 1), (4, 1, 1000), (3, 2, 4099)])
def test_latent_attention_op_on_cuda(compiled, dtype, B, S, T):
    H, C, R = 16, 512, 64
    inputs = attention_inputs(B, H, S, T, C, R, dtype=dtype, fully_masked=((0, 0),),
                              device="cuda")
    before = kernel_calls.CALLS[("latent_attention", "triton")]
    out = torch.ops.dsc.latent_attention(*inputs, (C + R) ** -0.5)
    torch.cuda.synchronize()
    assert kernel_calls.CALLS[("latent_attention", "triton")] == before + 1, "the Triton kernel did not run"
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
    before = kernel_calls.CALLS[("moe", "triton")]
    out = torch.ops.dsc.moe(x2d, *args)
    torch.cuda.synchronize()
    assert kernel_calls.CALLS[("moe", "triton")] == before + 1, "the Triton kernel did not run"
    # The reference on the same device routes from bit-identical logits: no top-k near-tie flips.
    ref = moe_mod.moe_reference(x2d, *args)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"cuda moe {dtype} T={T}")
