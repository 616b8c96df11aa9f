"""Structural matching over ATen graphs: what the passes share to recognise a computation by its
operators, shapes and dataflow, whatever the module and weight names of the code that was captured.

A matcher walks from an anchor node (an attention, a router's top-k) through the graph and calls
`need(condition, step, found)` for each fact the rewrite relies on; the first fact that does not
hold raises `Miss(step, found)`, which the pass records (`Unmatched`) instead of rewriting. Nothing
here reads `nn_module_stack` to decide: `hint(node)` only labels a region for messages.

Helpers:
- `source(n)`: back through ops that only re-index or re-type a value (views, transposes,
  expands, contiguous copies, same-size casts) to the node that computes it;
- `weight(program, n)`: the parameter or buffer placeholder behind `n` (through casts and views), or None;
- `linear(program, n)`: `n` read as x @ Wᵀ (+ b) with W a weight (aten.linear, or matmul/mm/addmm of a
  transposed weight);
- `rms_norm(program, n)`: `n` read as w * (x * rsqrt(mean(x², -1) + eps)) (casts allowed);
- `last_dim_parts(n)`: the pieces `n` is assembled from along its last dimension (a cat, or
  slice_scatter writes into an empty tensor), each with its width;
- `split_part(n)`: `n` read as one piece of a split / chunk / slice of a tensor along its last dim;
- `users(n)` / `forward(n)`: the readers of a value (asserts aside); forward through views and casts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from dscompile.errors import DscompileError
from dscompile.passes._edit import param_name

aten = torch.ops.aten

# Ops whose output is their first input re-indexed, re-typed or copied (no arithmetic).
VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.t.default, aten.unflatten.int, aten.flatten.using_ints,
}
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}


class Miss(Exception):
    """One fact a rewrite needs does not hold: the step that checked it and what it found."""

    def __init__(self, step: str, found: str):
        super().__init__(f"{step}: {found}")
        self.step, self.found = step, found


class PassMatchError(DscompileError):
    """A pass found fewer regions of the form it rewrites than the model has, or one it cannot rewrite;
    `unmatched` lists every region it looked at and left alone, with why."""

    def __init__(self, message: str, unmatched: list | None = None):
        super().__init__(message)
        self.unmatched = list(unmatched or [])


@dataclass
class Unmatched:
    """A region a pass looked at and left alone, and why (shown by `export --explain`, kept in the manifest)."""

    region: str
    step: str
    found: str

    def __str__(self) -> str:
        return f"{self.region}: {self.step}: {self.found}"


def need(condition: Any, step: str, found: str) -> None:
    if not condition:
        raise Miss(step, found)


def hint(node: Node) -> str:
    """A label for messages: the innermost module path that produced `node`, else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _cls in stack.values() if path]
    return paths[-1] if paths else node.name


