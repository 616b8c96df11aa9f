"""Every GPU check of dscompile in one command, for a GPU machine whose Python environment is not ours.

    pip install --no-deps -e .      # beside the machine's own torch (>= 2.11) and triton (>= 3.6)
    python benchmarks/gpu_check.py --out DIR [--only PART,...] [--skip PART,...]

It installs nothing and needs no network. Each part passes, fails or is skipped with its reason
(no GPU, an onnxruntime without the CUDA provider, no TensorRT, a missing package), and the run
writes DIR/gpu_check.json (every part, its figures and reasons) and DIR/gpu_check.log (what was
printed). Exit 0 when no part failed. On a machine without a CUDA GPU it is a dry run: every GPU
part is skipped with its reason (CI runs it so, tests/e2e/test_gpu_check.py).

Parts, in order:
  environment      versions, GPU, providers, which of our dependencies import
  triton-aot       the kernels compiled ahead of time for sm_80, sm_90a and this GPU's target:
                   no spills, shared memory within the limit (verify/triton_aot.py), in a child process
  triton-kernels   the compiled kernels on V2-Lite and V3 shapes against their torch references, that
                   the kernel (not the fallback) ran, and their bandwidth against the device's
                   measured copy bandwidth (targets: MLA decode >= 70% at batch 1-8, context 4096;
                   MoE within 1.5x of its bytes floor at one token)
  torch-engine     tiny v2 and v3 exports, float32 and bfloat16, on the torch backend on CUDA: greedy
                   tokens equal eager's, `compare` within its bound, device memory against weights.bin
  ort-cuda         the same exports plus float16, int4 (CPU-lowered) and the int4/int8 float16/bfloat16
                   engines exported for CUDA (--device cuda) on ONNX Runtime's CUDA provider, where it exists
  tensorrt         a TensorRT build of the tiny v3 export and its `compare`, where TensorRT is installed
It is sized to finish within 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PARTS = ("environment", "triton-aot", "triton-kernels", "torch-engine", "ort-cuda", "tensorrt")
DEPENDENCIES = ("torch", "triton", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "safetensors", "numpy", "typer",
                "tokenizers", "jinja2", "tensorrt")


class Skip(Exception):
    """A part that cannot run here, with the reason."""


def _gpu() -> str | None:
    """Why there is no usable CUDA GPU, or None when there is one."""
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable ({err})"
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _need_gpu() -> None:
    why = _gpu()
    if why:
        raise Skip(why)


def _need(*modules: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        raise Skip(f"not importable: {', '.join(missing)}")


def environment(work: Path) -> dict:
    found = {}
    for name in DEPENDENCIES:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # a broken install is reported, not fatal
            found[name] = f"missing: {type(err).__name__}: {err}"
    out = {"python": platform.python_version(), "packages": found, "gpu": None}
    if _gpu() is None:
        import torch

        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gb":
                      round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                      "cuda": torch.version.cuda}
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return out


def triton_aot(work: Path) -> dict:
    _need_gpu()  # the dry run leaves the minutes of compiles to tests/runtime/test_triton_aot.py
    _need("triton")
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "dscompile.verify.triton_aot", "--json", "--targets", "sm_80,sm_90a"],
                          env=env, capture_output=True, text=True, timeout=420)
    if not done.stdout.strip():
        raise RuntimeError(f"triton_aot printed nothing: {done.stderr[-1500:]}")
    report = json.loads(done.stdout)
    bad = [r for r in report["kernels"] if not r["ok"]]
    return {"passed": not bad, "device_capability": f"{major}.{minor}", "compiled": len(report["kernels"]),
            "failed": bad, "kernels": report["kernels"]}


def triton_kernels(work: Path) -> dict:
    _need_gpu()
    _need("triton")
    import torch

    import dscompile.runtime.ops  # noqa: F401  (registers the ops)
    from dscompile.runtime.ops import kernels
    from dscompile.runtime.ops.latent_attention import latent_attention_reference
    from dscompile.runtime.ops.moe import moe_experts_reference, route
    from dscompile.tolerance import OP_TOLERANCE
    from dscompile.verify.triton_aot import model_shapes

    from gpu_kernels import copy_bandwidth_gbs, time_ms  # benchmarks/gpu_kernels.py, beside this file

    copy_gbs = copy_bandwidth_gbs(reps=20)
    rows, failures = [], []
    g = torch.Generator(device="cuda").manual_seed(0)
    for model in ("v2-lite", "v3"):
        s = model_shapes(model)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            rel = OP_TOLERANCE[dtype]  # an op's output against its float32 reference, relative to the largest value
            for B in (1, 8):
                T = 4096
                q = torch.randn(B, s["H"], 1, s["C"], device="cuda", dtype=dtype, generator=g)
                qr = torch.randn(B, s["H"], 1, s["R"], device="cuda", dtype=dtype, generator=g)
                kv = torch.randn(B, T, s["C"], device="cuda", dtype=dtype, generator=g)
                kr = torch.randn(B, T, s["R"], device="cuda", dtype=dtype, generator=g)
                mask = torch.zeros(B, 1, 1, T, device="cuda", dtype=dtype)
                scale = (s["C"] + s["R"]) ** -0.5
                before = kernels.CALLS[("latent_attention", "triton")]
                out = torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, scale)
                ran = kernels.CALLS[("latent_attention", "triton")] == before + 1
                ref = latent_attention_reference(q.float(), qr.float(), kv.float(), kr.float(), mask.float(), scale)
                err = float((out.float() - ref).abs().max())
                bound = rel * max(1.0, float(ref.abs().max()))
                ms = time_ms(lambda: torch.ops.dsc.latent_attention(q, qr, kv, kr, mask, scale), 20)
                moved = kv.nbytes + kr.nbytes + mask.nbytes + 2 * q.nbytes + qr.nbytes
                row = dict(kernel="latent_attention", model=model, dtype=str(dtype), B=B, T=T, ms=round(ms, 4),
                           max_abs_err=err, bound=bound, triton_ran=ran,
                           pct_copy_bandwidth=round(100 * moved / ms / 1e6 / copy_gbs, 1))
                rows.append(row)
                if not ran or err > bound:
                    failures.append(row)
            # The routed experts at one decode token and at 128 tokens.
            # Up to 64 of the routed experts (V3's 256 in float32, with float32 copies for the reference,
            # would take most of an 80 GB GPU); what a kernel does per expert does not depend on their number.
            E, I, D, K = min(s["E"], 64), s["I"], s["D"], s["K"]
            w1 = torch.randn(E, I, D, device="cuda", dtype=dtype, generator=g) * D ** -0.5
            w3 = torch.randn(E, I, D, device="cuda", dtype=dtype, generator=g) * D ** -0.5
            w2 = torch.randn(E, D, I, device="cuda", dtype=dtype, generator=g) * I ** -0.5
            gate = torch.randn(E, D, device="cuda", dtype=dtype, generator=g)
            for tokens in (1, 128):
                x = torch.randn(tokens, D, device="cuda", dtype=dtype, generator=g)
                weights, idx = route(x, gate, None, K, 1, 1, "greedy", True, 1.0)
                from dscompile.runtime.ops.triton_kernels import triton_moe_experts

                out = triton_moe_experts(x, w1, w2, w3, weights, idx)
                ref = moe_experts_reference(x.float(), w1.float(), w2.float(), w3.float(), weights, idx)
                err = float((out - ref).abs().max())
                bound = rel * max(1.0, float(ref.abs().max()))
                ms = time_ms(lambda: triton_moe_experts(x, w1, w2, w3, weights, idx), 20)
                floor_ms = int(torch.unique(idx).numel()) * 3 * I * D * w1.element_size() / copy_gbs / 1e6
                row = dict(kernel="moe_experts", model=model, dtype=str(dtype), tokens=tokens, ms=round(ms, 4),
                           max_abs_err=err, bound=bound, times_bytes_floor=round(ms / floor_ms, 2))
                rows.append(row)
                if err > bound:
                    failures.append(row)
    return {"passed": not failures, "copy_gbs": round(copy_gbs, 1), "failed": failures, "rows": rows}


QUANT_VARIANT = "v2-lite-q"  # the quantized engines' checkpoint (see _checkpoint)


def _checkpoint(work: Path, variant: str) -> Path:
    """The tiny checkpoint of `variant` every part exports, made once per run. QUANT_VARIANT is v2-lite
    with 128-wide experts: every quantized input dimension a multiple of the block size 32 (v2/v3's
    q_lora_rank 48 is not), and expert widths that CUDA's QMoE tiles take."""
    from dataclasses import replace

    from dscompile.model.synthetic import make_checkpoint, random_state, tiny_args, write_checkpoint

    ckpt = work / f"ckpt-{variant}"
    if not ckpt.exists() and variant == QUANT_VARIANT:
        args = replace(tiny_args("v2-lite", layers=2, experts=8, hidden=128, heads=4, vocab=512),
                       moe_intermediate_size=128)
        write_checkpoint(ckpt, args, random_state(args, 0))
    elif not ckpt.exists():
        make_checkpoint(ckpt, variant, layers=2, experts=8, hidden=128, heads=4, vocab=512)
    return ckpt


