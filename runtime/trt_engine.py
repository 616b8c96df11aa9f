"""Run TensorRT engines built from an OUT folder: `TrtEngine(Engine)`.

OUT holds `prefill.engine` and `decode.engine`, built by `lowering/tensorrt/build.py` from
`prefill.onnx` / `decode.onnx`, and `manifest.json` records them under the key "tensorrt":

    "tensorrt": {
      "format": 1,
      "tensorrt_version": "10.15.1",       # engines only load with the TensorRT (and GPU) that built them
      "precision": "fp16",                  # fp32 | fp16 | bf16
      "strongly_typed": true,               # types taken from the ONNX (no precision flags)
      "max_batch": 8, "max_prompt_tokens": 512, "max_context": 4096, "workspace_gb": 8.0,
      "timing_cache": "/path/to/cache" | null,
      "graphs": {
        "prefill": {"onnx": "prefill.onnx", "engine": "prefill.engine",
                    "profile": {"input_ids": {"min": [1, 1], "opt": [8, 256], "max": [8, 512]}, ...}},
        "decode":  {"onnx": "decode.onnx", "engine": "decode.engine", "profile": {...}}
      }
    }

`step` runs the decode engine for one new token against a non-empty cache (S == 1, P > 0) and the
prefill engine otherwise. Inputs and cache may live anywhere; they are copied to the GPU in the
dtypes the engine declares. Outputs are fresh CUDA tensors: float32 logits and a `KVCache` of the
`present.*` tensors (the next step's `past.*`).

`tensorrt` is imported only through `require_tensorrt()`, so this module imports everywhere; without
TensorRT, `TrtEngine.load` raises `TensorRTUnavailable`.

Shape legend: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dscompile.errors import DscompileError, EngineError
from dscompile.runtime.contract import (CACHE_KINDS, LOGITS, PAST, PHASES, PRESENT, STEP_INPUTS, EngineInfo, KVCache,
                                        cache_name, cache_names, choose_graph)
from dscompile.runtime.engine import Engine
from dscompile.runtime.manifest import load_manifest

TRT_FORMAT = 2  # 2: max_prompt_tokens (was max_new_tokens)
PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL_HINT = (
    'pip install "dscompile[tensorrt]" (TensorRT wheels download from NVIDIA\'s own package index '
    "and need a CUDA GPU)"
)

# TensorRT DataType member name -> torch dtype (names are stable across TensorRT 10.x).
_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
    "FP8": torch.float8_e4m3fn,
}
_PAST = re.compile(rf"^{PAST}\.(\d+)\.({'|'.join(CACHE_KINDS)})$")


class TensorRTUnavailable(DscompileError):
    """TensorRT (or a CUDA GPU for it) is not available on this machine."""


def require_tensorrt():
    """Import and return the `tensorrt` module, or raise TensorRTUnavailable saying what to install."""
    try:
        import tensorrt  # noqa: PLC0415 - optional dependency, imported only where it is used
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT is not installed ({e.name or 'tensorrt'}): {INSTALL_HINT}") from None
    except (OSError, RuntimeError) as e:  # bindings present but libnvinfer missing: the bindings alone fail here
        raise TensorRTUnavailable(
            f"TensorRT is installed but its libraries do not load ({e}): {INSTALL_HINT}"
        ) from None
    return tensorrt


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """torch dtype of a TensorRT DataType (or of its member name, e.g. "HALF")."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise EngineError(f"TensorRT data type {name} has no torch equivalent")
    return _TORCH_DTYPES[name]


