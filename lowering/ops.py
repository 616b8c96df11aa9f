"""ONNX translations of the `dsc` ops, for `torch.onnx.export(..., custom_translation_table=...)`.

The reference implementations in `runtime/ops/` define what these compute; each translation is a
traced onnxscript function (plain Python over `onnxscript.opset23`), so Python branches on the
ops' attributes (topk_method, top_k, ...) pick the ONNX subgraph at export time.

- `dsc.latent_attention` -> a MatMul / Softmax / MatMul composite (measured: on ONNX Runtime's CPU
  provider ~4.7x faster than the standard `Attention` op for this MQA shape), heads folded into
  the rows so the cache is read once per step (see the function).
- `aten.scaled_dot_product_attention` (prefill without absorption) -> the same kind of composite
  instead of torchlib's `Attention`.
- `aten.einsum` (absorb_mla's weight products) -> MatMuls instead of ONNX Einsum.
- `dsc.moe` -> routing with standard ops (Gemm, Sigmoid/Softmax, TopK, group masking with -inf,
  GatherElements, normalization, scaling) followed by one of three expert lowerings, each a fixed
  number of nodes whatever the number of routed experts (the stacked [E, ...] weights are read
  whole by one op; nothing loops over experts, so a 256-expert graph is as large as an 8-expert one):
    "moe_op": ORT's `com.microsoft.MoE` (fc1 = gate/up interleaved, swiglu_fusion=1) with the
              routing computed outside: router_probs = log(w) on the chosen experts and a very
              negative value elsewhere, normalize_routing_weights=0, so the op returns
              Σ_k (w_k/Σw)·expert_k(x); multiplying by Σw gives Σ_k w_k·expert_k(x).
    "gather": Gather the chosen experts' stacked weights per token, then batched MatMuls.
    "dense":  all experts on all tokens (MatMul against the stacked weights) and a masked combine.
  `benchmarks/ort_moe_lowering.py` measures them; `choose_moe_experts` encodes the result.

The fc1 input of `com.microsoft.MoE` is emitted as Reshape(Concat(Unsqueeze(w1), Unsqueeze(w3)))
of the two weight initializers; `lower.fold_weights` replaces that chain by ONE new
interleaved initializer after export (the onnxscript optimizer only folds small constants).

Shapes: B batch, S new tokens, T keys (attention) or tokens (MoE: B*S), H heads, C kv_lora_rank,
R rope dim, D hidden, E routed experts, K active experts, I expert intermediate, G groups.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import onnx
import onnx_ir as ir
import torch
from onnxscript import opset23 as op
from onnxscript.onnx_types import TensorType
from onnxscript.values import Opset

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.*)

MSFT_DOMAIN = "com.microsoft"
msft = Opset(MSFT_DOMAIN, 1)
MOE_EXPERTS = ("moe_op", "gather", "dense")
# Routing logit of the experts not chosen, for com.microsoft.MoE: exp(this - max) is exactly 0.
NOT_CHOSEN = -1e30
FLOAT = ir.DataType.FLOAT


def _register_msft_moe_schema() -> None:
    """onnx does not know ORT's contrib ops; the checker and onnxscript need the schema to emit it."""
    try:
        onnx.defs.get_schema("MoE", 1, MSFT_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    P = onnx.defs.OpSchema.FormalParameter
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    schema = onnx.defs.OpSchema(
        "MoE", MSFT_DOMAIN, 1,
        doc="ONNX Runtime contrib op: mixture of experts (registered here so onnx tools accept it).",
        inputs=[
            P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
            P("fc1_experts_bias", "T", param_option=opt), P("fc2_experts_weights", "T"),
            P("fc2_experts_bias", "T", param_option=opt), P("fc3_experts_weights", "T", param_option=opt),
            P("fc3_experts_bias", "T", param_option=opt),
        ],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=[
            A("k", AT.INT, "experts per token", required=False),
            A("activation_type", AT.STRING, "activation", required=False),
            A("activation_alpha", AT.FLOAT, "swiglu alpha", required=False),
            A("activation_beta", AT.FLOAT, "swiglu beta", required=False),
            A("swiglu_fusion", AT.INT, "1: gate/up interleaved in fc1", required=False),
            A("swiglu_limit", AT.FLOAT, "clamp limit", required=False),
            A("normalize_routing_weights", AT.INT, "normalize top-k weights", required=False),
            A("use_sparse_mixer", AT.INT, "sparse mixer", required=False),
        ],
    )
    onnx.defs.register_schema(schema)


_register_msft_moe_schema()


def _const(values: list[int]):
    return op.Constant(value_ints=list(values))


def _filled(shape, value: float):
    """A float32 tensor of `shape` holding `value`, as Expand of a one-element constant: ONNX
    Runtime's CUDA provider registers ConstantOfShape for opset 9 only, so in our opset 23+ graphs
    a ConstantOfShape would run on CPU and be copied to the GPU every step (inspect --ort-cuda-compat)."""
    return op.Expand(op.Constant(value_floats=[float(value)]), shape)


def _to_float(x, dtype: ir.DataType):
    """x (of `dtype`: intermediate values carry no type while tracing) as float32."""
    return x if dtype == FLOAT else op.Cast(x, to=FLOAT)


# ---------------------------------------------------------------- latent attention


def latent_attention(q_latent, q_rope, kv_latent, k_rope, mask, scale: float):
    """scores = [q_lat; q_rope]·[kv; k_rope]ᵀ·scale + mask; softmax (float32); @ kv.

    All heads share one key and value (MQA), so the heads are folded into the rows of one MatMul
    per batch row: [B, 1, H*S, C] @ [B, 1, C, T] reads each cached token once, where a per-head
    broadcast MatMul reads it H times. The key is never concatenated (a copy of the whole cache
    per step): the latent and rope parts are two MatMuls summed. The transposes feed MatMuls
    directly, which ONNX Runtime fuses (FusedMatMul with transB, no copy).

    Softmax of a row that is -inf everywhere gives NaN where the reference gives 0; the graphs'
    masks are finite (the model masks with the dtype's most negative value), so no row is.
    """
    dtype = q_latent.dtype
    H, C, R = q_latent.shape[1], int(q_latent.shape[-1]), int(q_rope.shape[-1])
    if not isinstance(H, int):
        return _latent_attention_dynamic_heads(q_latent, q_rope, kv_latent, k_rope, mask, scale)
    # Rows [B, 1, H*S, *] against keys [B, 1, T, *]: every reshape is a constant target (0 copies a
    # dim in place, -1 is the one left), so no Shape/Concat chains compute targets at run time.
    s = op.Constant(value_float=float(scale))
    q = op.Mul(op.Reshape(_to_float(q_latent, dtype), _const([0, 1, -1, C])), s)       # [B, 1, H*S, C]
    qr = op.Mul(op.Reshape(_to_float(q_rope, q_rope.dtype), _const([0, 1, -1, R])), s)  # [B, 1, H*S, R]
    kv = op.Unsqueeze(_to_float(kv_latent, kv_latent.dtype), _const([1]))            # [B, 1, T, C]
    kr = op.Unsqueeze(_to_float(k_rope, k_rope.dtype), _const([1]))                  # [B, 1, T, R]
    scores = op.Add(op.MatMul(q, op.Transpose(kv, perm=[0, 1, 3, 2])),
                    op.MatMul(qr, op.Transpose(kr, perm=[0, 1, 3, 2])))  # [B, 1, H*S, T]
    scores = op.Reshape(scores, _const([0, H, -1, 0]))                     # [B, H, S, T]
    p = op.Softmax(op.Add(scores, _to_float(mask, mask.dtype)), axis=-1)  # [B, H, S, T]
    out = op.MatMul(op.Reshape(p, _const([0, 1, -1, 0])), kv)             # [B, 1, H*S, C]
    out = op.Reshape(out, _const([0, H, -1, 0]))                           # [B, H, S, C]
    return out if dtype == FLOAT else op.Cast(out, to=dtype)


def _latent_attention_dynamic_heads(q_latent, q_rope, kv_latent, k_rope, mask, scale: float):
    """latent_attention when the number of heads is not a static dim: the targets from Shape."""
    dtype = q_latent.dtype
    C, R = int(q_latent.shape[-1]), int(q_rope.shape[-1])
    shape = op.Shape(q_latent)                                          # [B, H, S, C]
    s = op.Constant(value_float=float(scale))
    q = op.Mul(op.Reshape(_to_float(q_latent, dtype), _const([0, -1, C])), s)           # [B, H*S, C]
    qr = op.Mul(op.Reshape(_to_float(q_rope, q_rope.dtype), _const([0, -1, R])), s)     # [B, H*S, R]
    kv = _to_float(kv_latent, kv_latent.dtype)                          # [B, T, C]
    kr = _to_float(k_rope, k_rope.dtype)                                # [B, T, R]
    scores = op.Add(op.MatMul(q, op.Transpose(kv, perm=[0, 2, 1])),
                    op.MatMul(qr, op.Transpose(kr, perm=[0, 2, 1])))   # [B, H*S, T]
    scores = op.Reshape(scores, op.Concat(op.Shape(q_latent, start=0, end=3), op.Shape(kv, start=1, end=2), axis=0))
    p = op.Softmax(op.Add(scores, _to_float(mask, mask.dtype)), axis=-1)  # [B, H, S, T]
    out = op.MatMul(op.Reshape(p, op.Concat(op.Shape(p, start=0, end=1), _const([-1]), op.Shape(p, start=3), axis=0)),
                    kv)                                                 # [B, H*S, C]
    out = op.Reshape(out, shape)                                        # [B, H, S, C]
    return out if dtype == FLOAT else op.Cast(out, to=dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False):
    """aten.scaled_dot_product_attention (the un-absorbed prefill) as MatMul / Softmax / MatMul.

    torchlib lowers it to the standard `Attention` op, which ONNX Runtime's CPU provider runs
    ~4.7x slower than this composite (measured on this shape). Softmax runs in float32.
    """
    if dropout_p or is_causal or enable_gqa:
        raise ValueError("scaled_dot_product_attention: dropout, is_causal and enable_gqa are not lowered "
                         "(the model passes an explicit mask)")
    dtype = query.dtype
    s = float(scale) if scale is not None else float(query.shape[-1]) ** -0.5
    q = op.Mul(query, op.CastLike(op.Constant(value_float=s), query))
    scores = _to_float(op.MatMul(q, op.Transpose(key, perm=[0, 1, 3, 2])), dtype)  # [B, H, S, T]
    if attn_mask is not None:
        if attn_mask.dtype == ir.DataType.BOOL:
            scores = op.Where(attn_mask, scores, op.Constant(value_float=float("-inf")))
        else:
            scores = op.Add(scores, _to_float(attn_mask, attn_mask.dtype))
    p = op.Softmax(scores, axis=-1)
    if dtype != FLOAT:
        p = op.Cast(p, to=dtype)
    return op.MatMul(p, value)                                          # [B, H, S, V]


# ---------------------------------------------------------------- moe: routing


def _keep_best_groups(choice, group_scores, E: int, n_group: int, topk_group: int):
    """choice [T, E] with -inf outside the `topk_group` best of `n_group` groups (never 0)."""
    _, best = op.TopK(group_scores, _const([topk_group]), axis=-1)      # [T, topk_group]
    zeros = _filled(op.Shape(group_scores), 0.0)
    ones = _filled(op.Shape(best), 1.0)
    keep = op.ScatterElements(zeros, best, ones, axis=1)               # [T, G] 1 = kept
    keep = op.Expand(op.Unsqueeze(keep, _const([2])), _const([1, 1, E // n_group]))
    keep = op.Cast(op.Reshape(keep, _const([-1, E])), to=ir.DataType.BOOL)  # [T, E]
    return op.Where(keep, choice, op.Constant(value_float=float("-inf")))


def route(x2d, x_dtype: ir.DataType, gate_weight, bias, E: int, top_k: int, n_group: int, topk_group: int, topk_method: str,
          norm_topk_prob: bool, routed_scaling_factor: float):
    """DeepSeek gate in float32 as model/routing.py defines it: weights [T, K] float32, idx [T, K].

    tests/model/test_routing.py runs it on ONNX Runtime against that definition.
    """
    logits = op.Gemm(_to_float(x2d, x_dtype), _to_float(gate_weight, gate_weight.dtype), transB=1)  # [T, E]
    k = _const([top_k])
    if topk_method == "noaux_tc":
        scores = op.Sigmoid(logits)
        choice = scores if bias is None else op.Add(scores, _to_float(bias, bias.dtype))
        per_group = E // n_group
        grouped = op.Reshape(choice, _const([-1, n_group, per_group]))  # [T, G, E/G]
        top2, _ = op.TopK(grouped, _const([min(2, per_group)]), axis=-1)
        group_scores = op.ReduceSum(top2, _const([-1]), keepdims=0)     # [T, G]
        if topk_group < n_group:
            choice = _keep_best_groups(choice, group_scores, E, n_group, topk_group)
        _, idx = op.TopK(choice, k, axis=-1)
        weights = op.GatherElements(scores, idx, axis=1)
        if norm_topk_prob:
            total = op.ReduceSum(weights, _const([-1]), keepdims=1)
            weights = op.Div(weights, op.Add(total, op.Constant(value_float=1e-20)))
        return op.Mul(weights, op.Constant(value_float=float(routed_scaling_factor))), idx

    scores = op.Softmax(logits, axis=-1)
    choice = scores
    if topk_method == "group_limited_greedy" and topk_group < n_group:
        grouped = op.Reshape(scores, _const([-1, n_group, E // n_group]))
        group_scores = op.ReduceMax(grouped, _const([-1]), keepdims=0)  # [T, G]
        choice = _keep_best_groups(scores, group_scores, E, n_group, topk_group)
    _, idx = op.TopK(choice, k, axis=-1)
    weights = op.GatherElements(scores, idx, axis=1)
    # DeepSeek-V2's published gate scales only when it does not normalize.
    if norm_topk_prob and top_k > 1:
        total = op.ReduceSum(weights, _const([-1]), keepdims=1)
        return op.Div(weights, op.Add(total, op.Constant(value_float=1e-20))), idx
    return op.Mul(weights, op.Constant(value_float=float(routed_scaling_factor))), idx


# ---------------------------------------------------------------- moe: routed experts


def _silu_mul(g, u):
    return op.Mul(op.Mul(g, op.Sigmoid(g)), u)


def experts_moe_op(x2d, x_dtype: ir.DataType, w1, w2, w3, weights, idx, E: int, I: int, D: int, top_k: int):
    """com.microsoft.MoE with external routing; float32 [T, D]."""
    fc1 = op.Reshape(op.Concat(op.Unsqueeze(w1, _const([2])), op.Unsqueeze(w3, _const([2])), axis=2),
                     _const([E, 2 * I, D]))                           # [E, 2I, D]: g0 u0 g1 u1 ...
    logw = op.Log(weights)                                             # [T, K]
    router = _filled(op.Concat(op.Shape(x2d, start=0, end=1), _const([E]), axis=0), NOT_CHOSEN)
    router = op.ScatterElements(router, idx, logw, axis=1)             # [T, E]
    if x_dtype != FLOAT:
        router = op.Cast(router, to=x_dtype)
    y = msft.MoE(x2d, router, fc1, None, w2, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=0)
    total = op.ReduceSum(weights, _const([-1]), keepdims=1)           # [T, 1] Σw
    return op.Mul(_to_float(y, x_dtype), total)


def experts_gather(x2d, x_dtype: ir.DataType, w1, w2, w3, weights, idx):
    """Per token, the K chosen experts' weights gathered from the stacks; float32 [T, D]."""
    xc = op.Unsqueeze(x2d, _const([1, 3]))                             # [T, 1, D, 1]
    g = op.MatMul(op.Gather(w1, idx, axis=0), xc)                      # [T, K, I, 1]
    u = op.MatMul(op.Gather(w3, idx, axis=0), xc)
    y = op.MatMul(op.Gather(w2, idx, axis=0), _silu_mul(g, u))         # [T, K, D, 1]
    y = op.Squeeze(_to_float(y, x_dtype), _const([3]))                          # [T, K, D]
    return op.ReduceSum(op.Mul(y, op.Unsqueeze(weights, _const([2]))), _const([1]), keepdims=0)


def experts_dense(x2d, x_dtype: ir.DataType, w1, w2, w3, weights, idx):
    """All experts on all tokens, combined with a [T, E] matrix that is 0 off the chosen; float32 [T, D]."""
    xt = op.Transpose(x2d, perm=[1, 0])                                # [D, T]
    h = _silu_mul(op.MatMul(w1, xt), op.MatMul(w3, xt))                # [E, I, T]
    y = _to_float(op.MatMul(w2, h), x_dtype)                                  # [E, D, T]
    zeros = op.Mul(op.Unsqueeze(op.ReduceSum(weights, _const([1]), keepdims=0), _const([1])),
                   op.Constant(value_float=0.0))                       # [T, 1]
    combine = op.ScatterElements(op.Expand(zeros, op.Concat(op.Shape(weights, start=0, end=1),
                                                              op.Shape(w1, start=0, end=1), axis=0)),
                                 idx, weights, axis=1)                 # [T, E]
    combine = op.Unsqueeze(op.Transpose(combine, perm=[1, 0]), _const([1]))  # [E, 1, T]
    out = op.ReduceSum(op.Mul(y, combine), _const([0]), keepdims=0)    # [D, T]
    return op.Transpose(out, perm=[1, 0])


def _shared(x2d, w1, w2, w3):
    h = _silu_mul(op.Gemm(x2d, w1, transB=1), op.Gemm(x2d, w3, transB=1))
    return op.Gemm(h, w2, transB=1)


def make_moe(experts: str) -> Callable:
    """The `dsc.moe` translation with the given routed-experts lowering (one of MOE_EXPERTS)."""
    if experts not in MOE_EXPERTS:
        raise ValueError(f"moe experts lowering {experts!r} is not one of {MOE_EXPERTS}")

    def moe(x, gate_weight, e_score_correction_bias, w1, w2, w3, shared_w1, shared_w2, shared_w3,
            top_k: int, n_group: int, topk_group: int, topk_method: str, norm_topk_prob: bool,
            routed_scaling_factor: float):
        E, I, D = (int(d) for d in w1.shape)
        x2d = op.Reshape(x, _const([-1, D]))                           # [T, D]
        weights, idx = route(x2d, x.dtype, gate_weight, e_score_correction_bias, E, top_k, n_group, topk_group,
                             topk_method, bool(norm_topk_prob), routed_scaling_factor)
        if experts == "moe_op":
            out = experts_moe_op(x2d, x.dtype, w1, w2, w3, weights, idx, E, I, D, top_k)
        elif experts == "gather":
            out = experts_gather(x2d, x.dtype, w1, w2, w3, weights, idx)
        else:
            out = experts_dense(x2d, x.dtype, w1, w2, w3, weights, idx)
        if shared_w1 is not None:
            out = op.Add(out, _to_float(_shared(x2d, shared_w1, shared_w2, shared_w3), x.dtype))
        if x.dtype != FLOAT:
            out = op.Cast(out, to=x.dtype)
        return op.Reshape(out, op.Shape(x))

    moe.__name__ = f"dsc_moe_{experts}"
    return moe


def choose_moe_experts(phase: str, dtype: torch.dtype, target: str = "onnxruntime", device: str = "cpu") -> str:
    """The routed-experts lowering for a graph (measured: benchmarks/ort_moe_lowering.py).

    Every choice is a graph whose size does not depend on the number of routed experts.
    Measured (ORT 1.31.1 CPU, 2 threads, D=2048 I=1408 E=16 K=6 + 2 shared, float32, median ms
    of 20 rounds alternating between the lowerings; "grouped" was a per-expert loop of Gemms over
    the tokens that chose each expert, one subgraph per expert, since removed):
        tokens   moe_op   gather    dense   grouped
             1     77.5    221.9    213.6      87.5
           128    611.0        -   1161.2     722.2   (gather: 26.6 GB of gathered weights, not run)
           128    493.8        -   1014.9     616.9   (a second run, 30 rounds)
    The machine was shared (load average 2.5-6 from other work; a quiet run of moe_op at 1 token
    took 11 ms), so the absolute times are high; the ratios come from alternating runs: at 128
    tokens moe_op took 0.80-0.85x the time of grouped and 0.49-0.53x that of dense. So float32 graphs
    use com.microsoft.MoE for prefill and decode, both reading the same fc1 (gate/up
    interleaved) and fc2 weights. Its CPU kernel returns zeros for float16 (measured, ORT
    1.31.1), so half-precision graphs gather the chosen experts for decode (faster than dense at
    1 token) and run all experts densely for prefill (not re-measured in fp16). For ONNX Runtime's
    CUDA provider (`device` "cuda"), which registers com.microsoft.MoE for float, float16 and
    bfloat16, every dtype uses it: the gather and dense forms would read every chosen expert's
    weights per token (gather) or run every expert on every token (dense) on the GPU.
    """
    if target == "tensorrt":
        # TensorRT's ONNX parser has no com.microsoft ops: gather the chosen experts for decode and
        # run all experts densely for prefill, with standard ops only (see `inspect --trt-compat`).
        return "gather" if phase == "decode" else "dense"
    if dtype == torch.float32 or device == "cuda":
        return "moe_op"
    return "gather" if phase == "decode" else "dense"


# ---------------------------------------------------------------- aten ops torchlib lowers too narrowly


def _einsum_matmul(equation: str, a, b):
    """The einsums absorb_mla emits (b: a weight), as MatMuls; None for any other equation.

    ONNX Runtime's CPU Einsum runs these at ~1 GB/s (it transposes and loops itself); MatMul
    broadcasts the heads of the weight over the batch and calls the GEMM kernels.
    """
    if equation == "bhsn,hnc->bhsc":  # reassociate, query side: W_UKᵀ q_nope per head (absorb_mla's form)
        return op.MatMul(a, b)
    if equation == "bshn,hnc->bhsc":  # the same from a query not yet moved to [B, H, S, N]
        return op.MatMul(op.Transpose(a, perm=[0, 2, 1, 3]), b)
    if equation == "bhsc,hvc->bhsv":  # reassociate, output side: W_UV o per head
        return op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))
    if equation == "bsq,hqc->bhsc":  # fold, query side
        return op.MatMul(op.Unsqueeze(a, _const([1])), b)
    if equation == "bhsc,dhc->bsd":  # fold, output side: [B, S, H*C] @ [H*C, D]
        H, C = int(b.shape[1]), int(b.shape[2])
        x = op.Reshape(op.Transpose(a, perm=[0, 2, 1, 3]), _const([0, 0, H * C]))
        return op.MatMul(x, op.Transpose(op.Reshape(b, _const([-1, H * C])), perm=[1, 0]))
    return None


def einsum(equation: str, tensors: Sequence[TensorType], path: Optional[int] = None):
    """aten.einsum (absorb_mla emits it): MatMuls where the equation is known, else ONNX Einsum.

    ONNX Einsum has no bfloat16, so a bfloat16 Einsum runs in float32.
    """
    equation = equation.replace(" ", "")
    if len(tensors) == 2:
        out = _einsum_matmul(equation, *tensors)
        if out is not None:
            return out
    dtype = tensors[0].dtype
    if dtype != ir.DataType.BFLOAT16:
        return op.Einsum(*tensors, equation=equation)
    out = op.Einsum(*[op.Cast(t, to=FLOAT) for t in tensors], equation=equation)
    return op.Cast(out, to=dtype)


def translation_table(moe_experts: str = "moe_op") -> dict:
    return {
        torch.ops.dsc.latent_attention.default: latent_attention,
        torch.ops.dsc.moe.default: make_moe(moe_experts),
        torch.ops.aten.einsum.default: einsum,
        torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
    }
