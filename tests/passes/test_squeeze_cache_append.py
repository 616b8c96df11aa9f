"""passes/squeeze_cache_append.py: structure, count, numerics before vs after, and appends it must not touch.

Small exported programs that append to a cache as transformers' DeepSeek attention does (on a
[B, 1, P, C] view of the contract's [B, P, C] past); the transformers capture itself is checked in
test_frontend_transformers.py (two appends per layer).
"""

from __future__ import annotations

import torch
from torch.export import Dim

from helpers import assert_close
from dscompile.passes import PassOptions, squeeze_cache_append

aten = torch.ops.aten
OPTIONS = PassOptions("prefill", args=None)  # the pass reads nothing from the options


class HeadViewAppend(torch.nn.Module):
    """present = cat(unsqueeze(past, 1), new, dim=2), read by the model as [B, 1, T, C] and returned squeezed."""

    def forward(self, past, new):  # past [B, P, C], new [B, S, C]
        full = torch.cat([past.unsqueeze(1), new.unsqueeze(1)], dim=2)  # [B, 1, T, C]
        return full.squeeze(1), full.sum(-1)


class ChannelCat(torch.nn.Module):
    """A cat of the unsqueezed past along its channels: not an append."""

    def forward(self, past, new):
        full = torch.cat([past.unsqueeze(1), 2 * past.unsqueeze(1)], dim=3)  # [B, 1, P, 2C]
        return full.squeeze(1), new.sum(-1)


def _export(module: torch.nn.Module):
    past, new = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    dims = {"past": {1: Dim("past", min=1, max=31)}, "new": {1: Dim("seq", min=1, max=16)}}
    return torch.export.export(module, (past, new), dynamic_shapes=dims, strict=False)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)


def test_append_is_one_cat_on_the_past_with_the_same_values():
    program = _export(HeadViewAppend())
    before = program.module()(*_inputs())
    rewritten, count, unmatched = squeeze_cache_append.run(program, OPTIONS)
    assert (count, unmatched) == (1, [])
    cats = [n for n in rewritten.graph.nodes if n.op == "call_function" and n.target == aten.cat.default]
    assert len(cats) == 1 and cats[0].args[0][0].op == "placeholder" and cats[0].args[1] == 1
    present = rewritten.graph_signature.output_specs[0].arg.name
    assert present == cats[0].name, "the present output is the concatenation on the past itself"
    after = rewritten.module()(*_inputs())
    for a, b in zip(after, before):
        assert_close(a, b, what="squeeze_cache_append before vs after")
    assert squeeze_cache_append.run(program, OPTIONS)[1] == 1, "the caller's program is left as it was"


def test_a_cat_along_another_axis_is_left_alone_with_the_reason():
    program = _export(ChannelCat())
    rewritten, count, unmatched = squeeze_cache_append.run(program, OPTIONS)
    assert count == 0 and rewritten is program
    assert len(unmatched) == 1 and unmatched[0].step == "append" and "dim 3" in unmatched[0].found


def test_an_append_on_the_contract_s_past_has_nothing_to_rewrite():
    class FlatAppend(torch.nn.Module):  # our model's form: already cat(past, new, dim=1)
        def forward(self, past, new):
            full = torch.cat([past, new], dim=1)
            return full, full.sum(-1)

    program = _export(FlatAppend())
    assert squeeze_cache_append.run(program, OPTIONS) == (program, 0, [])