def read_trt_section(manifest: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The manifest's "tensorrt" section, checked; EngineError naming the missing or wrong field."""
    where = out_dir / "manifest.json"
    section = manifest.get("tensorrt")
    if not isinstance(section, dict):
        raise EngineError(f"{where}: no 'tensorrt' section (build the TensorRT engines for this OUT first)")
    if section.get("format") != TRT_FORMAT:
        raise EngineError(f"{where}: tensorrt.format is {section.get('format')!r}, this dscompile reads {TRT_FORMAT}")
    if section.get("precision") not in PRECISIONS:
        raise EngineError(f"{where}: tensorrt.precision is {section.get('precision')!r}, expected one of {PRECISIONS}")
    for key in ("max_batch", "max_prompt_tokens", "max_context"):
        if not isinstance(section.get(key), int) or section[key] < 1:
            raise EngineError(f"{where}: tensorrt.{key} must be a positive integer, got {section.get(key)!r}")
    graphs = section.get("graphs")
    for g in PHASES:
        entry = graphs.get(g) if isinstance(graphs, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("engine"), str):
            raise EngineError(f"{where}: tensorrt.graphs.{g}.engine is missing")
        if not isinstance(entry.get("profile"), dict):
            raise EngineError(f"{where}: tensorrt.graphs.{g}.profile is missing")
    return section


def check_profile(graph: str, shapes: dict[str, tuple[int, ...]], profile: dict[str, dict[str, list[int]]]) -> None:
    """Refuse input shapes outside the optimization profile the engine was built with."""
    for name, shape in shapes.items():
        p = profile.get(name)
        if p is None:
            continue
        lo, hi = p["min"], p["max"]
        if len(shape) != len(lo):
            raise EngineError(f"{graph} engine: {name} has rank {len(shape)}, the engine takes rank {len(lo)}")
        for axis, (d, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= d <= b:
                raise EngineError(
                    f"{graph} engine: {name} dim {axis} is {d}, the engine was built for {a}..{b} "
                    f"(shape {list(shape)}; rebuild with larger limits)"
                )


def engine_info_from_io(io: dict[str, tuple[tuple[int, ...], torch.dtype]], max_context: int) -> EngineInfo:
    """EngineInfo from an engine's IO tensors (name -> (shape with -1 for dynamic dims, dtype))."""
    layers = sorted({int(m.group(1)) for n in io if (m := _PAST.match(n))})
    if not layers or layers != list(range(len(layers))):
        raise EngineError(f"engine inputs past.{{i}}.kv_latent/k_rope must be numbered 0..L-1, got layers {layers}")
    kv_shape, cache_dtype = io[cache_name(PAST, 0, "kv_latent")]
    rope_shape, _ = io[cache_name(PAST, 0, "k_rope")]
    logits_shape, _ = io.get(LOGITS, ((), None))
    if not logits_shape or kv_shape[-1] < 0 or rope_shape[-1] < 0 or logits_shape[-1] < 0:
        raise EngineError(
            "engine IO must have static kv_lora_rank, rope dim and vocab (last dims of past.0.* and logits)"
        )
    return EngineInfo(
        num_layers=len(layers),
        kv_lora_rank=int(kv_shape[-1]),
        qk_rope_head_dim=int(rope_shape[-1]),
        vocab_size=int(logits_shape[-1]),
        max_positions=max_context,
        cache_dtype=cache_dtype,
    )


@dataclass
class _Graph:
    """One deserialized engine with its execution context and IO description."""

    name: str
    engine: Any
    context: Any
    inputs: list[str]
    outputs: list[str]
    io: dict[str, tuple[tuple[int, ...], torch.dtype]]
    profile: dict[str, dict[str, list[int]]]


class TrtEngine(Engine):
    """The prefill and decode TensorRT engines of one OUT folder behind the `Engine` interface."""

    def __init__(self, out_dir: Path, section: dict[str, Any], graphs: dict[str, _Graph], device: torch.device):
        self.out_dir = out_dir
        self.section = section
        self.graphs = graphs
        self.device = device
        self.info = engine_info_from_io(graphs["prefill"].io, section["max_context"])
        self.max_batch, self.max_step_tokens = section.get("max_batch"), section.get("max_prompt_tokens")
        # TensorRT may refuse a null address even for an empty tensor (P == 0 on the first step):
        # empty tensors are bound to this small scratch buffer instead.
        self._scratch = torch.empty(256, dtype=torch.uint8, device=device)

    @classmethod
    def load(cls, out_dir: str | Path, device: str | torch.device = "cuda") -> "TrtEngine":
        """Deserialize OUT's prefill and decode engines and create one execution context for each."""
        trt = require_tensorrt()
        out = Path(out_dir)
        section = read_trt_section(load_manifest(out), out)
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("TensorRT engines need a CUDA GPU and torch sees none")
        device = torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        graphs: dict[str, _Graph] = {}
        with torch.cuda.device(device):
            for g in PHASES:
                path = out / section["graphs"][g]["engine"]
                if not path.is_file():
                    raise EngineError(f"{path}: no such engine file")
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise EngineError(
                        f"{path}: TensorRT {trt.__version__} cannot deserialize it (built with TensorRT "
                        f"{section.get('tensorrt_version')}; engines are tied to the TensorRT version and GPU)"
                    )
                graphs[g] = _describe(trt, g, engine)
        return cls(out, section, graphs, device)

    def _step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        batch, new = int(input_ids.shape[0]), int(input_ids.shape[1])
        past = cache.length if cache is not None else 0
        if cache is None:
            cache = KVCache.empty(self.info, batch, self.device)
        graph = self.graphs[choose_graph(new, past)]
        feeds = dict(zip(STEP_INPUTS, (input_ids, position_ids, attention_mask)))
        feeds.update(zip(cache_names(PAST, len(cache.layers)), (t for layer in cache.layers for t in layer)))
        check_profile(graph.name, {n: tuple(t.shape) for n, t in feeds.items()}, graph.profile)

        ctx = graph.context
        bound: list[torch.Tensor] = []  # keeps converted inputs alive until the engine has run
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            for name in graph.inputs:
                if name not in feeds:
                    raise EngineError(f"{graph.name} engine takes an input '{name}' outside the engine contract")
                t = feeds[name].to(device=self.device, dtype=graph.io[name][1]).contiguous()
                bound.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise EngineError(f"{graph.name} engine refused shape {list(t.shape)} for {name}")
                ctx.set_tensor_address(name, self._address(t))
            outputs: dict[str, torch.Tensor] = {}
            for name in graph.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"{graph.name} engine: output {name} has unresolved shape {list(shape)}")
                outputs[name] = torch.empty(shape, dtype=graph.io[name][1], device=self.device)
                ctx.set_tensor_address(name, self._address(outputs[name]))
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{graph.name} engine: TensorRT execution failed (see the TensorRT log)")
        present = [outputs[name] for name in cache_names(PRESENT, self.info.num_layers)]
        return outputs[LOGITS].float(), KVCache(list(zip(present[::2], present[1::2])))

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._scratch.data_ptr()


def _describe(trt: Any, name: str, engine: Any) -> _Graph:
    """IO names, shapes, dtypes and profile-0 ranges of a deserialized engine."""
    inputs, outputs, io, profile = [], [], {}, {}
    for i in range(engine.num_io_tensors):
        tensor = engine.get_tensor_name(i)
        io[tensor] = (tuple(engine.get_tensor_shape(tensor)), torch_dtype(engine.get_tensor_dtype(tensor)))
        if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
            inputs.append(tensor)
            lo, opt, hi = engine.get_tensor_profile_shape(tensor, 0)
            profile[tensor] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        else:
            outputs.append(tensor)
    context = engine.create_execution_context()
    if context is None:
        raise EngineError(f"{name} engine: TensorRT could not create an execution context (out of GPU memory?)")
    return _Graph(name, engine, context, inputs, outputs, io, profile)
