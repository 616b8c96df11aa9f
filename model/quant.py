"""Block-wise weight-only quantization: the scheme, the quantizer, and which weights it applies to.

A weight [..., K] (rows of input features, as nn.Linear stores them) is cut along K into blocks of
`block_size` values; each block gets one float32 scale `d` and integers q in [-2^(b-1), 2^(b-1) - 1]:

    w ≈ d · q,   d = m / -2^(b-1)   (m: the block's value of largest magnitude, with its sign)

so m itself maps exactly onto the most negative integer (one level more than a symmetric
amax / (2^(b-1) - 1) scale; the scale may be negative). With `search` (the default for 4 bits)
each block also tries scales shrunk by the factors of `SEARCH_FACTORS` and keeps the one with the
least squared error: clipping the largest value a little buys finer steps for all the others.

Stored form (ONNX Runtime's `MatMulNBits` and `QMoE`): unsigned q + 2^(b-1) (the ops' default zero
point), 4-bit values packed two to a byte (low nibble first), bytes [..., K / block, block·b/8],
scales [..., K / block].

`fake_quantize(w)` = dequantize(quantize(w)) is the weight a quantized engine computes with:
the eager reference of a quantized engine loads every quantized weight that way
(model.checkpoint.load_checkpoint(quantize=...)), and quantizing it again gives back the same
bytes (the largest value of each block is on the grid, so the search keeps factor 1).

Calibrated (`quantize_weighted`, `export --calibration TEXT`): the error that matters is the
layer's output error, E[(Σ_j (w_j - d q_j) x_j)²] ≈ Σ_j E[x_j²] (w_j - d q_j)² when the input
channels are uncorrelated, so each block's scale is searched (over `CALIBRATED_FACTORS`, finer
than `SEARCH_FACTORS`) for the least squared error weighted by the mean squared input activation
of each input channel (model/calibration.py collects it per linear and per routed expert by
running the eager model on a text), as llama.cpp's imatrix does. Factors stay <= 1, so the
block's largest value stays on the grid and requantizing the fake-quantized weight gives back
the same bytes.

Quantized: every linear layer's weight (attention projections, dense and shared-expert MLPs,
lm_head) and the routed experts. lm_head keeps 8 bits unless asked otherwise (`head_bits`), as
llama.cpp's Q4_0 keeps its output layer at Q6_K: its error goes straight into the logits. On the
trained model (model/pretrained, held-out text) an int4 engine's KL from float32 is 0.0025 with a
4-bit lm_head, 0.0011 with a float32 one (llama.cpp Q4_0: 0.0014); the 8-bit head costs its
vocab x hidden bytes once per token. A 6-bit head (6.5 bits per weight with the native panels'
float16 scales, where llama.cpp's Q6_K takes 6.56: KL 0.0011, top-1 agreement 0.968) is stored for
the native kernels only (runtime/native: MatMulQ6). Kept in the compute dtype: the embeddings (a
lookup reads one row), the MoE router (`mlp.gate.weight`, tiny, and routing decisions flip under
its error), norms and the routing bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

BITS = (4, 8)
HEAD_BITS = (4, 6, 8)  # lm_head's: 6 through the native kernels only (MatMulNBits has no 6-bit form)
BLOCK_SIZES = (16, 32, 64, 128)
SEARCH_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
CALIBRATED_FACTORS = tuple(round(1.0 - 0.025 * i, 3) for i in range(17))  # 1.0 down to 0.6
_QUANTIZED = re.compile(
    r"(^|\.)(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight"
    r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight"
    r"|mlp\.experts\.(gate_proj|up_proj|down_proj)"
    r"|lm_head\.weight)$")


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized: bits per value, values per block, scale search."""

    bits: int
    block_size: int = 32
    search: bool | None = None  # None: search for 4 bits, plain for 8 (int8's rounding error is small already)
    head_bits: int | None = 8  # lm_head's bits (None: the scheme's); see HEAD_BITS_NOTE

    def __post_init__(self):
        if self.bits not in HEAD_BITS:  # 6: lm_head's own scheme only (for_weight)
            raise ValueError(f"bits must be one of {HEAD_BITS}, not {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, not {self.block_size}")
        if self.head_bits is not None and self.head_bits not in HEAD_BITS:
            raise ValueError(f"lm_head bits must be one of {HEAD_BITS}, not {self.head_bits}")

    def for_weight(self, name: str) -> "Scheme":
        """The scheme of the weight called `name`: lm_head's bits are `head_bits`, the rest the scheme's."""
        if name.endswith("lm_head.weight") and self.head_bits not in (None, self.bits):
            return Scheme(self.head_bits, self.block_size, self.search, head_bits=None)
        return self

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def searches(self) -> bool:
        return self.bits == 4 if self.search is None else self.search

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight: the integers plus one float32 scale per block."""
        return self.bits + 32 / self.block_size

    def to_dict(self) -> dict:
        return {"scheme": self.name, "bits": self.bits, "block_size": self.block_size,
                "lm_head_bits": self.head_bits or self.bits,
                "scale": "float32 per block, zero point 2^(bits-1), largest-magnitude value on the grid",
                "scale_search": list(SEARCH_FACTORS) if self.searches else None,
                "bits_per_weight": self.bits_per_weight}


def is_quantized(name: str) -> bool:
    """Whether the weight called `name` (ours, with or without the "model." prefix) is quantized."""
    return bool(_QUANTIZED.search(name))


def quantize(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., K/block, block] in [-2^(b-1), 2^(b-1)-1], scales float32 [..., K/block]).

    K must be a multiple of the block size. Computed in float32, one row chunk at a time.
    """
    K, block = int(w.shape[-1]), scheme.block_size
    if K % block:
        raise ValueError(f"input dimension {K} is not a multiple of the block size {block}")
    lead = tuple(w.shape[:-1])
    rows = w.reshape(-1, K)
    q = torch.empty((rows.shape[0], K // block, block), dtype=torch.int8)
    d = torch.empty((rows.shape[0], K // block), dtype=torch.float32)
    step = max(1, (1 << 22) // K)  # ~16 MB of float32 at a time
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].float().reshape(-1, K // block, block)
        q[start:start + step], d[start:start + step] = _quantize_blocks(chunk, scheme)
    return q.reshape(*lead, K // block, block), d.reshape(*lead, K // block)


def _quantize_blocks(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # [..., 1] signed value of largest magnitude
    best_d = peak / lo
    if scheme.searches:  # keep each block's best scale; the integers are computed once, at the end
        best_err = _squared_error(x, best_d, lo, hi)
        for factor in SEARCH_FACTORS[1:]:
            d = peak * factor / lo
            err = _squared_error(x, d, lo, hi)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_d = torch.where(better, d, best_d)
    return _round(x, best_d, lo, hi).to(torch.int8), best_d.squeeze(-1)


def quantize_weighted(w: torch.Tensor, scheme: Scheme, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` with each block's scale chosen for the least importance-weighted squared error.

    importance: [K] (one vector for every row) or [G, K] with G dividing the rows (a stacked
    expert weight [E, rows, K]: one vector per expert), >= 0: the mean squared input activation of
    each input channel.
    """
    K, block = int(w.shape[-1]), scheme.block_size
    if K % block:
        raise ValueError(f"input dimension {K} is not a multiple of the block size {block}")
    rows = w.reshape(-1, K)
    groups = importance.reshape(-1, K).float()
    if rows.shape[0] % groups.shape[0]:
        raise ValueError(f"{groups.shape[0]} importance vectors do not divide the {rows.shape[0]} rows")
    per = rows.shape[0] // groups.shape[0]  # rows that share one vector
    q = torch.empty((rows.shape[0], K // block, block), dtype=torch.int8)
    d = torch.empty((rows.shape[0], K // block), dtype=torch.float32)
    step = max(1, (1 << 21) // K)
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        x = rows[start:end].float().reshape(-1, K // block, block)
        weight = groups[torch.arange(start, end) // per].reshape(-1, K // block, block)
        q[start:end], d[start:end] = _weighted_blocks(x, weight, scheme.bits)
    return q.reshape(*w.shape[:-1], K // block, block), d.reshape(*w.shape[:-1], K // block)


def _weighted_blocks(x: torch.Tensor, weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    best_d, best_err = peak / lo, None
    for factor in CALIBRATED_FACTORS:
        d = peak * factor / lo
        t = _round(x, d, lo, hi).mul_(d).sub_(x)
        err = t.mul_(t).mul_(weight).sum(-1, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
    return _round(x, best_d, lo, hi).to(torch.int8), best_d.squeeze(-1)


def _squared_error(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per block, the squared error of x quantized with scales d: [..., 1]."""
    t = _round(x, d, lo, hi).mul_(d).sub_(x)
    return t.mul_(t).sum(-1, keepdim=True)


def _round(x: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (x * inv).round_().clamp_(lo, hi)


def dequantize(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [..., K] that (q, scales) stand for."""
    w = q.float().mul_(d.unsqueeze(-1))  # in place: one weight-sized tensor, not two
    return w.reshape(*q.shape[:-2], -1).to(dtype)


def fake_quantize(w: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(w)) in w's dtype: the values a quantized engine multiplies with (with
    `importance`, the calibrated scales of quantize_weighted)."""
    if importance is not None:
        return dequantize(*quantize_weighted(w, scheme, importance), dtype=w.dtype)
    return dequantize(*quantize(w, scheme), dtype=w.dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [..., n, block] (signed) -> uint8 [..., n, block·bits/8] with zero point 2^(bits-1)."""
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 8:
        return u
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack's inverse: signed q [..., n, block]."""
    if bits == 8:
        u = packed.to(torch.int16)
    else:
        u = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int16)
    return (u - (1 << (bits - 1))).to(torch.int8)


class FakeQuantized:
    """`dsc_source` of a meta weight that loads as `fake_quantize(source.load())`.

    `errors` (shared by the model's weights) receives, per weight, the largest |w - fake(w)| and
    that relative to max |w|, each time one is loaded: what the manifest reports per weight.
    """

    def __init__(self, name: str, source, scheme: Scheme, errors: dict[str, dict[str, float]],
                 importance: torch.Tensor | None = None):
        self.name, self.source, self.scheme, self.errors = name, source, scheme, errors
        self.importance = importance  # calibrated: the scales of quantize_weighted

    def load(self) -> torch.Tensor:
        w = self.source.load()
        fake = fake_quantize(w, self.scheme, self.importance)
        self.errors[self.name] = error_of(w, fake)
        del w  # the source values go before the caller continues with the fake ones
        return fake


def error_of(w: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """max |w - fake| and that over max |w|, a row chunk at a time (no weight-sized temporaries)."""
    peak = err = 0.0
    rows, fakes = w.reshape(-1, w.shape[-1]), fake.reshape(-1, w.shape[-1])
    step = max(1, (1 << 22) // max(1, w.shape[-1]))
    for start in range(0, rows.shape[0], step):
        a, b = rows[start:start + step].float(), fakes[start:start + step].float()
        peak = max(peak, float(a.abs().max()))
        err = max(err, float((a - b).abs_().max()))
    return {"max_abs": err, "max_rel": err / peak if peak else 0.0}