def _exports(work: Path, kinds: list[tuple]) -> dict[tuple, Path]:
    """Tiny checkpoints and their exports: {(variant, dtype, weights[, device]): OUT}; device "cpu" when
    a kind does not name one (`export --device`)."""
    import dscompile

    outs = {}
    for kind in kinds:
        variant, dtype, weights, device = (tuple(kind) + ("cpu",))[:4]
        ckpt = _checkpoint(work, variant)
        out = work / (f"out-{variant}-{dtype}-{weights or 'float'}" + ("" if device == "cpu" else f"-{device}"))
        if not out.exists():
            options = {"dtype": dtype} if weights is None else {"weights": weights}
            if weights is not None and dtype != "float32":
                options["dtype"] = dtype
            if device != "cpu":
                options["device"] = device
            dscompile.export(ckpt, out, **options)
        outs[tuple(kind)] = out
    return outs


def _greedy_same(engine, eager, vocab: int) -> bool:
    prompt = [[(7 * i + 3) % vocab for i in range(12)]]
    return engine.generate(prompt, 8) == eager.generate(prompt, 8)


def torch_engine(work: Path) -> dict:
    _need_gpu()
    _need("onnx", "onnx_ir", "onnxscript", "safetensors")
    import torch

    import dscompile
    from dscompile.runtime.session import open_engine
    from dscompile.verify.compare import eager_for

    rows = []
    for (variant, dtype, _), out in _exports(work, [(v, d, None) for v in ("v2", "v3")
                                                     for d in ("float32", "bfloat16")]).items():
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        engine = open_engine(out, backend="torch", provider="cuda")
        held = torch.cuda.memory_allocated() - base
        weights_bytes = (out / "weights.bin").stat().st_size
        same = _greedy_same(engine, eager_for(_checkpoint(work, variant)), engine.info.vocab_size) \
            if dtype == "float32" else None
        report = dscompile.compare(_checkpoint(work, variant), out, backend="torch", provider="cuda")
        rows.append(dict(variant=variant, dtype=dtype, passed=report["passed"], greedy_equal=same,
                         device_bytes=held, weights_bin_bytes=weights_bytes,
                         device_over_weights=round(held / weights_bytes, 3)))
        del engine
    failed = [r for r in rows if not r["passed"] or r["greedy_equal"] is False or r["device_over_weights"] > 1.05]
    return {"passed": not failed, "failed": failed, "rows": rows}


