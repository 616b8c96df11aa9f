"""The Python API: what the `dscompile` command runs, as functions.

    import dscompile

    dscompile.export("ckpt", "out", weights="int4")      # checkpoint -> engine folder
    llm = dscompile.load("out")                          # engine + its tokenizer
    llm.generate("The compiler")                         # text in, text out
    report = dscompile.compare("ckpt", "out")            # numerics against PyTorch eager
    quality = dscompile.eval("out", "heldout.txt", reference="ckpt")   # perplexity, KL on real text

Long steps report to `progress(stage, done, total)` when given. Errors a user can cause are
`dscompile.DscompileError` subclasses with a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dscompile.errors import OptionError

if TYPE_CHECKING:  # imported when called: `import dscompile` stays light
    from dscompile.exporter.options import ExportOptions

Progress = Callable[[str, int, int], None]


def load(out: str | Path, backend: str = "onnxruntime", provider: str = "auto", threads: int | None = None,
         tf32: bool = False):
    """Open an engine folder: a `TextEngine` (runtime/session.py) with generate, stream and chat.

    backend: onnxruntime (provider auto, cpu, cuda or tensorrt), torch (the exported programs;
    provider picks the device) or tensorrt (the engines `export(target="tensorrt")` built).
    threads: intra-op threads (default: the backend's). tf32: let ONNX Runtime's CUDA provider
    compute float32 GEMMs in TF32 (default: IEEE float32).
    """
    from dscompile.runtime.session import TextEngine

    return TextEngine.open(out, backend=backend, provider=provider, threads=threads, tf32=tf32)


def export(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None, *,
           progress: Progress | None = None, **fields: Any) -> dict[str, Any]:
    """Compile a checkpoint into the engine folder `out`; returns its manifest.

    options: a `dscompile.exporter.options.ExportOptions`; its fields may also be given (or
    overridden) as keywords, e.g. `export("ckpt", "out", weights="int4")`. They are: dtype
    (float32, float16 or bfloat16); weights (None, "int8" or "int4": block-wise, `block_size`
    values per scale); absorb (auto, fold, reassociate or none: MLA absorption); fuse_moe; verify
    (check each pass, and a quantized engine, numerically); opset; target ("tensorrt" also builds
    TensorRT engines at `precision`; `tf32` lets fp32 ones compute GEMMs in TF32); max_batch,
    max_prompt_tokens (tokens in one step) and max_context (past + new), which bound the engines'
    inputs; graphs_only (graphs and manifest without weights); frontend ("dscompile" captures our
    reference model, "transformers" transformers' own model class); tp x ep > 1 (a sharded engine for tp x ep ranks: heads over
    tp, routed experts over ep, run by the torch backend on torch.distributed); force;
    allow_nonfinite. Their defaults are the command line's.
    """
    import dataclasses

    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions

    options = dataclasses.replace(options or ExportOptions(), **fields)  # checked again with the keywords
    if options.builds_tensorrt:
        from dscompile.lowering.tensorrt.build import require_tensorrt

        require_tensorrt()  # before the export: minutes of work would end without engines
    manifest = export_checkpoint(checkpoint, out, options, progress=progress)
    if options.builds_tensorrt:
        from dscompile.lowering.tensorrt.build import build_engines
        from dscompile.runtime.manifest import write_manifest

        manifest["tensorrt"] = build_engines(out, precision=options.precision, max_batch=options.max_batch,
                                             max_prompt_tokens=options.max_prompt_tokens,
                                             max_context=options.max_context, progress=_count_engines(progress),
                                             tf32=options.tf32)
        write_manifest(out, manifest)
    return manifest


def _count_engines(progress: Progress | None) -> Callable[[str], None] | None:
    """build_engines says what it does in words ("model: wrote model.engine ..."); the stage
    callback counts the engine written (one: both profiles are in it)."""
    if progress is None:
        return None
    written = []
    progress("tensorrt", 0, 1)

    def say(message: str) -> None:
        if ": wrote " in message:
            written.append(message)
            progress("tensorrt", len(written), 1)

    return say


def compare(
    checkpoint: str | Path,
    out: str | Path,
    *,
    backend: str = "onnxruntime",
    provider: str = "auto",
    tf32: bool = False,
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
    float32 eager is reported as `report["scheme"]`. With `tf32` (ONNX Runtime's CUDA provider
    computing float32 GEMMs in TF32), and for TensorRT engines built with it, a float32 engine is
    judged against tolerance.TF32 instead of the float32 bound.
    """
    from dscompile.dtypes import DTYPES
    from dscompile.verify.compare import (eager_for, importance_of, locate_divergence, lowering_rms_bound,
                                            lowering_table, run_compare, scheme_cost, scheme_of)
    from dscompile.runtime.manifest import read_manifest
    from dscompile.runtime.session import open_engine

    manifest = read_manifest(out)
    engine = open_engine(out, backend, provider, tf32=tf32)
    built_tf32 = backend == "tensorrt" and bool((manifest.get("tensorrt") or {}).get("tf32"))
    scheme = scheme_of(manifest)
    frontend = (manifest.get("frontend") or {}).get("name", "dscompile")
    eager = eager_for(checkpoint, engine.info.max_positions, scheme, frontend, importance_of(out, manifest),
                      quantized_from=DTYPES[manifest["dtype"]])
    _check_same_model(manifest, eager.args.to_config(), checkpoint)
    options = dict(dtype=manifest["dtype"], decode_steps=decode_steps, batch=batch, prompt=prompt_len, seed=seed)
    report = run_compare(engine, eager, atol=atol, rtol=rtol, progress=progress,
                         table=lowering_table(manifest, tf32 or built_tf32),
                         rms_bound=None if atol is not None or rtol is not None else lowering_rms_bound(manifest),
                         **options)
    report["notes"] = list(engine.notes)
    if frontend == "transformers":
        report["reference"] = f"transformers' {type(eager.model).__name__} (eager, float32)"
    if not report["passed"] or plot is not None:
        report["layers"] = locate_divergence(out, manifest, eager, report, atol=atol, rtol=rtol, plot=plot)
    if scheme is not None:
        del eager
        report["reference"] = f"eager with the same {scheme.name} weights (fake-quantized)"
        report["scheme"] = scheme_cost(engine, checkpoint, progress=progress, **options)
    return report


def eval(  # noqa: A001 - the command's name; the builtin is not used here
    out: str | Path,
    text: str | Path,
    *,
    reference: str | Path | None = None,
    context: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    backend: str = "onnxruntime",
    provider: str = "auto",
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Perplexity of the engine in `out` on the UTF-8 text file `text` (verify/quality.py says which
    tokens are scored), and with `reference` (a checkpoint: its float32 eager model; or another
    engine folder) the KL divergence KL(reference || engine) per token (mean, median, p99, max),
    top-1 agreement and the perplexity ratio.

    context: tokens per window (default: the engine's limit, and the reference's); stride: tokens
    a window advances (default context // 2); max_tokens: evaluate only the text's first tokens.
    backend/provider/threads open the engine as `load` does (a reference engine folder opens on the
    same backend, or the torch backend when it is sharded).
    """
    from dscompile.runtime.manifest import load_manifest
    from dscompile.runtime.session import TextEngine
    from dscompile.verify.quality import evaluate, read_text

    body, digest = read_text(text)
    llm = TextEngine.open(out, backend=backend, provider=provider, threads=threads)
    if llm.tokenizer is None:
        llm._need_tokenizer("evaluate text")  # the one-line reason: no tokenizer.json, or one that did not load
    ids = llm.tokenizer.encode(body)
    text_tokens = len(ids)
    if max_tokens is not None:
        if max_tokens < 2:
            raise OptionError(f"--max-tokens {max_tokens} must be >= 2")
        ids = ids[:max_tokens]
    engine, ref, ref_name = llm.engine, None, None
    limit = engine.info.max_positions
    if reference is not None:
        ref, ref_name = _reference(Path(reference), Path(out), engine, backend, provider, threads)
        limit = min(limit, ref.info.max_positions)
    context = min(limit, len(ids)) if context is None else context
    if context > limit:
        raise OptionError(f"--context {context} exceeds the engine's limit of {limit} tokens")
    stride = max(1, context // 2) if stride is None else stride
    chunk = int(load_manifest(out)["limits"]["max_prompt_tokens"])
    ref_chunk = chunk
    if reference is not None and (Path(reference) / "manifest.json").is_file():
        ref_chunk = int(load_manifest(reference)["limits"]["max_prompt_tokens"])
    elif reference is not None:
        ref_chunk = context  # eager takes any step
    report = evaluate(engine, ids, context=context, stride=stride, chunk=chunk, reference=ref,
                      reference_chunk=ref_chunk, progress=progress)
    report.update(engine=str(out), backend=backend, device=str(engine.device), text=str(text), text_sha256=digest,
                  text_tokens=text_tokens)
    if ref is not None:
        report["reference"]["name"] = ref_name
    report["notes"] = list(engine.notes)
    return report


def _reference(path: Path, out: Path, engine, backend: str, provider: str, threads: int | None):
    """(the reference engine, what it is) for eval: a checkpoint's float32 eager model or an engine
    folder's engine; OptionError when it is neither or its vocabulary is not the engine's."""
    from dscompile.runtime.manifest import load_manifest
    from dscompile.runtime.session import open_engine
    from dscompile.verify.compare import eager_for

    if (path / "manifest.json").is_file():
        sharded = load_manifest(path).get("sharding") is not None
        ref = open_engine(path, "torch" if sharded else backend, provider, threads)
        name = f"engine {path} ({ref.info.cache_dtype})"
    elif (path / "config.json").is_file():
        ref = eager_for(path, engine.info.max_positions)
        name = f"PyTorch eager float32 of {path}"
    else:
        raise OptionError(f"--reference {path}: neither a checkpoint (config.json) nor an engine folder (manifest.json)")
    if ref.info.vocab_size != engine.info.vocab_size:
        raise OptionError(f"--reference {path}: another vocabulary ({ref.info.vocab_size} tokens, the engine has "
                          f"{engine.info.vocab_size})")
    mine, theirs = out / "tokenizer.json", path / "tokenizer.json"
    if mine.is_file() and theirs.is_file() and mine.read_bytes() != theirs.read_bytes():
        raise OptionError(f"--reference {path}: another vocabulary (its tokenizer.json differs from {mine})")
    return ref, name


def _check_same_model(manifest: dict, config: dict, checkpoint: str | Path) -> None:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "kv_lora_rank", "vocab_size", "n_routed_experts")
    diff = [k for k in keys if manifest["model"].get(k) != config.get(k)]
    if diff:
        raise OptionError(f"{checkpoint}: not the checkpoint this engine was exported from ({diff[0]} differs)")
