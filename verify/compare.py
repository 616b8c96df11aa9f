"""compare: an engine against the PyTorch eager model, per output, per step, down to the layer.

The one place that holds both sides (the checkpoint and OUT). Both run the same inputs: a batch
with left padding, a prefill, then decode steps fed with the eager model's greedy tokens (so a
difference in one step does not change what later steps see). Per graph and step it reports max
abs, max rel and mean abs error of the logits (real positions only) and of the returned cache.
When a step is out of tolerance, the first layer whose hidden state diverges is located in the
engine under test itself: its own graph, with the value that holds the hidden state after each
block made an output, run on its own weights.bin (`locate_divergence`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from dscompile.verify.eager import EagerEngine, TransformersEagerEngine
from dscompile.model.checkpoint import load_checkpoint
from dscompile.lowering.encodings import NATIVE_EXPERT_OPS, NATIVE_LINEAR_OPS
from dscompile.lowering.fuse_experts import SHARED_MLPS
from dscompile.model.quant import Scheme
from dscompile.runtime.contract import (DECODE, PAST, PREFILL, STEP_INPUTS, EngineInfo, KVCache, StepInputs,
                                        cache_names, next_step_inputs, random_step_inputs)
from dscompile.runtime.engine import Engine
from dscompile.runtime.native import register_for as register_native
from dscompile.errors import EngineError, OptionError, first_line
from dscompile.tolerance import QUANTIZED_ACTIVATIONS, TF32, TOLERANCE, quantized_activations_rms
from dscompile.tolerance import bound as tolerance_bound



@dataclass
class Stats:
    max_abs: float
    max_rel: float
    mean_abs: float
    ref_max: float
    rel_rms: float = 0.0  # ||actual - ref|| / ||ref||

    @staticmethod
    def of(actual: torch.Tensor, ref: torch.Tensor) -> "Stats":
        a, r = actual.detach().float().cpu(), ref.detach().float().cpu()
        if a.shape != r.shape:
            raise EngineError(f"engine output shape {tuple(a.shape)} breaks the contract: eager gives {tuple(r.shape)}")
        if not r.numel():
            return Stats(0.0, 0.0, 0.0, 0.0)
        d = (a - r).abs()
        rel = d / r.abs().clamp(min=1e-6)
        norm = float(r.double().norm())
        return Stats(float(d.max()), float(rel.max()), float(d.mean()), float(r.abs().max()),
                     float(d.double().norm()) / norm if norm else 0.0)

    def within(self, atol: float, rtol: float) -> bool:
        return self.max_abs <= atol + rtol * self.ref_max


def distribution(actual: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Next-token distributions of logits [N, V]: mean KL(ref || actual) and top-1 agreement."""
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    if not r.numel():
        return {"kl": 0.0, "top1_agreement": 1.0}
    log_r, log_a = torch.log_softmax(r, -1), torch.log_softmax(a, -1)
    kl = (log_r.exp() * (log_r - log_a)).sum(-1)
    return {"kl": float(kl.mean()), "top1_agreement": float((a.argmax(-1) == r.argmax(-1)).double().mean())}


def tolerance(dtype: str, atol: float | None, rtol: float | None, ref_max: float,
              table: dict | None = None) -> tuple[float, float]:
    """--atol/--rtol when given, else the dtype's named tolerance (from `table`) scaled by max(1, max|ref|)."""
    if atol is not None and atol < 0 or rtol is not None and rtol < 0:
        raise OptionError("--atol and --rtol must be >= 0")
    base = tolerance_bound(dtype, ref_max, table or TOLERANCE)
    return (base if atol is None else atol), (0.0 if rtol is None else rtol)


