"""Named numerical tolerances: max |Δ| <= TOL[dtype] · max(1, max|ref|).

One table for whole programs (an engine or a rewritten graph against eager: errors accumulate
through every layer) and one for a single op against its reference implementation.
"""

from __future__ import annotations

import math

import torch

from dscompile.dtypes import DTYPES

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
OP_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# A quantized engine against the eager model with the same quantized weights, where its kernels
# quantize activations to int8 per block (MatMulNBits/QMoE accuracy_level 4, the CPU choice): the
# per-layer max |Δ| bound `compare` locates the first diverging layer with. The steps themselves
# are judged by `quantized_activations_rms` below, derived from what those kernels do.
QUANTIZED_ACTIVATIONS = {torch.float32: 1e-1}
INT8_LEVELS = 127  # symmetric int8: a block's largest |a| maps to 127
ERROR_GAIN = 2.0  # how much later layers may amplify an error relative to the signal (norms, softmax)


def quantized_activations_rms(block_size: int, quantized_matmuls: int) -> float:
    """The largest relative RMS error ||Δ|| / ||ref|| of logits and cache allowed for an engine whose
    kernels quantize activations to int8 per block of `block_size`, with `quantized_matmuls`
    quantized matrix products in its graph, against eager with the same quantized weights.

    One kernel: each block b of an activation a is rounded to the grid s_b · [-127, 127] with
    s_b = max_b |a| / 127, so each element errs by δ uniform in ±s_b / 2: E[δ²] = s_b² / 12. Over
    the vector, ||δ||² / ||a||² = Σ_b B s_b² / 12 / Σ_b ||a_b||² <= B / (12 · 127²), since a block's
    largest square is at most its sum of squares (max_b a² <= ||a_b||², equality when one channel
    carries the whole block: the outlier channels of trained models). Weights that are not aligned
    with δ pass the relative error on: ε = ||W δ|| / ||W a|| ~ ||δ|| / ||a|| <= sqrt(B) / (127 sqrt(12))
    (0.0091 at block 16, 0.013 at 32, 0.026 at 128; ~0.005 measured per linear op on random
    activations, whose blocks are Gaussian: max / rms ~ 2.5, not sqrt(B)).
    The n kernels' roundings are independent, so their errors add in variance: sqrt(n) · ε on the
    residual stream, and ERROR_GAIN allows later layers to amplify them (no kernel error passes
    through more than one norm's rescaling unchanged in size).

    Bench config (V2-Lite widths, 4 layers, n = 31): bound 0.14 at block 32 against 0.019 (int8)
    and 0.021 (int4) measured; tiny random v3 (2 layers, n = 17, block 16): 0.075 against 0.009-0.016,
    while scaling one weight's scales by 1.5 (a wrong lowering) gives 0.25-0.45.
    """
    per_kernel = math.sqrt(block_size) / (INT8_LEVELS * math.sqrt(12.0))
    return ERROR_GAIN * math.sqrt(max(1, quantized_matmuls)) * per_kernel
# A float32 engine whose GEMMs take TF32 inputs (opted in: ONNX Runtime's CUDA provider with
# use_tf32, TensorRT built with BuilderFlag.TF32): each GEMM input is rounded to 10 mantissa bits
# (unit roundoff 2^-11 ~ 4.9e-4, ~5e-4 relative per product), accumulated in float32. The bound
# allows about 20 of those roundings through the layers; it is half of float16's, whose 10-bit
# mantissa also rounds activations, norms and softmax, which TF32 leaves in float32. Set from
# that arithmetic, not yet measured on a GPU. Other dtypes keep their own bounds (TF32 does not
# touch them).
TF32 = {**TOLERANCE, torch.float32: 1e-2}


def bound(dtype: torch.dtype | str, ref_max: float, table: dict = TOLERANCE) -> float:
    """The largest allowed max |Δ| for outputs whose reference peaks at `ref_max`."""
    dtype = DTYPES.get(dtype, torch.float32) if isinstance(dtype, str) else dtype
    return table.get(dtype, table[torch.float32]) * max(1.0, ref_max)
