"""What an ONNX Runtime engine opens on each provider, and the options of its GPU providers.

ONNX Runtime maps external weights on CPU, so every CPU session of OUT shares one copy of
weights.bin; its CUDA and TensorRT providers copy each session's initializers to the device instead.
`session_graphs` decides which graphs open as sessions per provider: on CUDA and TensorRT one session
of the contract's decode graph (absorbed attention, any number of new tokens, any past) runs every
step, so the device holds one copy of the weights (two sessions would hold two: 63 GB for
DeepSeek-V2-Lite in bfloat16). Half-precision decode graphs gather the chosen experts' weights per
token (lowering/ops.py choose_moe_experts); run through them, a long prefill would copy K experts per
token and layer at once, so `max_step_tokens` cuts such steps into chunks that keep one layer's
copies under GATHER_BUDGET_BYTES (OrtEngine runs them one after the other: the same computation,
attention being causal). TensorRT engines (lowering/tensorrt/build.py) bound their prefill profile
by the same `gather_step_tokens`.

ONNX Runtime's TensorRT provider without explicit optimization profiles builds an engine for the
shapes it has seen and rebuilds it when a step falls outside them, which a growing past does at
every decode step. `tensorrt_provider_options` gives it one profile covering every step the
manifest's limits allow, in the provider's format (`trt_profile_min_shapes` etc.: "name:d0xd1,...",
option names as onnxruntime-gpu 1.31.1's TensorRT provider library spells them), and an engine cache
per export (`tensorrt_cache_dir`).

Nothing here imports onnxruntime or torch: `inspect` reads the same decisions (runtime/weights.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from dscompile.errors import EngineError
from dscompile.runtime.home import cache_home
from dscompile.runtime.contract import ATTENTION_MASK, DECODE, DECODE_IN_PLACE, INPUT_IDS, POSITION_IDS, PREFILL

CPU = "CPUExecutionProvider"


def session_graphs(manifest: dict[str, Any], provider: str) -> dict[str, str]:
    """graph a step may run (choose_graph's names) -> the ONNX file whose session runs it, for an
    engine on ONNX Runtime `provider` ("CPUExecutionProvider", ...). A file named twice is ONE session.

    - CPU, float: prefill.onnx for prefill, the in-place decode graph (where OUT has it) for decode:
      both map the same weights.bin, so two sessions cost no second copy.
    - CPU, quantized: the kernels prepack their weights per session, so one session runs every step:
      of the in-place graph where it takes any number of new tokens (`new_tokens` "any"), else (an
      export without it) of the contract's decode graph.
    - CUDA and TensorRT: each session copies its initializers to the device, so one session of the
      contract's decode graph runs every step: one device copy of the weights (two sessions would
      hold two: 63 GB for DeepSeek-V2-Lite in bfloat16).
    """
    graphs = manifest["graphs"]
    decode = graphs[DECODE]["file"]
    in_place = graphs[DECODE].get("in_place") if provider == CPU else None
    if in_place is not None and in_place.get("new_tokens") == "any":
        return {PREFILL: in_place["file"], DECODE_IN_PLACE: in_place["file"]}
    if manifest.get("quantization") or provider != CPU:
        return {PREFILL: decode, DECODE: decode}
    if in_place is not None:
        return {PREFILL: graphs[PREFILL]["file"], DECODE_IN_PLACE: in_place["file"]}
    return {PREFILL: graphs[PREFILL]["file"], DECODE: decode}


# Transient device memory a step may spend on the experts' weights that a "gather" MoE lowering
# copies per token (half-precision decode graphs: lowering/ops.py choose_moe_experts); a longer
# step through the one decode session is run in chunks of new tokens under this bound.
GATHER_BUDGET_BYTES = 2 << 30


def max_step_tokens(manifest: dict[str, Any], provider: str) -> int | None:
    """New tokens per step through `provider`'s sessions (None: no limit): where the decode graph
    also runs prefills (session_graphs: CUDA, TensorRT), `gather_step_tokens` of it."""
    plan = session_graphs(manifest, provider)
    if plan[PREFILL] != manifest["graphs"][DECODE]["file"]:
        return None
    return gather_step_tokens(manifest)


def gather_step_tokens(manifest: dict[str, Any], width: int | None = None) -> int | None:
    """New tokens per step through the decode graph that keep one layer's gathered expert weights
    under GATHER_BUDGET_BYTES; None where that graph does not gather. Its "gather" experts copy K
    experts' weights per token and layer (K x 3 x hidden x moe_intermediate values of `width` bytes:
    by default the export's dtype; a TensorRT engine built in half precision from a float32 export
    passes 2)."""
    if manifest["graphs"][DECODE].get("moe_lowering") != "gather":
        return None
    cfg = manifest["model"]
    width = width or {"float32": 4, "float16": 2, "bfloat16": 2}.get(manifest["dtype"], 4)
    per_token = cfg["num_experts_per_tok"] * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"] * width
    return max(1, GATHER_BUDGET_BYTES // per_token)


def tensorrt_provider_options(manifest: dict[str, Any], cache_dir: str | os.PathLike) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options for OUT's one session (session_graphs: the decode graph).

    Without explicit profiles the provider builds an engine for the shapes it has seen and rebuilds
    it whenever a step falls outside them, which a growing past does at every decode step. So one
    profile covers every step the manifest's limits allow (B 1..max_batch, S 1..max_prompt_tokens,
    P 0..max_context-1, P+S <= max_context), tuned at decode (S = 1, P = max_context / 2), in the
    provider's format "name:d0xd1x...,name:...". Engines are cached under `cache_dir` (built once
    per export, GPU and TensorRT version); half-precision graphs enable the matching TensorRT
    precision. Refuses (EngineError) an OUT whose graph holds non-standard ops (com.microsoft.MoE
    in float32): the provider would leave them to CUDA and split the graph into TensorRT subgraphs
    whose dynamic inputs no profile given here can name.
    """
    graph = manifest["graphs"][DECODE]
    foreign = sorted(op for op in (graph.get("op_counts") or {}) if "." in op)  # "domain.Op" (exporter/manifest.py)
    if foreign:
        raise EngineError(f"ONNX Runtime's TensorRT provider cannot run {graph['file']} whole: it holds "
                          f"{', '.join(foreign)}, which TensorRT does not import, and the TensorRT subgraphs "
                          "around them would have no optimization profile: use --provider cuda")
    limits = manifest["limits"]
    B, S, T = limits["max_batch"], limits["max_prompt_tokens"], limits["max_context"]
    p_opt = max(1, T // 2)
    ranges = {"B": (1, B, B), "S": (1, 1, S), "P": (0, p_opt, T - 1), "T": (1, p_opt + 1, T)}
    roles = {INPUT_IDS: ("B", "S"), POSITION_IDS: ("B", "S"), ATTENTION_MASK: ("B", "T")}
    shapes: list[list[str]] = [[], [], []]  # min, opt, max
    for io in graph["inputs"]:
        name, dims = io["name"], io["shape"]
        axes = roles.get(name, ("B", "P") + (None,) * (len(dims) - 2))
        for k in range(3):
            sizes = [str(d) if isinstance(d, int) else str(ranges[a][k]) for d, a in zip(dims, axes)]
            shapes[k].append(f"{name}:{'x'.join(sizes)}")
    options = {
        "trt_profile_min_shapes": ",".join(shapes[0]),
        "trt_profile_opt_shapes": ",".join(shapes[1]),
        "trt_profile_max_shapes": ",".join(shapes[2]),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": os.fspath(cache_dir),
    }
    if manifest["dtype"] in ("float16", "bfloat16"):
        options["trt_fp16_enable" if manifest["dtype"] == "float16" else "trt_bf16_enable"] = "True"
    return options


def tensorrt_cache_dir(out: Path) -> Path:
    """Where the TensorRT provider caches OUT's engines: $DSCOMPILE_HOME (or ~/.cache/dscompile)/ort-tensorrt/
    <a hash of OUT's manifest>, so a re-export never meets the engines of the one before."""
    home = cache_home()
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()[:16]
    return home / "ort-tensorrt" / digest
