"""The Triton kernels compiled ahead of time for NVIDIA GPUs, on a machine without one.

A GPU is not needed to know whether a kernel compiles for a target, how many registers it takes,
whether ptxas spills them to local memory and how much shared memory it asks for: `triton.compile`
lowers a kernel to PTX for any `GPUTarget`, and the ptxas that ships with Triton assembles it.
This module does that for every launch the kernel wrappers (runtime/ops/triton_kernels.py) make
on the published DeepSeek-V2-Lite and V3 shapes (read from model/configs): decode attention over
the latent cache at batch 1 and 8, and the routed experts at one decode step (small M blocks) and
a 512-token prefill (large ones), in float32, bfloat16 and float16. The wrappers run under
`triton_kernels.recording()` on meta tensors, so the configurations compiled here are the ones a
real call launches: block sizes, warps, stages, constexprs, and which integers are specialised
(a pointer or an integer divisible by 16 is compiled as such, as Triton's launcher does).

Checks per launch: it compiles; ptxas reports no spill stores or loads; the shared memory it asks
for fits the target's per-block limit (sm_80: 163 KB, sm_90a: 227 KB).

    python -m dscompile.verify.triton_aot [--targets sm_80,sm_90a] [--models v2-lite,v3]
        [--dtypes float32,bfloat16,float16] [--phases decode,prefill] [--json]

Triton must have been imported for its compiler (not with TRITON_INTERPRET=1) in the process that
runs this: its language's library functions are bound to one mode per process.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Per-block shared memory a kernel may opt into, bytes (CUDA programming guide, compute capabilities).
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90a": (90, 227 * 1024)}
MODELS = {"v2-lite": "deepseek-v2-lite.json", "v3": "deepseek-v3.json"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PHASES = ("decode", "prefill")
_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
            torch.int32: "*i32"}


@dataclass
class Compiled:
    """One launch configuration compiled for one target."""

    kernel: str
    target: str
    config: str  # what the launch was made for (model, dtype, phase)
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    shared_bytes: int
    shared_limit: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and not self.spill_stores and not self.spill_loads
                and self.shared_bytes <= self.shared_limit)


def model_shapes(model: str) -> dict[str, int]:
    """The sizes the kernels see, from the published config in model/configs."""
    from dscompile.model.args import PUBLISHED_CONFIGS

    cfg = json.loads((PUBLISHED_CONFIGS / MODELS[model]).read_text())
    return {"H": cfg["num_attention_heads"], "C": cfg["kv_lora_rank"], "R": cfg["qk_rope_head_dim"],
            "D": cfg["hidden_size"], "I": cfg["moe_intermediate_size"], "E": cfg["n_routed_experts"],
            "K": cfg["num_experts_per_tok"]}


def launches(model: str, dtype: torch.dtype, phase: str, target: str = "sm_90a") -> list:
    """The kernel launches the wrappers make for one model, dtype and phase on `target` (meta tensors)."""
    from dscompile.runtime.ops import triton_kernels as tk

    s = model_shapes(model)
    meta = dict(device="meta", dtype=dtype)
    found = []
    with tk.recording(capability=(TARGETS[target][0] // 10, TARGETS[target][0] % 10)) as recorded:
        if phase == "decode":  # attention over the latent cache: one new token, batch 1 and 8, 4k context
            for B in (1, 8):
                T = 4096
                q, qr = torch.empty(B, s["H"], 1, s["C"], **meta), torch.empty(B, s["H"], 1, s["R"], **meta)
                kv, kr = torch.empty(B, T, s["C"], **meta), torch.empty(B, T, s["R"], **meta)
                mask = torch.empty(B, 1, 1, T, **meta)
                tk.triton_latent_attention(q, qr, kv, kr, mask, (s["C"] + s["R"]) ** -0.5)
        tokens = 8 if phase == "decode" else 512
        x = torch.empty(tokens, s["D"], **meta)
        w1, w3 = torch.empty(s["E"], s["I"], s["D"], **meta), torch.empty(s["E"], s["I"], s["D"], **meta)
        w2 = torch.empty(s["E"], s["D"], s["I"], **meta)
        weights = torch.empty(tokens, s["K"], device="meta", dtype=torch.float32)
        idx = torch.empty(tokens, s["K"], device="meta", dtype=torch.int64)
        tk.triton_moe_experts(x, w1, w2, w3, weights, idx)
        found.extend(recorded)
    return found


def _signature(launch) -> tuple[dict, dict]:
    """Triton's signature and specialisation attributes for a recorded launch (as its launcher
    derives them: pointers aligned to 16 bytes, integers divisible by 16 unless left dynamic)."""
    from triton.runtime.jit import JITFunction

    names = JITFunction(launch.fn).arg_names
    signature, attrs = {}, {}
    runtime = [n for n in names if n not in launch.constexprs]
    for i, (name, value) in enumerate(zip(runtime, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER[value.dtype]
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -2**31 <= int(value) < 2**31 else "i64"
            if name not in launch.dynamic and int(value) % 16 == 0:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for name in launch.constexprs:
        signature[name] = "constexpr"
    return {n: signature[n] for n in names}, attrs


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: str) -> tuple[int | None, int | None, int | None]:
    """Registers, spill store and spill load bytes, from ptxas -v on the kernel's PTX."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                               str(src), "-o", str(Path(tmp) / "kernel.o")], capture_output=True, text=True)
    log = done.stdout + done.stderr
    regs, spills = _PTXAS.search(log), _SPILLS.search(log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None,
            int(spills.group(2)) if spills else None)


