"""The Python API: what the `dscompile` command runs, as functions.

    import dscompile

    dscompile.export("ckpt", "out", weights="int4")      # checkpoint -> engine folder
    llm = dscompile.load("out")                          # engine + its tokenizer
    llm.generate("The compiler")                         # text in, text out
    report = dscompile.compare("ckpt", "out")            # numerics against PyTorch eager

Long steps report to `progress(stage, done, total)` when given. Errors a user can cause are
`dscompile.DscompileError` subclasses with a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dscompile.errors import OptionError

Progress = Callable[[str, int, int], None]


def load(out: str | Path, backend: str = "onnxruntime", provider: str = "auto", threads: int | None = None):
    """Open an engine folder: a `TextEngine` (runtime/session.py) with generate, stream and chat.

    backend: onnxruntime (provider auto, cpu, cuda or tensorrt), torch (the exported programs;
    provider picks the device) or tensorrt (the engines `export(target="tensorrt")` built).
    threads: intra-op threads (default: the backend's).
    """
    from dscompile.runtime.session import TextEngine

    return TextEngine.open(out, backend=backend, provider=provider, threads=threads)


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    weights: str | None = None,
    block_size: int = 32,
    absorb: str = "auto",
    fuse_moe: bool = True,
    verify: bool = False,
    opset: int = 23,
    target: str = "onnxruntime",
    precision: str = "fp16",
    max_batch: int = 64,
    max_prompt_tokens: int = 4096,
    max_context: int = 16384,
    force: bool = False,
    allow_nonfinite: bool = False,
    graphs_only: bool = False,
    frontend: str = "dscompile",
    tp: int = 1,
    ep: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compile a checkpoint into the engine folder `out`; returns its manifest.

    dtype: float32, float16 or bfloat16. weights: None, "int8" or "int4" (block-wise, `block_size`
    values per scale). absorb: auto, fold, reassociate or none (MLA absorption). verify: check
    each pass (and a quantized engine) numerically. target "tensorrt" also builds TensorRT engines
    at `precision`. max_batch, max_prompt_tokens (tokens in one step) and max_context (past + new)
    bound the engines' inputs. graphs_only writes graphs and manifest without weights. frontend:
    "dscompile" captures our reference model, "transformers" transformers' own model class.
    tp x ep > 1: a sharded engine for tp x ep ranks (heads over tp, routed experts over ep), run by
    the torch backend on torch.distributed.
    """
    from dscompile.capture import Limits
    from dscompile.exporter.export import export_checkpoint, quant_scheme

    if target not in ("onnxruntime", "tensorrt"):
        raise OptionError(f"--target {target!r} is not one of onnxruntime, tensorrt")
    try:
        limits = Limits(max_batch=max_batch, max_prompt_tokens=max_prompt_tokens, max_context=max_context)
    except ValueError as err:  # the limits name the rule they break
        raise OptionError(f"--max-batch/--max-prompt-tokens/--max-context: {str(err).split(': ', 1)[-1]}") from None
    quant_scheme(weights, block_size, dtype, target)  # before TensorRT's own checks: name the option
    build_trt = target == "tensorrt" and not graphs_only  # engines need the weights
    if build_trt:
        from dscompile.lowering.tensorrt.build import require_tensorrt, validate_options

        validate_options(precision, max_batch, max_prompt_tokens, max_context, 8.0)
        require_tensorrt()
    manifest = export_checkpoint(checkpoint, out, dtype=dtype, absorb=absorb, fuse_moe=fuse_moe, verify=verify,
                                 opset=opset, limits=limits, force=force, progress=progress,
                                 allow_nonfinite=allow_nonfinite, target=target, graphs_only=graphs_only,
                                 weights=weights, block_size=block_size, frontend=frontend, tp=tp, ep=ep)
    if build_trt:
        from dscompile.lowering.tensorrt.build import build_engines
        from dscompile.runtime.manifest import write_manifest

        manifest["tensorrt"] = build_engines(out, precision=precision, max_batch=max_batch,
                                             max_prompt_tokens=max_prompt_tokens, max_context=max_context,
                                             progress=progress)
        write_manifest(out, manifest)
    return manifest


def compare(
    checkpoint: str | Path,
    out: str | Path,
    *,
    backend: str = "onnxruntime",
    provider: str = "auto",
    decode_steps: int = 4,
    batch: int = 2,
    prompt_len: int = 8,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    plot: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Check the engine in `out` against PyTorch eager on the checkpoint it was exported from.

    Runs a prefill and `decode_steps` decode steps on random prompts (rows after the first
    left-padded) and compares logits and cache per step; `report["passed"]` is the verdict. When
    it fails (or `plot` is given), `report["layers"]` locates the first diverging layer in the
    engine's own graph and weights ("located_in" says how). A
    quantized engine is judged against eager with the same quantized weights, and its distance to
    float32 eager is reported as `report["scheme"]`.
    """
    from dscompile.verify.compare import (eager_for, locate_divergence, lowering_table, run_compare,
                                            scheme_cost, scheme_of)
    from dscompile.runtime.manifest import read_manifest
    from dscompile.runtime.session import open_engine

    manifest = read_manifest(out)
    engine = open_engine(out, backend, provider)
    scheme = scheme_of(manifest)
    frontend = (manifest.get("frontend") or {}).get("name", "dscompile")
    eager = eager_for(checkpoint, engine.info.max_positions, scheme, frontend)
    _check_same_model(manifest, eager.args.to_config(), checkpoint)
    options = dict(dtype=manifest["dtype"], decode_steps=decode_steps, batch=batch, prompt=prompt_len, seed=seed)
    report = run_compare(engine, eager, atol=atol, rtol=rtol, progress=progress, table=lowering_table(manifest),
                         **options)
    if frontend == "transformers":
        report["reference"] = f"transformers' {type(eager.model).__name__} (eager, float32)"
    if not report["passed"] or plot is not None:
        report["layers"] = locate_divergence(out, manifest, eager, report, atol=atol, rtol=rtol, plot=plot)
    if scheme is not None:
        del eager
        report["reference"] = f"eager with the same {scheme.name} weights (fake-quantized)"
        report["scheme"] = scheme_cost(engine, checkpoint, progress=progress, **options)
    return report


def _check_same_model(manifest: dict, config: dict, checkpoint: str | Path) -> None:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "kv_lora_rank", "vocab_size", "n_routed_experts")
    diff = [k for k in keys if manifest["model"].get(k) != config.get(k)]
    if diff:
        raise OptionError(f"{checkpoint}: not the checkpoint this engine was exported from ({diff[0]} differs)")
