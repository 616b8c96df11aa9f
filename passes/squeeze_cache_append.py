"""squeeze_cache_append: each cache append written on the contract's [B, P, *] past, not on a [B, 1, P, *] view.

A captured program whose model keeps its cache with a head axis of size 1 (transformers' DeepSeek
attention caches [B, 1, T, C] and [B, 1, T, R]; capture/frontends/transformers.py) appends the new
tokens to an unsqueezed view of the contract's past:
    present = cat(unsqueeze(past, 1), new, dim=2)        past [B, P, C], new [B, 1, S, C]
Identity: that is unsqueeze(cat(past, squeeze(new, 1), dim=1), 1), the same values, so the pass
writes the append as the one concatenation on the past input [B, T, C] that the in-place decode
graph rewrites (lowering/in_place.py), and a reader that squeezes the head axis back (the
contract's present output) reads that concatenation itself.

What it matches (by operators, shapes and dataflow): every aten.cat that has an unsqueeze of a
user input among its operands. It rewrites one whose operands are [unsqueeze(past, 1), new], along
dim 2 of a 4-D result, with `new` of size 1 on dim 1; any other such cat is left as it is and
reported (`Unmatched`). Our model's capture appends on [B, P, *] already and has none.

What it guarantees: the program computes the same values (only views move); no weight changes.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from dscompile.passes._edit import emit, rewrite_matches
from dscompile.passes._match import Miss, Unmatched, call, hint, need, shape

aten = torch.ops.aten


def expected(options) -> int:
    """No count is implied: the config does not say which code was captured (transformers' has two
    appends per layer, ours none); the report still gives the count."""
    return 0


def run(program: ExportedProgram, options) -> tuple[ExportedProgram, int, list[Unmatched]]:
    """Rewrite every cache append on a [B, 1, P, *] view; other cats of an unsqueezed input are reported."""
    return rewrite_matches(program, _match_all, _rewrite)


def _match_all(program: ExportedProgram) -> tuple[list[Node], list[Unmatched]]:
    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    found, unmatched = [], []
    for n in program.graph.nodes:
        if not (call(n, aten.cat.default) and any(_unsqueezed_input(x, user) for x in n.args[0])):
            continue
        try:
            match(n, user)
            found.append(n)
        except Miss as miss:
            unmatched.append(Unmatched(hint(n), miss.step, miss.found))
    return found, unmatched


def _unsqueezed_input(x, user: set[str]) -> bool:
    return call(x, aten.unsqueeze.default) and x.args[0].op == "placeholder" and x.args[0].name in user


def match(cat: Node, user: set[str]) -> None:
    """Raise Miss unless `cat` is cat([unsqueeze(past, 1), new], dim=2) with new [B, 1, S, *]."""
    parts = cat.args[0]
    need(len(parts) == 2, "append", f"{cat.name} concatenates {len(parts)} tensors, not the past and the new tokens")
    first, new = parts
    need(_unsqueezed_input(first, user), "append", f"{cat.name}: the unsqueezed input is not the first operand")
    rank = len(shape(cat))
    dim = cat.args[1] if len(cat.args) > 1 else 0
    need(rank == 4 and dim % rank == 2, "append",
         f"{cat.name} concatenates along dim {dim} of a {rank}-D tensor, not the tokens (dim 2 of [B, 1, T, *])")
    need(first.args[1] % rank == 1, "append", f"{first.name} inserts dim {first.args[1]}, not the head axis 1")
    need(shape(new)[1] == 1, "append", f"the new tokens {list(shape(new))} have {shape(new)[1]} heads, not 1")


def _rewrite(program: ExportedProgram, cat: Node) -> None:
    new, past = cat.args[0][1], cat.args[0][0].args[0]
    with program.graph.inserting_before(cat):
        flat = emit(program, aten.cat.default, [past, emit(program, aten.squeeze.dim, new, 1, like=cat)], 1, like=cat)
        viewed = emit(program, aten.unsqueeze.default, flat, 1, like=cat)  # [B, 1, T, *] for the model's readers
    cat.replace_all_uses_with(viewed)
    for u in list(viewed.users):
        if call(u, aten.squeeze.dim) and u.args[1] == 1:  # the contract's present: the concatenation itself
            u.replace_all_uses_with(flat)
            for spec in program.graph_signature.output_specs:
                if getattr(spec.arg, "name", None) == u.name:
                    spec.arg.name = flat.name
