"""torch.export capture of the step of the engine contract (runtime/contract.py), from which both
graphs, "prefill" and "decode", are made.

Both take (input_ids [B, S], position_ids [B, S], attention_mask [B, P+S], past) where past is,
per layer, (kv_latent [B, P, C], k_rope [B, P, R]), and return (logits [B, S, V], present) with
present the cache grown by S tokens. Prefill has S >= 1 and P >= 0; decode has S == 1.
Batch, new tokens and past length are dynamic. Capture runs as well on a model whose weights
live on the meta device, so a 671B config is captured without its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from dscompile.runtime.contract import step_inputs


@dataclass(frozen=True)
class Limits:
    """Largest sizes the engines accept (dynamic-dim ranges of the captured graphs). The defaults are
    ExportOptions' (exporter/options.py), so a bare capture has the ranges of a default export."""

    max_batch: int = 64
    max_prompt_tokens: int = 4096  # prefill S
    max_context: int = 16384  # P + S

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_prompt_tokens < 1 or self.max_context < self.max_prompt_tokens:
            raise ValueError(f"invalid limits {self}: need max_batch >= 1, 1 <= max_prompt_tokens <= max_context")
        # The trace needs S >= 2 and P >= 2 in its example (torch.export specializes sizes 0 and 1).
        if self.max_prompt_tokens < 2 or self.max_context < self.example_new + 2:
            raise ValueError(f"invalid limits {self}: need max_prompt_tokens >= 2 and max_context >= "
                             f"{min(3, max(self.max_prompt_tokens, 2)) + 2}")

    @property
    def example_batch(self) -> int:
        return min(2, self.max_batch)

    @property
    def example_new(self) -> int:
        return min(3, self.max_prompt_tokens)

    @property
    def example_past(self) -> int:
        return min(4, self.max_context - self.example_new)


class ContractModule(nn.Module):
    """The model behind the IO contract: flat cache tuples in, logits and present cache out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, past):
        return self.model(input_ids, position_ids, attention_mask, [tuple(p) for p in past])


def example_inputs(model: nn.Module, batch: int = 2, new: int = 3, past: int = 4, seed: int = 0):
    """Inputs of the contract on the model's device and cache dtype (random cache contents)."""
    args = model.args
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    gen = torch.Generator().manual_seed(seed)
    ids, pos, mask = (t.to(device) for t in step_inputs(torch.randint(0, args.vocab_size, (batch, new), generator=gen),
                                                        past))
    cache = [
        (
            torch.randn(batch, past, args.kv_lora_rank, generator=gen).to(device=device, dtype=dtype),
            torch.randn(batch, past, args.qk_rope_head_dim, generator=gen).to(device=device, dtype=dtype),
        )
        for _ in range(args.num_hidden_layers)
    ]
    return ids, pos, mask, cache


def capture(model: nn.Module, limits: Limits = Limits()) -> ExportedProgram:
    """Export the contract's step with dynamic batch, new tokens and past length: one program that
    both graphs start from (the passes then specialize it for prefill and for decode)."""
    # Decode is traced with S dynamic as well: with S fixed at 1, torch.export relates
    # total = past + 1 and its 0/1 specialization then forbids P < 2. The graph stays the same
    # function; the decode graph differs by its passes (cost model of one new token).
    inputs = example_inputs(model, limits.example_batch, limits.example_new, limits.example_past)
    with torch.no_grad():
        return torch.export.export(ContractModule(model), inputs, dynamic_shapes=contract_dims(model.args, limits),
                                   strict=False)


def contract_dims(args, limits: Limits) -> dict:
    """The dynamic dims of the contract's inputs: batch, new tokens, past and total = past + new."""
    # A batch limit of 1 is a static dim: a dynamic one would need an example of 2.
    batch = Dim("batch", min=1, max=limits.max_batch) if limits.max_batch > 1 else None
    seq = Dim("seq", min=1, max=limits.max_prompt_tokens)
    past = Dim("past", min=0, max=limits.max_context - 1)
    total = Dim("total", min=1)  # == past + seq, derived by export; its bound follows from theirs
    return {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past": [({0: batch, 1: past}, {0: batch, 1: past}) for _ in range(args.num_hidden_layers)],
    }
