"""Run the TensorRT engine built from an OUT folder: `TrtEngine(Engine)`.

OUT holds `model.engine`, built by `lowering/tensorrt/build.py` from the decode graph with two
optimization profiles, and `manifest.json` records it under the key "tensorrt":

    "tensorrt": {
      "format": 3,
      "tensorrt_version": "10.15.1",       # engines only load with the TensorRT (and GPU) that built them
      "precision": "fp16",                  # fp32 | fp16 | bf16
      "strongly_typed": true,               # types taken from the ONNX (no precision flags)
      "tf32": false,                        # fp32 GEMMs in TF32 (compare judges with tolerance.TF32)
      "max_batch": 8, "max_prompt_tokens": 512, "max_context": 4096, "workspace_gb": 8.0,
      "timing_cache": "/path/to/cache" | null,
      "onnx": "decode.onnx", "engine": "model.engine",
      "step_tokens": 512,                   # most new tokens per step: longer steps run in chunks
      "profiles": {
        "prefill": {"index": 0, "shapes": {"input_ids": {"min": [1, 1], "opt": [8, 256], "max": [8, 512]}, ...}},
        "decode":  {"index": 1, "shapes": {...}}
      }
    }

Format 2 (prefill.engine and decode.engine, each holding the weights) is refused with a line that
says to rebuild. One engine holds one device copy of the weights; `load` deserializes it once and
creates one execution context per profile (`set_optimization_profile_async` selects it; with
several profiles TensorRT 10 names the IO tensors the same in each, and a context's profile decides
the shape ranges it accepts). The two contexts share the engine's weights; each holds its own
activation memory (sized for its profile by TensorRT).

`step` plans a step with `runtime.engine.step_plan`: new tokens beyond `step_tokens` run as
consecutive chunks (causal attention: each chunk attends to the cache and to itself, the same
computation as one step, as OrtEngine's chunked steps), each on the decode context where it is one
token against a non-empty cache (S == 1, P > 0) and on the prefill context otherwise. Inputs and
cache may live anywhere; they are copied to the GPU in the dtypes the engine declares. Outputs are
fresh CUDA tensors: float32 logits and a `KVCache` of the `present.*` tensors (the next step's
`past.*`).

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
from dscompile.runtime.contract import (CACHE_KINDS, DECODE, LOGITS, PAST, PREFILL, PRESENT, STEP_INPUTS, EngineInfo,
                                        KVCache, cache_name, cache_names)
from dscompile.runtime.engine import Engine
from dscompile.runtime.manifest import load_manifest

TRT_FORMAT = 3  # 3: one model.engine with two profiles (2: an engine per graph; 1: max_new_tokens)
ENGINE_FILE = "model.engine"
PROFILES = (PREFILL, DECODE)  # the engine's optimization profiles, in index order
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
        raise EngineError(f"{where}: no 'tensorrt' section (build the TensorRT engine for this OUT first)")
    if section.get("format") in (1, 2):
        raise EngineError(f"{where}: tensorrt.format {section['format']} (an engine per graph, two copies of the "
                          f"weights) is no longer read: rebuild the engine (dscompile export CKPT -o {out_dir} "
                          "--target tensorrt --force)")
    if section.get("format") != TRT_FORMAT:
        raise EngineError(f"{where}: tensorrt.format is {section.get('format')!r}, this dscompile reads {TRT_FORMAT}")
    if section.get("precision") not in PRECISIONS:
        raise EngineError(f"{where}: tensorrt.precision is {section.get('precision')!r}, expected one of {PRECISIONS}")
    for key in ("max_batch", "max_prompt_tokens", "max_context", "step_tokens"):
        if isinstance(section.get(key), bool) or not isinstance(section.get(key), int) or section[key] < 1:
            raise EngineError(f"{where}: tensorrt.{key} must be a positive integer, got {section.get(key)!r}")
    if not isinstance(section.get("engine"), str):
        raise EngineError(f"{where}: tensorrt.engine is missing")
    profiles = section.get("profiles")
    for i, name in enumerate(PROFILES):
        entry = profiles.get(name) if isinstance(profiles, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("shapes"), dict):
            raise EngineError(f"{where}: tensorrt.profiles.{name}.shapes is missing")
        if entry.get("index") != i:
            raise EngineError(f"{where}: tensorrt.profiles.{name}.index is {entry.get('index')!r}, expected {i}")
    return section


def check_profile(profile: str, shapes: dict[str, tuple[int, ...]], ranges: dict[str, dict[str, list[int]]]) -> None:
    """Refuse input shapes outside the ranges of the optimization profile `profile` of the engine."""
    for name, shape in shapes.items():
        p = ranges.get(name)
        if p is None:
            continue
        lo, hi = p["min"], p["max"]
        if len(shape) != len(lo):
            raise EngineError(f"{profile} profile: {name} has rank {len(shape)}, the engine takes rank {len(lo)}")
        for axis, (d, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= d <= b:
                raise EngineError(
                    f"{profile} profile: {name} dim {axis} is {d}, the engine was built for {a}..{b} "
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
class _Profile:
    """One optimization profile of the engine: its execution context and its shape ranges."""

    name: str
    index: int
    context: Any
    ranges: dict[str, dict[str, list[int]]]


class TrtEngine(Engine):
    """The one TensorRT engine of an OUT folder, run through a prefill and a decode context, behind `Engine`."""

    def __init__(self, out_dir: Path, section: dict[str, Any], engine: Any, io: dict[str, tuple[tuple[int, ...], Any]],
                 inputs: list[str], outputs: list[str], profiles: dict[str, _Profile], device: torch.device):
        self.out_dir, self.section, self.engine, self.device = out_dir, section, engine, device
        self.io, self.inputs, self.outputs, self.profiles = io, inputs, outputs, profiles
        self.info = engine_info_from_io(io, section["max_context"])
        self.max_batch, self.max_step_tokens = section["max_batch"], section["step_tokens"]
        # TensorRT may refuse a null address even for an empty tensor (P == 0 on the first step):
        # empty tensors are bound to this small scratch buffer instead.
        self._scratch = torch.empty(256, dtype=torch.uint8, device=device)

    @classmethod
    def load(cls, out_dir: str | Path, device: str | torch.device = "cuda") -> "TrtEngine":
        """Deserialize OUT's engine once and create one execution context per optimization profile."""
        trt = require_tensorrt()
        out = Path(out_dir)
        section = read_trt_section(load_manifest(out), out)
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("TensorRT engines need a CUDA GPU and torch sees none")
        device = torch.device(device)
        path = out / section["engine"]
        if not path.is_file():
            raise EngineError(f"{path}: no such engine file")
        with torch.cuda.device(device):
            engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(
                    f"{path}: TensorRT {trt.__version__} cannot deserialize it (built with TensorRT "
                    f"{section.get('tensorrt_version')}; engines are tied to the TensorRT version and GPU)"
                )
            if engine.num_optimization_profiles != len(PROFILES):
                raise EngineError(f"{path}: the engine has {engine.num_optimization_profiles} optimization "
                                  f"profile(s), the manifest {len(PROFILES)} ({', '.join(PROFILES)}): rebuild it")
            io, inputs, outputs = _describe(trt, engine)
            stream = torch.cuda.current_stream(device)
            profiles = {}
            for name in PROFILES:
                index = section["profiles"][name]["index"]
                context = engine.create_execution_context()
                if context is None:
                    raise EngineError(f"{path}: TensorRT could not create the {name} execution context "
                                      "(out of GPU memory?)")
                if not context.set_optimization_profile_async(index, stream.cuda_stream):
                    raise EngineError(f"{path}: TensorRT refused optimization profile {index} ({name})")
                ranges = {t: dict(zip(("min", "opt", "max"), map(list, engine.get_tensor_profile_shape(t, index))))
                          for t in inputs}
                profiles[name] = _Profile(name, index, context, ranges)
            stream.synchronize()
        return cls(out, section, engine, io, inputs, outputs, profiles, device)

    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
              cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        return self._run_plan(input_ids, position_ids, attention_mask, cache, last_only=False)

    def _step_last(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        return self._run_plan(input_ids, position_ids, attention_mask, cache, last_only=True)

    def _run_plan(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                  cache: KVCache | None, last_only: bool) -> tuple[torch.Tensor, KVCache]:
        """The step as `step_plan` cuts it, each chunk on its profile's context (Engine._step_planned)."""
        return self._step_planned(lambda profile, *step: self._run(self.profiles[profile], *step), input_ids,
                                  position_ids, attention_mask, cache, self.max_step_tokens, last_only)

    def _run(self, profile: _Profile, input_ids: torch.Tensor, position_ids: torch.Tensor,
             attention_mask: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """One run of the engine on `profile`'s context: inputs checked against its ranges, then `_execute`."""
        if cache is None:
            cache = KVCache.empty(self.info, int(input_ids.shape[0]), self.device)
        feeds = dict(zip(STEP_INPUTS, (input_ids, position_ids, attention_mask)))
        feeds.update(zip(cache_names(PAST, len(cache.layers)), (t for layer in cache.layers for t in layer)))
        check_profile(profile.name, {n: tuple(t.shape) for n, t in feeds.items()}, profile.ranges)
        return self._execute(profile, feeds)

    def _execute(self, profile: _Profile, feeds: dict[str, torch.Tensor]) -> tuple[torch.Tensor, KVCache]:
        """The TensorRT part of a run: bind `feeds` and fresh outputs to the context and execute it."""
        ctx = profile.context
        bound: list[torch.Tensor] = []  # keeps converted inputs alive until the engine has run
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            for name in self.inputs:
                if name not in feeds:
                    raise EngineError(f"the engine takes an input '{name}' outside the engine contract")
                t = feeds[name].to(device=self.device, dtype=self.io[name][1]).contiguous()
                bound.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise EngineError(f"{profile.name} profile refused shape {list(t.shape)} for {name}")
                ctx.set_tensor_address(name, self._address(t))
            outputs: dict[str, torch.Tensor] = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"{profile.name} profile: output {name} has unresolved shape {list(shape)}")
                outputs[name] = torch.empty(shape, dtype=self.io[name][1], device=self.device)
                ctx.set_tensor_address(name, self._address(outputs[name]))
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise EngineError(f"{profile.name} profile: TensorRT execution failed (see the TensorRT log)")
        present = [outputs[name] for name in cache_names(PRESENT, self.info.num_layers)]
        return outputs[LOGITS].float(), KVCache(list(zip(present[::2], present[1::2])))

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._scratch.data_ptr()


def _describe(trt: Any, engine: Any) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], list[str], list[str]]:
    """(IO name -> (shape, dtype), input names, output names) of a deserialized engine: the same for every profile."""
    inputs, outputs, io = [], [], {}
    for i in range(engine.num_io_tensors):
        tensor = engine.get_tensor_name(i)
        io[tensor] = (tuple(engine.get_tensor_shape(tensor)), torch_dtype(engine.get_tensor_dtype(tensor)))
        (inputs if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT else outputs).append(tensor)
    return io, inputs, outputs
