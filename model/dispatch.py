"""DeepSeekMoE with each routed expert run on its own tokens only: the training forward.

The reference `MoE` (model/transformer.py) runs all E experts on every token and zeroes the
unchosen ones in the combine, which export and the passes rely on; in training that costs E/K
times the expert FLOPs (4x for 8 experts, top-2). Here the same gate picks the same experts and
weights, the L*K (token, expert) pairs are sorted by expert, each expert runs one SwiGLU on its
slice, and the weighted results are added back per token. Gradients reach the gate through the
routing weights, as in the reference. Same parameters, same result within float32 rounding
(tests/model/test_dispatch.py).

`dispatch_experts(model)` swaps this forward in for every MoE layer of a model while it is active
and records how many tokens each expert received: the load that the auxiliary-loss-free balancing
of DeepSeek-V3 (its `e_score_correction_bias` update) reads.

Shapes: L tokens (flattened), D hidden, E routed experts, K experts per token, I expert intermediate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from dscompile.model.transformer import MoE


def moe_dispatch(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output like x, tokens per expert [E] int64): `moe(x)`, computing only the chosen experts."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [L, D]
    with torch.autocast(x.device.type, enabled=False):  # the router stays float32 under bf16 autocast
        weights, idx = moe.gate(x2)  # [L, K] float32, [L, K]
    E, K = moe.experts.gate_proj.shape[0], idx.shape[1]
    flat = idx.reshape(-1)  # [L*K]
    order = flat.argsort(stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=E)  # [E]
    token = order // K  # the token of each sorted pair
    xs = x2.index_select(0, token)  # [L*K, D]
    ys = []
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0] == 0:
            continue
        h = F.silu(xe @ moe.experts.gate_proj[e].T) * (xe @ moe.experts.up_proj[e].T)  # [n, I]
        ys.append(h @ moe.experts.down_proj[e].T)  # [n, D]
    y = torch.cat(ys).float() * weights.reshape(-1)[order, None]  # [L*K, D]
    out = torch.zeros(x2.shape, dtype=torch.float32, device=x.device).index_add(0, token, y).to(x.dtype)
    if hasattr(moe, "shared_experts"):
        out = out + moe.shared_experts(x2)
    return out.view(shape), counts


@contextlib.contextmanager
def dispatch_experts(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every MoE layer of `model` runs `moe_dispatch`; the yielded dict maps each
    MoE module's name to the tokens per expert of its latest forward."""
    loads: dict[str, torch.Tensor] = {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]

    def forward_of(name: str, moe: MoE):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out, counts = moe_dispatch(moe, x)
            loads[name] = counts
            return out

        return forward

    for name, moe in layers:
        moe.forward = forward_of(name, moe)  # an instance attribute shadows the class's forward
    try:
        yield loads
    finally:
        for _, moe in layers:
            del moe.forward