def call(n: Any, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def getitem(n: Any) -> tuple[Node, int] | None:
    """(tuple-producing node, index) for `n = node[i]`."""
    if isinstance(n, Node) and n.op == "call_function" and n.target is operator.getitem:
        return n.args[0], n.args[1]
    return None


def shape(n: Node) -> tuple:
    return tuple(n.meta["val"].shape)


def dtype(n: Node) -> torch.dtype:
    return n.meta["val"].dtype


def is_float_cast(n: Node) -> bool:
    """A cast between floating dtypes (a rounding at most, never a change of value range)."""
    return call(n, *CASTS) and n.meta["val"].is_floating_point() and n.args[0].meta["val"].is_floating_point()


def source(n: Node, *, casts: bool = True) -> Node:
    """Back through views (and float casts) to the node that computes `n`'s values."""
    while isinstance(n, Node) and n.op == "call_function":
        if n.target in VIEWS or (casts and is_float_cast(n)):
            n = n.args[0]
        else:
            break
    return n


def weight(program: ExportedProgram, n: Node) -> str | None:
    """The state_dict name of the parameter/buffer behind `n` (through views and casts), or None."""
    s = source(n)
    return param_name(program, s) if s.op == "placeholder" else None


def scalar(n: Any) -> float | None:
    """A Python number argument (or a 0-d constant), else None."""
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


@dataclass
class Linear:
    node: Node  # the op computing x @ Wᵀ
    x: Node
    weight: Node  # the weight's placeholder
    weight_name: str
    bias: Node | None


def linear(program: ExportedProgram, n: Node) -> Linear:
    """`n` (through views/casts) as x @ Wᵀ (+ b) with W a [out, in] weight of the program."""
    s = source(n)
    if call(s, aten.linear.default):
        w = weight(program, s.args[1])
        need(w is not None, "projection", f"{s.name} multiplies by a computed tensor, not a weight")
        bias = s.args[2] if len(s.args) > 2 else None
        return Linear(s, s.args[0], source(s.args[1]), w, bias)
    if call(s, aten.matmul.default, aten.mm.default, aten.addmm.default):
        x, wt = (s.args[1], s.args[2]) if s.target == aten.addmm.default else s.args[:2]
        bias = s.args[0] if s.target == aten.addmm.default else None
        t = wt if call(wt, aten.t.default, aten.transpose.int, aten.permute.default) else None
        w = weight(program, t.args[0]) if t is not None else None
        need(w is not None, "projection", f"{s.name} is a matmul, but not by a transposed weight")
        return Linear(s, x, source(t.args[0]), w, bias)
    raise Miss("projection", f"{s.name} is {_op(s)}, not a projection by a weight")


@dataclass
class RMSNormMatch:
    x: Node
    weight_name: str | None
    eps: float


def rms_norm(program: ExportedProgram, n: Node) -> RMSNormMatch:
    """`n` as w * (x * rsqrt(mean(x², -1, keepdim) + eps)), dtype casts allowed anywhere."""
    s = source(n)
    w_name = None
    if call(s, aten.mul.Tensor):
        a, b = s.args
        for maybe_w, rest in ((a, b), (b, a)):
            if isinstance(maybe_w, Node) and weight(program, maybe_w) is not None:
                w_name, s = weight(program, maybe_w), source(rest)
                break
    need(call(s, aten.mul.Tensor), "RMSNorm", f"{s.name} is {_op(s)}, not x * rsqrt(mean(x²) + eps)")
    x, r = s.args
    if call(source(x), aten.rsqrt.default):
        x, r = r, x
    r = source(r)
    need(call(r, aten.rsqrt.default), "RMSNorm", f"{s.name} does not scale by an rsqrt")
    add = r.args[0]
    need(call(add, aten.add.Tensor) and scalar(add.args[1]) is not None, "RMSNorm", "rsqrt of something other than mean + eps")
    mean = add.args[0]
    need(call(mean, aten.mean.dim) and list(mean.args[1]) in ([-1], [len(shape(mean)) - 1]) and
         (len(mean.args) > 2 and mean.args[2]), "RMSNorm", "the variance is not a mean over the last dim")
    sq = mean.args[0]
    squared = (call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2) or (call(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1])
    need(squared and source(sq.args[0]) is source(x), "RMSNorm", "the mean is not of the squared input")
    return RMSNormMatch(source(x), w_name, float(add.args[1]))


def last_dim_parts(n: Node) -> list[tuple[Node, int]]:
    """The pieces a tensor is assembled from along its last dim, in order: [(piece, width)].

    Recognised: aten.cat on the last dim, and slice_scatter writes covering an empty/zeros tensor
    (how a functionalized `out = new_empty(...); out[..., :a].copy_(x); out[..., a:].copy_(y)`
    reads). Anything else is one piece, the tensor itself.
    """
    s = source(n, casts=False)
    rank = len(shape(s))
    if call(s, aten.cat.default) and (s.args[1] if len(s.args) > 1 else 0) in (-1, rank - 1):
        return [(p, shape(p)[-1]) for p in s.args[0]]
    if call(s, aten.slice_scatter.default):
        pieces: dict[int, tuple[Node, int]] = {}
        while call(s, aten.slice_scatter.default):
            base, src, dim = s.args[0], s.args[1], s.args[2] if len(s.args) > 2 else 0
            if dim not in (-1, rank - 1) or (s.args[5] if len(s.args) > 5 else 1) != 1:
                return [(n, shape(n)[-1])]
            start = s.args[3] if len(s.args) > 3 and s.args[3] is not None else 0
            if call(src, aten.copy.default):  # a functionalized copy_ into the slice: its values
                src = src.args[1]
            pieces.setdefault(int(start), (src, shape(s.args[1])[-1]))
            s = base
        if not call(s, aten.empty.memory_format, aten.new_empty.default, aten.zeros.default, aten.new_zeros.default,
                    aten.empty_like.default, aten.zeros_like.default):
            return [(n, shape(n)[-1])]
        out, at = [], 0
        for start in sorted(pieces):
            if start != at:
                return [(n, shape(n)[-1])]
            out.append(pieces[start])
            at += pieces[start][1]
        return out if at == shape(n)[-1] else [(n, shape(n)[-1])]
    return [(n, shape(n)[-1])]


def split_part(n: Node) -> tuple[Node, int, int] | None:
    """(tensor, start, width) when `n` is a piece of `tensor` along its last dim: a split /
    split_with_sizes / chunk output, or a unit-step slice; None otherwise."""
    item = getitem(n)
    if item is not None:
        s, i = item
        if call(s, aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default):
            t = s.args[0]
            dim = s.args[2] if len(s.args) > 2 else 0
            if dim not in (-1, len(shape(t)) - 1):
                return None
            widths = [shape(o)[-1] for o in _split_outputs(s)]
            return t, sum(widths[:i]), widths[i]
        return None
    if call(n, aten.slice.Tensor):
        t, dim = n.args[0], n.args[1] if len(n.args) > 1 else 0
        step = n.args[4] if len(n.args) > 4 else 1
        if dim not in (-1, len(shape(t)) - 1) or step != 1:
            return None
        start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
        return t, int(start), shape(n)[-1]
    return None


def _split_outputs(s: Node) -> list:
    vals = s.meta["val"]

    class _V:  # the piece shapes from the op's fake value, one per output
        def __init__(self, v):
            self.meta = {"val": v}

    return [_V(v) for v in vals]


def users(n: Node) -> list[Node]:
    """The nodes that read `n`'s value (tensor-metadata asserts check it, they do not read it)."""
    return [u for u in n.users if not call(u, aten._assert_tensor_metadata.default)]


def forward(n: Node) -> Node:
    """Forward from `n` while its only reader is a view or a float cast of it: the chain's last node."""
    while len(users(n)) == 1:
        (u,) = users(n)
        if u.args and u.args[0] is n and (call(u, *VIEWS) or is_float_cast(u)):
            n = u
        else:
            break
    return n


def _op(n: Any) -> str:
    if not isinstance(n, Node):
        return repr(n)
    if n.op != "call_function":
        return f"a {n.op}"
    return getattr(n.target, "__name__", str(n.target)).replace(".default", "")
