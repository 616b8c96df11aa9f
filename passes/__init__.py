"""Graph passes over torch.export ExportedPrograms, run as ordered stages.

The stages (`STAGES`, what `export --list-passes` prints), in the order they run:
- cleanup: the captured program in the contract's form, whatever code was captured;
- rewrite: the engine's fused ops (latent attention, MoE);
- sharding: with more than one rank (`options.tp_size` x `options.ep_size`), one program for them all.
`PIPELINE` (cleanup, then rewrite) runs on every graph; `SHARDING` after it, for sharded engines.

Each pass is one module with `run(program, options) -> (program, count, unmatched)`: the program with
`count` regions rewritten and the regions it looked at and left alone, each with the step that
failed (`_match.Unmatched`); `expected(options) -> int`, how many regions the model's config says
the graph has; and optionally `describe(options) -> dict` (e.g. the cost model behind its choice,
shown in the report). Passes decide from the graph alone: the config only sets what to expect.
`run_pipeline` runs a list of them (`PIPELINE` unless told) in order and returns the rewritten
program and a `PassReport`;
a pass that rewrote fewer regions than expected stops it (`PassMatchError`, with the first
region's reason) unless `options.strict` is off. With
`verify=True` the program before and after each pass runs on the same random inputs (random
cache contents too) and an error above the dtype's tolerance stops the pipeline, naming the pass.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import sympy
import torch
from torch.export import ExportedProgram

from dscompile.passes import absorb_mla, fuse_moe, shard, squeeze_cache_append
from dscompile.errors import DscompileError
from dscompile.passes._match import PassMatchError
from dscompile.tolerance import bound as tolerance_bound

CLEANUP = [squeeze_cache_append]
REWRITE = [absorb_mla, fuse_moe]
SHARDING = [shard]
STAGES = {"cleanup": CLEANUP, "rewrite": REWRITE, "sharding": SHARDING}
PIPELINE = [*CLEANUP, *REWRITE]


class PassVerificationError(DscompileError):
    """A pass changed what the program computes by more than the tolerance."""


@dataclass
class PassOptions:
    """What passes may know: the graph's phase, the user's choices and the model fields they need."""

    phase: str  # "prefill" or "decode"
    args: Any  # ModelArgs (passes read its fields, never import model/)
    absorb: str = "auto"  # auto | fold | reassociate | none
    fuse_moe: bool = True
    strict: bool = True  # a pass that rewrites fewer regions than expected stops the pipeline
    tp_size: int = 1  # sharding: tensor-parallel ranks
    ep_size: int = 1  # sharding: expert-parallel ranks
    dynamic_shapes: Any = None  # sharding: the contract's dynamic dims, to re-export the sharded program with


@dataclass
class PassResult:
    name: str
    count: int
    seconds: float
    max_error: float | None = None  # None: not verified
    details: dict[str, Any] = field(default_factory=dict)
    expected: int | None = None
    unmatched: list[dict[str, str]] = field(default_factory=list)  # {"region", "step", "found"}


@dataclass
class PassReport:
    phase: str
    results: list[PassResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "passes": [asdict(r) for r in self.results]}


def _name(p) -> str:
    return p.__name__.rsplit(".", 1)[-1]


def describe_pipeline() -> list[tuple[str, str, str]]:
    """(stage, name, what it does: the first docstring line after "name: ") of each pass, in order: what
    `export --list-passes` prints."""
    return [(stage, _name(p), (p.__doc__ or "").strip().splitlines()[0].removeprefix(f"{_name(p)}: "))
            for stage, passes in STAGES.items() for p in passes]


def run_pipeline(
    program: ExportedProgram, options: PassOptions, *, verify: bool = False, seed: int = 0, passes: list = PIPELINE
) -> tuple[ExportedProgram, PassReport]:
    """Run `passes` in order (module docstring); `verify` needs programs a single process can run
    (not SHARDING's, whose collectives need their ranks)."""
    report = PassReport(options.phase)
    inputs = random_inputs(program, options.args.vocab_size, seed) if verify else None
    before = _run(program, inputs) if inputs is not None else None
    for p in passes:
        name = _name(p)
        start = time.perf_counter()
        program, count, unmatched = p.run(program, options)
        details = p.describe(options) if hasattr(p, "describe") else {}
        expected = p.expected(options)
        result = PassResult(name, count, time.perf_counter() - start, details=details, expected=expected,
                            unmatched=[asdict(u) for u in unmatched])
        if options.strict and count < expected:
            why = f"; {unmatched[0]}" if unmatched else "; the graph has no other region of that form"
            raise PassMatchError(
                f"pass {name} rewrote {count} of the {expected} regions the config implies in the {options.phase} "
                f"graph{why} (--explain lists every region; --absorb none / --no-fuse-moe export without it)",
                unmatched)
        if before is not None and count:
            after = _run(program, inputs)
            result.max_error = max_error(before, after)
            dtype = before[0].dtype if before[0].dtype != torch.float32 else _weight_dtype(program)
            bound = tolerance_bound(dtype, max(float(t.abs().max()) for t in before))
            if not result.max_error <= bound:
                raise PassVerificationError(
                    f"pass {name} changed the {options.phase} graph's outputs by {result.max_error:.3g} "
                    f"(tolerance {bound:.3g})"
                )
            before = after
        elif before is not None:
            result.max_error = 0.0
        report.results.append(result)
    return program, report


def _weight_dtype(program: ExportedProgram) -> torch.dtype:
    for t in program.state_dict.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _run(program: ExportedProgram, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = program.module()(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def random_inputs(program: ExportedProgram, vocab_size: int, seed: int = 0) -> tuple:
    """Inputs of the IO contract with concrete sizes inside the program's ranges.

    Dynamic sizes get distinct small values (so no two dims coincide by accident); the cache gets
    random contents; one batch row is left-padded.
    """
    gen = torch.Generator().manual_seed(seed)
    values: dict[sympy.Symbol, int] = {}
    for i, (sym, rng) in enumerate(sorted(program.range_constraints.items(), key=lambda kv: str(kv[0]))):
        if isinstance(sym, sympy.Symbol):
            lo = max(int(rng.lower), 1)
            values[sym] = min(lo + 1 + i, int(rng.upper) if rng.upper.is_finite else 10**9)
    specs = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"}
    shapes = {}
    for n in specs:
        if n.name in user:
            val = n.meta["val"]
            shapes[n.name] = (
                tuple(int(sympy.sympify(d.node.expr if isinstance(d, torch.SymInt) else d).subs(values)) for d in val.shape),
                val.dtype,
            )
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    ids_shape = shapes[names[0]][0]
    total = shapes[names[2]][0][1]
    B, S = ids_shape
    past = total - S
    ids = torch.randint(0, vocab_size, ids_shape, generator=gen)
    pos = (torch.arange(S) + past).expand(B, S).clone()
    mask = torch.ones(B, total, dtype=torch.int64)
    if B > 1 and total > 1:
        mask[0, 0] = 0  # a left-padded row
    out: list[torch.Tensor] = [ids, pos, mask]
    for name in names[3:]:
        shape, dtype = shapes[name]
        out.append(torch.randn(shape, generator=gen).to(dtype))
    flat = tuple(out)
    return _unflatten(program, flat)


def _unflatten(program: ExportedProgram, flat: tuple) -> tuple:
    """Flat user inputs -> the structure the exported module's forward takes."""
    args_spec = program.call_spec.in_spec
    if args_spec is None:
        return flat
    args, _kwargs = torch.utils._pytree.tree_unflatten(list(flat), args_spec)
    return tuple(args)