def compile_launch(launch, target: str, config: str) -> Compiled:
    """`launch` compiled for `target` (a TARGETS key), with ptxas' register and spill report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    capability, limit = TARGETS[target]
    signature, attrs = _signature(launch)
    constexprs = {k: (str(v) if not isinstance(v, (int, float, str, bool)) else v) for k, v in launch.constexprs.items()}
    row = dict(kernel=launch.fn.__name__, target=target, config=config, constexprs=constexprs,
               num_warps=int(launch.options.get("num_warps", 4)), num_stages=int(launch.options.get("num_stages", 3)),
               shared_limit=limit)
    try:
        src = ASTSource(JITFunction(launch.fn), signature, dict(launch.constexprs), attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": row["num_warps"], "num_stages": row["num_stages"]})
    except Exception as err:  # a kernel that does not compile is the finding, reported with its message
        return Compiled(**row, registers=None, spill_stores=None, spill_loads=None, shared_bytes=0,
                        error=f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    regs, stores, loads = _ptxas_report(kernel.asm["ptx"], target)
    return Compiled(**row, registers=regs, spill_stores=stores, spill_loads=loads,
                    shared_bytes=int(kernel.metadata.shared))


def compile_all(targets=tuple(TARGETS), models=tuple(MODELS), dtypes=tuple(DTYPES), phases=PHASES,
                progress=None) -> list[Compiled]:
    """Every distinct launch of the given models, dtypes and phases compiled for each target."""
    from dscompile.runtime.ops.triton_kernels import interpreting

    if interpreting():
        raise RuntimeError("Triton was imported for its interpreter in this process (TRITON_INTERPRET=1): "
                           "compile ahead of time in a process without it")
    unique: dict[tuple, tuple] = {}
    for target in targets:
        for model in models:
            for dtype in dtypes:
                for phase in phases:
                    for launch in launches(model, DTYPES[dtype], phase, target):
                        sig, attrs = _signature(launch)
                        key = (target, launch.fn.__name__, json.dumps(sig), repr(sorted(attrs.items())),
                               repr(sorted((k, str(v)) for k, v in launch.constexprs.items())),
                               repr(sorted(launch.options.items())))
                        unique.setdefault(key, (launch, target, f"{model} {dtype} {phase}"))
    jobs = list(unique.values())
    results = []
    for i, job in enumerate(jobs):
        results.append(compile_launch(*job))
        if progress is not None:
            progress(i + 1, len(jobs))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    chosen = {}
    for name, table in (("targets", TARGETS), ("models", MODELS), ("dtypes", DTYPES), ("phases", PHASES)):
        chosen[name] = tuple(v for v in getattr(args, name).split(",") if v)
        unknown = [v for v in chosen[name] if v not in table]
        if unknown:
            print(f"error: --{name} {unknown[0]!r} is not one of {', '.join(table)}", file=sys.stderr)
            return 2
    results = compile_all(**chosen, progress=None if args.json else
                          lambda done, total: print(f"\rcompiled {done}/{total}", end="", file=sys.stderr))
    ok = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "kernels": [dict(asdict(r), ok=r.ok) for r in results]}, indent=2))
    else:
        print(file=sys.stderr)
        for r in results:
            status = "ok" if r.ok else "FAIL"
            print(f"{status:4} {r.target:6} {r.kernel:22} {r.config:24} warps {r.num_warps} regs {r.registers} "
                  f"spills {r.spill_stores}/{r.spill_loads} B smem {r.shared_bytes}/{r.shared_limit} B"
                  + (f"  {r.error}" if r.error else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
