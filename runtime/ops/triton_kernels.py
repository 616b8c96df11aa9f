"""Triton kernels for the two hot `dsc` ops: MLA decode attention and the routed MoE experts.

Importing this module requires Triton; the ops import it lazily and fall back to their torch
definitions without it (visibly: runtime/ops/__init__.py counts which implementation ran and
warns once on a fallback).

One process runs Triton kernels one way: compiled, on CUDA tensors, or in Triton's interpreter,
on CPU tensors (TRITON_INTERPRET=1, the CPU test path). Triton decides it when it is first
imported: its language's library functions (`tl.max`, `tl.sum`, `tl.sigmoid`, ...) are
themselves jitted functions, bound to the interpreter or to the compiler at that import for the
whole process, and a kernel that calls them in the other mode fails. So the mode is read from
Triton itself (`interpreting`), every kernel is jitted for it, and a tensor on the other mode's
device is refused in one line. (Changing TRITON_INTERPRET after the import is not supported:
Triton reads it again when it loads some of its modules.)

Integer arguments that change from one decode step to the next (the key count, split counts,
strides that follow the cache length) are not specialised: Triton would otherwise compile a new
variant the first time a value crosses a divisibility class, stalling a generation mid-stream.

Shapes: B batch, S new tokens, T keys (past + new), H heads, C kv_lora_rank, R rope dim;
MoE: T tokens, D hidden, E experts, K active experts per token, I expert intermediate size.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .moe import check_expert_weights

# ---------------------------------------------------------------------------------------------
# Jitting for the process's mode
# ---------------------------------------------------------------------------------------------

_JITTED: dict = {}


def interpreting() -> bool:
    """True when this process runs Triton in its interpreter (kernels then take CPU tensors):
    whether TRITON_INTERPRET was set when Triton was first imported (module docstring)."""
    return isinstance(tl.standard.sigmoid, InterpretedFunction)


def _jit(fn, do_not_specialize: tuple[str, ...] = ()):
    """`fn` jitted for the process's mode, once."""
    if fn.__name__ not in _JITTED:
        kind = InterpretedFunction if interpreting() else JITFunction
        _JITTED[fn.__name__] = kind(fn, do_not_specialize=list(do_not_specialize),
                                    do_not_specialize_on_alignment=list(do_not_specialize))
    return _JITTED[fn.__name__]


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the wrappers below decide it: what `recording` collects."""

    fn: Callable
    grid: tuple[int, ...]
    args: tuple             # the kernel's runtime arguments, in order (tensors, ints, floats)
    constexprs: dict        # its tl.constexpr arguments by name
    options: dict           # num_warps, num_stages
    dynamic: tuple[str, ...]  # integer arguments left unspecialised


_RECORDING: list[Launch] | None = None
_RECORDING_CAPABILITY: tuple[int, int] = (9, 0)


@contextmanager
def recording(capability: tuple[int, int] = (9, 0)) -> Iterator[list[Launch]]:
    """Within it, the kernel wrappers take meta tensors and record the launches they would make on
    a GPU of `capability` instead of running them: the ahead-of-time compiles
    (verify/triton_aot.py) see exactly the configurations a real call would launch."""
    global _RECORDING, _RECORDING_CAPABILITY
    previous = _RECORDING, _RECORDING_CAPABILITY
    _RECORDING, _RECORDING_CAPABILITY = [], capability
    try:
        yield _RECORDING
    finally:
        _RECORDING, _RECORDING_CAPABILITY = previous


def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability launch choices are made for (the recorded one while recording)."""
    if _RECORDING is not None:
        return _RECORDING_CAPABILITY
    if device.type != "cuda":  # the interpreter: any choice works, take the newest target's
        return (9, 0)
    return torch.cuda.get_device_capability(device)


def _launch(fn, grid: tuple[int, ...], args: tuple, constexprs: dict, dynamic: tuple[str, ...] = (),
            **options) -> None:
    if _RECORDING is not None:
        _RECORDING.append(Launch(fn, tuple(int(g) for g in grid), args, constexprs, options, dynamic))
        return
    _jit(fn, dynamic)[grid](*args, **constexprs, **options)


