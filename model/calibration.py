"""Calibration for quantization: the mean squared input activation of every quantized weight, per
input channel, measured by running the eager model on a text (llama.cpp's importance matrix).

A linear layer y = W x quantized to Ŵ errs by (W - Ŵ) x; its expected squared error per output is
Σ_j E[x_j²] (w_j - ŵ_j)² when the channels are uncorrelated, so E[x_j²] says how much an error in
input channel j costs (model/quant.py quantize_weighted uses it to choose each block's scale).
Collected per linear layer (`nn.Linear` modules whose weight is quantized), and per routed expert
over the tokens routed to it: the expert's gate/up input (the MoE input of those tokens) and its
down input (silu(gate) · up of those tokens). An expert no token reached gets uniform importance
(the plain squared error).

The text runs in non-overlapping windows of `window` tokens, each from an empty cache.

Shape legend: L tokens, D hidden, I expert intermediate, E routed experts, K input channels.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dscompile.model.quant import is_quantized
from dscompile.model.transformer import Experts, Transformer

CALIBRATION_FILE = "calibration.safetensors"  # in OUT: the importance an export was calibrated with


class _Sums:
    """Σ x² per input channel and the count of rows, for one weight ([K]) or one per expert ([E, K])."""

    def __init__(self, shape: tuple[int, ...]):
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(shape[:-1] or (1,), dtype=torch.float64)

    def mean(self) -> torch.Tensor:
        seen = self.count > 0
        mean = self.total / self.count.clamp(min=1).reshape(*self.total.shape[:-1], 1)
        if self.total.dim() == 2:  # experts no token reached: uniform
            mean[~seen] = 1.0
        return mean.float()


def collect_importance(model: Transformer, ids: list[int], window: int,
                       progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """({our parameter name: mean x² per input channel ([K], or [E, K] for routed experts)}, stats)
    of every quantized weight of `model` (float32, real weights) on token ids `ids`."""
    sums: dict[str, _Sums] = {}
    hooks = []

    def linear_hook(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = sums.setdefault(name, _Sums((x.shape[-1],)))
            s.total += x.pow(2).sum(0)
            s.count += x.shape[0]
        return hook

    def experts_hook(prefix: str):
        def hook(module: Experts, args):
            x, combine = args[0].detach(), args[1].detach()  # [L, D], [L, E]
            E, I, D = module.gate_proj.shape
            gate_up = sums.setdefault(f"{prefix}.gate_proj", _Sums((E, D)))
            down = sums.setdefault(f"{prefix}.down_proj", _Sums((E, I)))
            for e in range(E):
                routed = combine[:, e] != 0
                if not routed.any():
                    continue
                xe = x[routed]
                h = F.silu(xe @ module.gate_proj[e].T) * (xe @ module.up_proj[e].T)  # [l, I]
                gate_up.total[e] += xe.double().pow(2).sum(0)
                down.total[e] += h.double().pow(2).sum(0)
                gate_up.count[e] += xe.shape[0]
                down.count[e] += xe.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_quantized(f"{name}.weight"):
            hooks.append(module.register_forward_pre_hook(linear_hook(f"{name}.weight")))
        elif isinstance(module, Experts):
            hooks.append(module.register_forward_pre_hook(experts_hook(f"{name}")))
    tokens = torch.as_tensor(list(ids), dtype=torch.int64)
    starts = list(range(0, max(1, tokens.numel() - 1), window))
    try:
        with torch.no_grad():
            for i, start in enumerate(starts):
                model(tokens[start:start + window].reshape(1, -1))
                if progress is not None:
                    progress(i + 1, len(starts))
    finally:
        for h in hooks:
            h.remove()
    importance = {name: s.mean() for name, s in sorted(sums.items())}
    for name in [n for n in importance if n.endswith("experts.gate_proj")]:
        importance[name.replace("gate_proj", "up_proj")] = importance[name].clone()  # the same input
    unseen = sum(int((s.count == 0).sum()) for n, s in sums.items() if n.endswith("experts.gate_proj"))
    experts = sum(int(s.count.numel()) for n, s in sums.items() if n.endswith("experts.gate_proj"))
    return importance, {"tokens": int(tokens.numel()), "windows": len(starts), "window": window,
                        "weights": len(importance), "experts_unreached": unseen, "experts": experts}