def ort_cuda(work: Path) -> dict:
    _need_gpu()
    _need("onnxruntime", "onnx", "onnx_ir", "onnxscript", "safetensors")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(f"this onnxruntime has no CUDA provider (it has {onnxruntime.get_available_providers()})")
    import dscompile

    rows = []
    # float engines; the CPU-lowered int4 engine (float32 activations: its QMoE runs on the CPU provider);
    # the quantized engines lowered for CUDA (float16/bfloat16 activations, MatMulNBits/QMoE on the GPU),
    # each against eager with the same fake-quantized weights (dscompile.compare)
    kinds = [("v3", d, None) for d in ("float32", "float16", "bfloat16")] + [(QUANT_VARIANT, "float32", "int4")] + \
            [(QUANT_VARIANT, d, w, "cuda") for d in ("float16", "bfloat16") for w in ("int4", "int8")]
    for kind, out in _exports(work, kinds).items():
        variant, dtype, weights = kind[:3]
        device = kind[3] if len(kind) > 3 else "cpu"
        row = dict(variant=variant, dtype=dtype, weights=weights, device=device)
        try:
            report = dscompile.compare(_checkpoint(work, variant), out, backend="onnxruntime", provider="cuda")
            worst = max(report["steps"], key=lambda s: s["logits"]["max_abs"] / max(s["atol"], 1e-30))
            rows.append(dict(row, passed=report["passed"], max_abs=worst["logits"]["max_abs"], atol=worst["atol"],
                             rel_rms=worst["logits"].get("rel_rms")))
        except Exception as err:  # one export kind failing is a finding, the others still run
            rows.append(dict(row, passed=False, error=f"{type(err).__name__}: {err}"))
    failed = [r for r in rows if not r["passed"]]
    return {"passed": not failed, "failed": failed, "rows": rows}