def _check_device(*tensors: Tensor) -> None:
    dev = tensors[0].device
    if _RECORDING is not None:
        if dev.type != "meta":
            raise ValueError(f"recording takes meta tensors, got {dev.type}")
        return
    if any(t.device != dev for t in tensors):
        raise ValueError(f"Triton kernels need all tensors on one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    if interpreting() and dev.type != "cpu":
        raise ValueError(f"Triton runs interpreted in this process (TRITON_INTERPRET=1 when it was imported): "
                         f"its kernels take CPU tensors here, got {dev.type}")
    if not interpreting() and dev.type != "cuda":
        raise ValueError(f"Triton kernels take {dev.type} tensors only when Triton runs interpreted "
                         f"(TRITON_INTERPRET=1 before it is first imported)")


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 on tensor cores: the op's contract is fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype: torch.dtype):
    # The interpreter multiplies bf16 blocks as their raw uint16 bits (Triton 3.7), so there the
    # dot operands are widened to fp32; compiled kernels keep the input dtype for tensor cores.
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def _pow2(n: int, at_least: int = 16) -> int:
    # tl.dot needs every block dim >= 16 and tl.arange a power of two; masks cover the padding.
    return max(at_least, triton.next_power_of_2(n))


# ---------------------------------------------------------------------------------------------
# dsc::latent_attention — split-K flash decoding over the shared latent cache
# ---------------------------------------------------------------------------------------------

def _mla_split_kernel(
    q_ptr, qr_ptr, kv_ptr, kr_ptr, mask_ptr, part_o_ptr, part_m_ptr, part_l_ptr,
    S, H, T, C, R, tiles_per_split, num_splits, scale,
    sq_b, sq_h, sq_s, sq_c,
    sqr_b, sqr_h, sqr_s, sqr_r,
    skv_b, skv_t, skv_c,
    skr_b, skr_t, skr_r,
    sm_b, sm_h, sm_s, sm_t,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    # One program: a block of heads of one (b, s), one split of the keys. Every KV tile loaded
    # here serves all BLOCK_H heads (MQA), and head blocks of the same tile are neighbours in
    # the grid so the other head blocks find it in L2.
    pid_h = tl.program_id(0)
    pid_bs = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = (pid_bs // S).to(tl.int64)
    s = (pid_bs % S).to(tl.int64)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, C_PAD)
    offs_r = tl.arange(0, R_PAD)
    h_ok = offs_h < H
    c_ok = offs_c < C
    r_ok = offs_r < R

    q = tl.load(q_ptr + b * sq_b + s * sq_s + offs_h[:, None] * sq_h + offs_c[None, :] * sq_c,
                mask=h_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)   # [BH, C]
    qr = tl.load(qr_ptr + b * sqr_b + s * sqr_s + offs_h[:, None] * sqr_h
                 + offs_r[None, :] * sqr_r, mask=h_ok[:, None] & r_ok[None, :],
                 other=0.0).to(DOT_DTYPE)

    t_begin = pid_split * tiles_per_split * BLOCK_T
    t_end = tl.minimum(t_begin + tiles_per_split * BLOCK_T, T)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, C_PAD], tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        kv = tl.load(kv_ptr + b * skv_b + offs_t[:, None] * skv_t + offs_c[None, :] * skv_c,
                     mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BT, C]
        kr = tl.load(kr_ptr + b * skr_b + offs_t[:, None] * skr_t + offs_r[None, :] * skr_r,
                     mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BT, R]
        qk = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)
        qk = tl.dot(qr, tl.trans(kr), qk, input_precision=DOT_PRECISION)       # [BH, BT]
        msk = tl.load(mask_ptr + b * sm_b + s * sm_s + offs_h[:, None] * sm_h
                      + offs_t[None, :] * sm_t, mask=h_ok[:, None] & t_ok[None, :], other=0.0)
        scores = qk * scale + msk.to(tl.float32)
        scores = tl.where(t_ok[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # Rows that saw only -inf so far keep a finite pivot: exp(-inf - 0) = 0, never NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(scores - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), kv, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    row = pid_bs * H + offs_h                                   # partials: [B*S, H, splits, C]
    tl.store(part_o_ptr + (row[:, None] * num_splits + pid_split) * C + offs_c[None, :], out,
             mask=h_ok[:, None] & c_ok[None, :])
    # Max and mass stay separate, not fused into m + log(l): next to a finfo.min mask the log
    # term is lost to rounding, and fully masked rows would weigh splits by 1 instead of l.
    tl.store(part_m_ptr + row * num_splits + pid_split, m_i, mask=h_ok)
    tl.store(part_l_ptr + row * num_splits + pid_split, l_i, mask=h_ok)


def _mla_combine_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, out_ptr,
    S, H, C, num_splits,
    so_b, so_h, so_s, so_c,
    SPLIT_BLOCK: tl.constexpr, C_PAD: tl.constexpr,
):
    # One program per (b, s, h): weigh each split's normalized output by its share of the
    # total softmax mass, l_split * exp(m_split - m_max). The splits are read SPLIT_BLOCK at a
    # time, so the registers a program needs do not grow with their number (no spills at
    # hundreds of splits) and one compiled variant serves every split count.
    row = tl.program_id(0).to(tl.int64)
    bs = row // H
    h = row % H
    b = bs // S
    s = bs % S
    offs_c = tl.arange(0, C_PAD)
    c_ok = offs_c < C
    first = row * num_splits

    m_run = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        offs_sp = s0 + tl.arange(0, SPLIT_BLOCK)
        m = tl.load(part_m_ptr + first + offs_sp, mask=offs_sp < num_splits, other=float("-inf"))
        m_run = tl.maximum(m_run, m)
    m_max = tl.max(m_run, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)

    acc = tl.zeros([C_PAD], tl.float32)
    mass = tl.zeros([SPLIT_BLOCK], tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        offs_sp = s0 + tl.arange(0, SPLIT_BLOCK)
        sp_ok = offs_sp < num_splits
        m = tl.load(part_m_ptr + first + offs_sp, mask=sp_ok, other=float("-inf"))
        l = tl.load(part_l_ptr + first + offs_sp, mask=sp_ok, other=0.0)
        w = tl.exp(m - m_max) * l                                               # [SPLIT_BLOCK]
        o = tl.load(part_o_ptr + (first + offs_sp[:, None]) * C + offs_c[None, :],
                    mask=sp_ok[:, None] & c_ok[None, :], other=0.0)            # [SPLIT_BLOCK, C]
        acc += tl.sum(w[:, None] * o, 0)
        mass += w
    total = tl.sum(mass, 0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + s * so_s + offs_c * so_c,
             out.to(out_ptr.dtype.element_ty), mask=c_ok)


# Arguments of the MLA kernels that follow the cache length, left unspecialised (module docstring).
_SPLIT_DYNAMIC = ("T", "tiles_per_split", "num_splits", "skv_b", "skr_b", "sm_b", "sm_h", "sm_s")
_COMBINE_DYNAMIC = ("num_splits",)
SPLIT_BLOCK = 16  # splits the combine kernel reads at a time


def _default_num_splits(device: torch.device, programs_per_split: int, n_tiles: int, cache_bytes: int,
                        partial_bytes_per_split: int) -> int:
    if device.type == "cuda":
        # Two waves of programs over the SMs hide the latency of the KV loads.
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    # Keep >= 4 tiles per split: fewer makes the combine pass cost more than it saves.
    splits = max(1, min(triton.cdiv(target, programs_per_split), triton.cdiv(n_tiles, 4)))
    # The partials are written, then read back by the combine: they never outweigh the cache they
    # summarize (at batch 1 with 128 heads, filling the GPU would take 3-4x the cache's bytes).
    return max(1, min(splits, cache_bytes // max(1, partial_bytes_per_split)))


def triton_latent_attention(q_latent: Tensor, q_rope: Tensor, kv_latent: Tensor, k_rope: Tensor,
                            mask: Tensor, scale: float, block_t: int = 32,
                            block_h: int | None = None, num_splits: int | None = None,
                            num_warps: int = 8, num_stages: int = 2) -> Tensor:
    """`dsc::latent_attention` by split-K flash decoding; returns [B, H, S, C] in q's dtype.

    block_h heads share each loaded KV tile (default 32 for 16-bit inputs from sm_90 on, else 16:
    the largest blocks that compile without register spills at C=512, per ptxas for sm_80 and
    sm_90a, verify/triton_aot.py). The keys are cut into
    num_splits ranges of whole tiles (default: enough programs to fill the GPU) whose partial
    results are merged by their softmax max and mass in a second kernel.
    """
    _check_device(q_latent, q_rope, kv_latent, k_rope, mask)
    B, H, S, C = q_latent.shape
    T, R = kv_latent.shape[1], k_rope.shape[-1]
    out = torch.empty(B, H, S, C, dtype=q_latent.dtype, device=q_latent.device)
    if out.numel() == 0:
        return out
    if T == 0:
        return out.zero_()
    mask4 = mask.expand(B, H, S, T)                     # broadcast dims get stride 0
    block_t = _pow2(block_t)
    if block_h is None:
        wide = q_latent.dtype != torch.float32 and _capability(q_latent.device) >= (9, 0)
        block_h = 32 if wide else 16
    block_h = _pow2(min(block_h, H))
    n_hblocks = triton.cdiv(H, block_h)
    n_tiles = triton.cdiv(T, block_t)
    if num_splits is None:
        cache_bytes = kv_latent.shape[0] * T * (C + R) * kv_latent.element_size()
        num_splits = _default_num_splits(q_latent.device, B * S * n_hblocks, n_tiles, cache_bytes,
                                         B * S * H * (C + 2) * 4)
    num_splits = max(1, min(num_splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, num_splits)
    # Recount so that no split is empty: each one then owns at least one real key.
    num_splits = triton.cdiv(n_tiles, tiles_per_split)

    part_o = torch.empty(B * S * H * num_splits * C, dtype=torch.float32, device=out.device)
    part_m = torch.empty(B * S * H * num_splits, dtype=torch.float32, device=out.device)
    part_l = torch.empty_like(part_m)
    c_pad, r_pad = _pow2(C), _pow2(R)
    _launch(_mla_split_kernel, (n_hblocks, B * S, num_splits),
            (q_latent, q_rope, kv_latent, k_rope, mask4, part_o, part_m, part_l,
             S, H, T, C, R, tiles_per_split, num_splits, float(scale),
             *q_latent.stride(), *q_rope.stride(), *kv_latent.stride(), *k_rope.stride(), *mask4.stride()),
            dict(BLOCK_H=block_h, BLOCK_T=block_t, C_PAD=c_pad, R_PAD=r_pad,
                 DOT_PRECISION=_dot_precision(q_latent.dtype), DOT_DTYPE=_dot_dtype(q_latent.dtype)),
            _SPLIT_DYNAMIC, num_warps=num_warps, num_stages=num_stages)
    _launch(_mla_combine_kernel, (B * S * H,),
            (part_o, part_m, part_l, out, S, H, C, num_splits, *out.stride()),
            dict(SPLIT_BLOCK=SPLIT_BLOCK, C_PAD=c_pad), _COMBINE_DYNAMIC, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# dsc::moe — routed experts as grouped GEMMs over tokens sorted by expert
# ---------------------------------------------------------------------------------------------

def align_by_expert(idx: Tensor, num_experts: int, block_m: int, ends: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Sorts the T*K (token, slot) pairs by expert, each expert's run padded to block_m rows.

    Returns sorted_ids [M] (pair index t*K+k, or T*K for padding), expert_of_block [M/block_m]
    and num_padded [1] (rows in use; blocks past it are skipped), or with `ends` every expert's
    padded end [num_experts]. M is an upper bound known without reading the routing on the host,
    so nothing waits for the GPU.
    """
    flat = idx.reshape(-1)                                                      # [T*K]
    n = flat.numel()
    # Counted by a scatter, not torch.bincount, which reads the largest id back to the host (a sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    dest = padded_start[expert] + torch.arange(n, device=flat.device) - start[expert]
    m_max = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((m_max,), n, dtype=torch.int64, device=flat.device)
    sorted_ids[dest] = order
    block_start = torch.arange(0, m_max, block_m, device=flat.device)
    expert_of_block = torch.searchsorted(padded_end, block_start, right=True)
    expert_of_block = expert_of_block.clamp_max(num_experts - 1)
    return sorted_ids, expert_of_block, padded_end if ends else padded_end[-1:]


def _moe_gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, sorted_ids_ptr, expert_ptr, num_padded_ptr,
    D, I, num_pairs, top_k,
    sx_t, sx_d, sw_e, sw_i, sw_d, sh_p, sh_i,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    # h[pair] = silu(x[token] @ w1[e].T) * (x[token] @ w3[e].T) for the BLOCK_M pairs of one
    # expert; w1 and w3 tiles are read once for the whole block of tokens.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    p_ok = pairs < num_pairs
    tokens = pairs // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(x_ptr + tokens[:, None] * sx_t + offs_k[None, :] * sx_d,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        w_off = e * sw_e + offs_n[None, :] * sw_i + offs_k[:, None] * sw_d       # [BK, BN]
        w_ok = k_ok[:, None] & n_ok[None, :]
        g = tl.load(w1_ptr + w_off, mask=w_ok, other=0.0).to(DOT_DTYPE)
        u = tl.load(w3_ptr + w_off, mask=w_ok, other=0.0).to(DOT_DTYPE)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + pairs[:, None] * sh_p + offs_n[None, :] * sh_i,
             h.to(h_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


def _moe_down_kernel(
    h_ptr, w2_ptr, y_ptr, weight_ptr, sorted_ids_ptr, expert_ptr, num_padded_ptr,
    D, I, num_pairs,
    sh_p, sh_i, sw_e, sw_d, sw_i, sy_p, sy_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    # y[pair] = weight[pair] * (h[pair] @ w2[e].T), in float32 for the combine.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    p_ok = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(h_ptr + pairs[:, None] * sh_p + offs_k[None, :] * sh_i,
                    mask=p_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BM, BK]
        w = tl.load(w2_ptr + e * sw_e + offs_n[None, :] * sw_d + offs_k[:, None] * sw_i,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)  # [BK, BN]
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(weight_ptr + pairs, mask=p_ok, other=0.0)[:, None]
    tl.store(y_ptr + pairs[:, None] * sy_p + offs_n[None, :] * sy_d, acc,
             mask=p_ok[:, None] & n_ok[None, :])


def triton_moe_experts(x2d: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, weights: Tensor,
                       idx: Tensor, block_m: int | None = None, block_n: int = 64,
                       block_k: int = 64, num_warps: int | None = None, remote: bool = False) -> Tensor:
    """Routed experts as Triton grouped GEMMs; same contract as `moe_experts_reference`.

    Returns Σ_k weights[t,k]·expert_idx[t,k](x[t]) as [T, D] float32. The intermediate
    silu(g)*u is stored in x's dtype, as the reference computes it. With `remote`, an id equal
    to E marks a choice of an expert held elsewhere (a sharded layer): it contributes nothing,
    and no host sync is needed to leave it out (`local_experts`).
    """
    _check_device(x2d, w1, w2, w3, weights, idx)
    check_expert_weights(x2d, w1, w2, w3)
    T, K = idx.shape
    E, I, D = w1.shape
    if T == 0:
        return torch.zeros(0, D, dtype=torch.float32, device=x2d.device)
    if w1.stride() != w3.stride():
        w1, w3 = w1.contiguous(), w3.contiguous()
    if block_m is None:
        # Decode puts ~1 token per expert: a small M block wastes less of the weight tile.
        block_m = 16 if T * K <= 4 * E else 64
    block_m, block_n, block_k = _pow2(block_m), _pow2(block_n), _pow2(block_k)
    if num_warps is None:
        # 64-row blocks spill at 4 warps (ptxas, sm_90); 16-row blocks do not need more.
        num_warps = 4 if block_m <= 16 else 8
    if remote:  # remote choices sort into one more bucket, after the last expert, that no block runs
        sorted_ids, expert_of_block, padded_end = align_by_expert(idx, E + 1, block_m, ends=True)
        expert_of_block, num_padded = expert_of_block.clamp_max(E - 1), padded_end[E - 1:E]
    else:
        sorted_ids, expert_of_block, num_padded = align_by_expert(idx, E, block_m)
    n_pairs = T * K
    h = torch.empty(n_pairs, I, dtype=x2d.dtype, device=x2d.device)
    # Remote pairs are never written: their rows must hold zeros for the sum over slots.
    y = (torch.zeros if remote else torch.empty)(n_pairs, D, dtype=torch.float32, device=x2d.device)
    flat_w = weights.reshape(-1).float().contiguous()
    n_blocks_m = sorted_ids.numel() // block_m
    precision, dot_dtype = _dot_precision(x2d.dtype), _dot_dtype(x2d.dtype)

    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision, DOT_DTYPE=dot_dtype)
    # The token counts change from step to step; the model's sizes and strides do not.
    _launch(_moe_gate_up_kernel, (n_blocks_m, triton.cdiv(I, block_n)),
            (x2d, w1, w3, h, sorted_ids, expert_of_block, num_padded,
             D, I, n_pairs, K, *x2d.stride(), *w1.stride(), *h.stride()),
            blocks, ("num_pairs",), num_warps=num_warps)
    _launch(_moe_down_kernel, (n_blocks_m, triton.cdiv(D, block_n)),
            (h, w2, y, flat_w, sorted_ids, expert_of_block, num_padded,
             D, I, n_pairs, *h.stride(), *w2.stride(), *y.stride()),
            blocks, ("num_pairs",), num_warps=num_warps)
    # Every pair row of y is written exactly once, so the combine is a plain sum over slots.
    return y.view(T, K, D).sum(dim=1)


triton_moe_experts.takes_remote_ids = True  # local_experts passes remote choices as id E