def _inputs(vocab: int, batch: int, prompt: int, seed: int) -> StepInputs:
    """The compare's prefill: seeded ids, later rows shorter (left padding), every row at least one token."""
    padding = [min(prompt - 1, row * max(1, prompt // (2 * batch))) for row in range(batch)]
    return random_step_inputs(vocab, batch, prompt, seed=seed, padding=padding)


def run_compare(
    engine: Engine,
    eager: EagerEngine,
    *,
    dtype: str = "float32",
    atol: float | None = None,
    rtol: float | None = None,
    decode_steps: int = 4,
    batch: int = 2,
    prompt: int = 8,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    table: dict | None = None,
    rms_bound: float | None = None,
) -> dict[str, Any]:
    """Prefill + `decode_steps` steps on both; per step: logits and cache error, pass/fail.

    Both sides are fed the eager model's greedy tokens (teacher forcing). Per step also the
    logits' relative RMS error, KL divergence and top-1 agreement of the next-token distributions.
    `table` replaces the dtype's tolerance table (dscompile/tolerance.py). With `rms_bound` a step
    is judged by the relative RMS error of its logits and of each cache tensor instead of max |Δ|
    (kernels that quantize activations: tolerance.quantized_activations_rms, `lowering_rms_bound`).
    """
    if decode_steps < 0 or batch < 1 or prompt < 1:
        raise OptionError("--decode-steps must be >= 0, --batch and --prompt-len >= 1")
    inputs = _inputs(eager.info.vocab_size, batch, prompt, seed)
    steps: list[dict[str, Any]] = []
    e_cache: KVCache | None = None
    g_cache: KVCache | None = None
    total = decode_steps + 1
    for i in range(total):
        step_ids, mask = inputs.input_ids, inputs.attention_mask
        ref, e_cache = eager.step(*inputs, e_cache)
        got, g_cache = engine.step(*inputs, g_cache)
        real = mask[:, -step_ids.shape[1]:].bool()  # logits of padding positions mean nothing
        logits = Stats.of(got[real], ref[real])
        a, r = tolerance(dtype, atol, rtol, logits.ref_max, table)
        # Cache rows of padding positions are never attended to; engines may fill them differently.
        seen = mask.bool()
        cache = [Stats.of(g.cpu()[seen], e[seen]) for ge, ee in zip(g_cache.layers, e_cache.layers) for g, e in zip(ge, ee)]
        worst_cache = max(cache, key=lambda s: s.max_abs)
        ca, cr = tolerance(dtype, atol, rtol, worst_cache.ref_max, table)
        if rms_bound is None:
            ok = logits.within(a, r) and worst_cache.within(ca, cr)
        else:
            ok = logits.rel_rms <= rms_bound and max(c.rel_rms for c in cache) <= rms_bound
        entry = {"step": i, "graph": PREFILL if i == 0 else DECODE, "new_tokens": int(step_ids.shape[1]),
                 "batch": batch,
                 "logits": vars(logits), **distribution(got[real], ref[real]),
                 "cache": vars(worst_cache), "atol": a, "rtol": r, "passed": ok}
        if rms_bound is not None:
            entry.update(rel_rms_bound=rms_bound, cache_rel_rms=max(c.rel_rms for c in cache))
        steps.append(entry)
        if progress is not None:
            progress("compare", i + 1, total)
        inputs = next_step_inputs(ref[:, -1].argmax(-1), inputs)  # teacher forcing with eager's greedy token
    return {"passed": all(s["passed"] for s in steps), "steps": steps, "dtype": dtype, "seed": seed}


def locate_divergence(
    out: str | Path,
    manifest: dict[str, Any],
    eager: EagerEngine,
    report: dict[str, Any],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Per-layer hidden-state error of the engine in OUT, on the compare's prefill inputs.

    The graph the engine runs a prefill with (`prefill_graph`) is read from OUT without its
    weights, the value holding the hidden state after each block (`block_outputs`) becomes an
    output, and ONNX Runtime runs it on CPU with OUT's own weights.bin. Each block's hidden state
    is compared with the eager model's; the first out of tolerance is the first diverging layer.
    """
    out = Path(out)
    if manifest["dtype"] == "bfloat16":
        raise EngineError(f"{out}: a bfloat16 engine: the first diverging layer is located with ONNX Runtime on "
                          "CPU, which has no bfloat16 kernels")
    graph_file = manifest["graphs"][prefill_graph(manifest)]["file"]
    path = out / graph_file
    model = onnx.load(str(path), load_external_data=False)
    hidden = block_outputs(model.graph, eager.info.num_layers, path)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in hidden)
    batch, prompt = report["steps"][0]["batch"], report["steps"][0]["new_tokens"]
    ids, pos, mask = _inputs(eager.info.vocab_size, batch, prompt, report["seed"])
    got = _run_on_weights(model, out, manifest, path, hidden, ids, pos, mask,
                          KVCache.empty(EngineInfo.from_manifest(manifest), batch))
    ref = eager.hidden_states(ids, pos, mask, None)
    real = mask.bool()
    errors = [vars(Stats.of(g[real], r[real])) for g, r in zip(got, ref)]
    bound = None if atol is not None or rtol is not None else lowering_rms_bound(manifest)
    first = first_diverging_layer(errors, report["dtype"], atol, rtol, lowering_table(manifest), bound)
    if plot is not None:
        plot_layers(errors, plot)
    located = (f"{graph_file} of the engine folder with its weights.bin (the hidden state after each block made "
               f"an output), run by ONNX Runtime on CPU on the compare's prefill inputs")
    return {"per_layer": errors, "first_diverging_layer": first, "located_in": located,
            "plot": str(plot) if plot else None}


def prefill_graph(manifest: dict[str, Any]) -> str:
    """The graph an engine runs a prefill with: "prefill", or for a quantized engine "decode" (it
    runs every step in one session of the decode graph: runtime/ort_engine.py)."""
    return DECODE if manifest.get("quantization") else PREFILL


def block_outputs(graph: onnx.GraphProto, num_layers: int, where: Path) -> list[str]:
    """The names of the values of `graph` holding the hidden state after each block.

    Follows the residual stream from the token embedding: each block adds its attention output,
    then its MLP's (or MoE's), and every value of the stream is read by an RMS norm (the next
    sub-block's; after the last block, the final norm, through logits_from's Slice where the graph
    has it). So the hidden state after block i is the
    value two residual Adds after block i's input. Found by structure, not by the norm weights'
    names: the optimizer merges initializers with equal contents, so a weight name may be another
    layer's. An EngineError when the graph does not have that structure.
    """
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    value, found = _embedding(graph), []
    if value is None:
        raise EngineError(f"{where}: no embedding (a Gather of input_ids) to follow the residual stream from")
    for step in range(2 * num_layers + 1):
        kinds = [n.op_type for n in readers[value]]
        if kinds == ["Slice"] and [n.op_type for n in readers[readers[value][0].output[0]]] == ["RMSNormalization"]:
            kinds = ["RMSNormalization"]  # the last block's output, cut by logits_from (lowering/logits.py)
        adds = [n for n in readers[value] if n.op_type == "Add"]
        last = step == 2 * num_layers  # the last block's output: read by the final norm, added to nothing
        if "RMSNormalization" not in kinds or len(adds) != (0 if last else 1):
            block = min(step // 2, num_layers - 1)
            raise EngineError(f"{where}: cannot follow the residual stream through block {block} "
                              f"({value!r} is read by {sorted(kinds)})")
        if step % 2 == 0 and step > 0:
            found.append(value)
        if not last:
            value = adds[0].output[0]
    return found


def _embedding(graph: onnx.GraphProto) -> str | None:
    """The output of the one Gather that looks input_ids up (the token embedding), or None."""
    gathers = [n for n in graph.node if n.op_type == "Gather" and list(n.input[1:]) == ["input_ids"]]
    return gathers[0].output[0] if len(gathers) == 1 else None


def _run_on_weights(model: onnx.ModelProto, out: Path, manifest: dict[str, Any], path: Path, names: list[str],
                    ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, empty: KVCache) -> list[torch.Tensor]:
    """Run `model` (a graph of OUT, edited in memory; OUT's `manifest`) with ONNX Runtime on CPU, its
    external data read from OUT; returns the outputs `names`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(out))
    register_native(manifest, options, out)  # engines exported with --native-kernels
    flat = [ids, pos, mask, *(t for layer in empty.layers for t in layer)]
    feeds = {name: t.numpy() for name, t in zip([*STEP_INPUTS, *cache_names(PAST, len(empty.layers))], flat)}
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
        first = first_line(err)
        raise EngineError(f"{path} with the hidden states as outputs: ONNX Runtime cannot run it: {first}") from None
    return [torch.from_numpy(v) for v in values]


def first_diverging_layer(errors: list[dict[str, float]], dtype: str, atol: float | None, rtol: float | None,
                          table: dict | None = None, rms_bound: float | None = None) -> int | None:
    """The first layer out of tolerance: max |Δ| against the table, or relative RMS against `rms_bound`."""
    for i, e in enumerate(errors):
        if rms_bound is not None:
            if e["rel_rms"] > rms_bound:
                return i
            continue
        a, r = tolerance(dtype, atol, rtol, e["ref_max"], table)
        if e["max_abs"] > a + r * e["ref_max"]:
            return i
    return None


def plot_layers(errors: list[dict[str, float]], path: Path) -> None:
    """Max and mean abs error of the hidden state by layer, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib: pip install 'dscompile[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = range(len(errors))
    ax.semilogy(layers, [max(e["max_abs"], 1e-12) for e in errors], marker="o", label="max |Δ|")
    ax.semilogy(layers, [max(e["mean_abs"], 1e-12) for e in errors], marker=".", label="mean |Δ|")
    ax.set_xticks(list(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("hidden-state error vs eager")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eager_for(checkpoint: str | Path, max_positions: int | None = None, scheme: Scheme | None = None,
              frontend: str = "dscompile", importance: dict[str, torch.Tensor] | None = None,
              quantized_from: torch.dtype = torch.float32) -> EagerEngine:
    """The fp32 eager reference of a checkpoint (every engine dtype is compared against fp32); with
    `scheme`, its quantized weights fake-quantized (the weights a quantized engine computes with).
    An engine captured from transformers' code (`frontend`) is checked against transformers' model.
    `importance`: the calibration the quantized weights' scales were chosen with (importance_of).

    `quantized_from`: the dtype a quantized export loaded the checkpoint in (a float16/bfloat16 export
    for CUDA quantizes the weights rounded to it, and a 4-bit block's scale search may then choose
    another scale: ~2% relative logits error on the tiny models against weights quantized from
    float32, 20x float16's own). The model is loaded and fake-quantized in that dtype, then computes
    in float32: the engine's weights, eager's arithmetic."""
    if frontend == "transformers":
        from dscompile.capture.frontends.transformers import load_transformers_model

        return TransformersEagerEngine(*load_transformers_model(checkpoint, torch.float32, "cpu"), max_positions)
    dtype = quantized_from if scheme is not None else torch.float32
    model = load_checkpoint(checkpoint, dtype, quantize=scheme, importance=importance)
    return EagerEngine(model.float() if dtype != torch.float32 else model, max_positions)


def scheme_of(manifest: dict[str, Any]) -> Scheme | None:
    """The quantization scheme an export was made with (manifest "quantization"), or None."""
    q = manifest.get("quantization")
    return None if q is None else Scheme(int(q["bits"]), int(q["block_size"]),
                                         head_bits=int(q.get("lm_head_bits", q["bits"])))


def importance_of(out: str | Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The importance a calibrated export chose its scales with (OUT/calibration.safetensors), or None."""
    entry = (manifest.get("quantization") or {}).get("calibration")
    if not entry:
        return None
    from safetensors.torch import load_file

    path = Path(out) / entry["file"]
    if not path.is_file():
        raise EngineError(f"{path}: missing (the manifest says the export was calibrated)")
    return load_file(str(path))


def lowering_table(manifest: dict[str, Any], tf32: bool = False) -> dict | None:
    """The tolerance table for an engine against its own eager reference: the dtype's, or where
    its quantized kernels quantize activations (manifest quantization.quantized_activations) the
    measured one, or where the engine computes float32 GEMMs in TF32 (`tf32`) the TF32 one."""
    quantized = (manifest.get("quantization") or {}).get("quantized_activations") or {}
    if any(quantized.values()):
        return QUANTIZED_ACTIVATIONS
    return TF32 if tf32 else None


def lowering_rms_bound(manifest: dict[str, Any]) -> float | None:
    """For an engine whose quantized kernels quantize activations, the relative RMS error its steps are
    judged by (tolerance.quantized_activations_rms of its block size and quantized matrix products:
    MatMulNBits and native MatMulQ4/Q6/Q8 nodes, two per QMoE, MoEQ4/Q8 or ExpertsQ4/Q8 and three per shared
    MLP an ExpertsQ4/Q8 holds, in the decode graph its steps run);
    None otherwise."""
    quantization = manifest.get("quantization") or {}
    if not any((quantization.get("quantized_activations") or {}).values()):
        return None
    ops = manifest["graphs"][DECODE].get("quantized_ops") or {}
    linears = sum(ops.get(op, 0) for op in ("MatMulNBits",) + NATIVE_LINEAR_OPS)
    # a shared MLP inside ExpertsQ4/Q8 (lowering/fuse_experts.py) is three more: its gate, up and down
    products = (linears + 2 * sum(ops.get(op, 0) for op in ("QMoE",) + NATIVE_EXPERT_OPS)
                + 3 * ops.get(SHARED_MLPS, 0))
    return quantized_activations_rms(int(quantization["block_size"]), products)


def scheme_cost(engine: Engine, checkpoint: str | Path, **options) -> dict[str, Any]:
    """What quantization costs: a quantized engine against the fp32 eager model, teacher-forced.

    The other distance, the lowering's, is `run_compare` against the eager model with the same
    quantized weights (`eager_for(..., scheme)`, `lowering_table`). This one is reported per step
    (logits relative RMS error, KL divergence, top-1 agreement), not judged.
    """
    fp32 = eager_for(checkpoint, engine.info.max_positions)
    cost = run_compare(engine, fp32, **{k: v for k, v in options.items() if k not in ("atol", "rtol", "table", "rms_bound")})
    steps = [{"step": s["step"], "graph": s["graph"], "logits_rel_rms": s["logits"]["rel_rms"], "kl": s["kl"],
              "top1_agreement": s["top1_agreement"]} for s in cost["steps"]]
    return {"distance": "engine vs the fp32 eager model (quantization's cost; not judged)", "steps": steps,
            "mean": {k: sum(s[k] for s in steps) / len(steps) for k in ("logits_rel_rms", "kl", "top1_agreement")}}