def tensorrt(work: Path) -> dict:
    _need_gpu()
    _need("tensorrt", "onnx", "onnx_ir", "onnxscript", "safetensors")
    import dscompile

    ckpt = _checkpoint(work, "v3")
    out = work / "out-v3-tensorrt"
    if not out.exists():
        dscompile.export(ckpt, out, target="tensorrt")
    report = dscompile.compare(ckpt, out, backend="tensorrt")
    return {"passed": report["passed"], "report": {k: report[k] for k in ("passed",) if k in report}}


RUNNERS = {"environment": environment, "triton-aot": triton_aot, "triton-kernels": triton_kernels,
           "torch-engine": torch_engine, "ort-cuda": ort_cuda, "tensorrt": tensorrt}


def run(out: Path, parts: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    results = {}
    for name in parts:
        start = time.perf_counter()
        try:
            result = RUNNERS[name](work)
            status = "passed" if result.pop("passed", True) else "failed"
            results[name] = {"status": status, **result}
        except Skip as why:
            results[name] = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # a crashing part is recorded with its traceback; the next part runs
            results[name] = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        line = f"{name:15} {results[name]['status']:8} {results[name]['seconds']:7.1f} s"
        if results[name]["status"] != "passed":
            line += f"  {results[name].get('reason') or results[name].get('error', '')}"
        print(line, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--only", default="", help=f"comma-separated parts ({', '.join(PARTS)})")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out")
    args = parser.parse_args(argv)
    only = [p for p in args.only.split(",") if p]
    skip = [p for p in args.skip.split(",") if p]
    for p in only + skip:
        if p not in PARTS:
            print(f"error: unknown part {p!r}: the parts are {', '.join(PARTS)}", file=sys.stderr)
            return 2
    parts = [p for p in (only or PARTS) if p not in skip]
    args.out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            sys.__stdout__.write(text)
            log.write(text)
            return len(text)

    with contextlib.redirect_stdout(Tee()):
        started = time.perf_counter()
        results = run(args.out, parts)
        total = round(time.perf_counter() - started, 1)
        failed = [p for p, r in results.items() if r["status"] == "failed"]
        print(f"{'FAILED' if failed else 'PASSED'} | {len(parts)} parts in {total} s"
              + (f" | failed: {', '.join(failed)}" if failed else ""))
    (args.out / "gpu_check.json").write_text(json.dumps({"parts": results, "seconds": total}, indent=2, default=str))
    (args.out / "gpu_check.log").write_text(log.getvalue())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
