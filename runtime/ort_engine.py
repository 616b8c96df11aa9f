"""Run an exported model with ONNX Runtime: `OrtEngine(Engine)`, from OUT alone.

OUT (see runtime/manifest.py) holds `prefill.onnx` and `decode.onnx` sharing one weight file.
`step` runs the decode graph for one new token against a non-empty cache (S == 1, P > 0) and the
prefill graph otherwise, through IOBinding:
- inputs are bound by pointer from contiguous CPU torch tensors (no copy on the CPU provider);
- ONNX Runtime allocates the outputs; the `present.*` OrtValues are kept as they are in an
  `OrtKVCache` and bound as the next step's `past.*` (no numpy or torch round trip per step);
  they become torch tensors (zero-copy, DLPack) only when someone reads `cache.layers`;
- logits come back as a float32 torch tensor (zero-copy view of ORT's output on CPU).

In-place steps (CPU provider, exports that have `graphs.decode.in_place`, which then runs every
decode step, and every step where it takes any number of new tokens): the contract's decode graph
copies the whole cache into a new `present` every step (Concat), and ORT allocates those outputs
afresh. The in-place graph (lowering.in_place.in_place_decode) instead writes the S new rows into
capacity buffers bound as both its cache inputs and outputs. The cache it returns is an
`OrtCapacityCache`: rows [0, P) of `CacheBuffers` of capacity T (a multiple of CAPACITY_STEP).
Stepping from a cache of length P writes rows [P, P + S) of its buffers when no live cache reads
them (the usual chain: each step's cache replaces the previous one, or the returned cache is
dropped); otherwise, or when the buffers are too small, the rows are first copied into new
buffers. So a cache never changes under whoever holds it, and a generation loop copies the cache
once per CAPACITY_STEP tokens instead of every token. `own_cache` turns any cache into this form up front.
The in-place graph's IOBinding is kept with the buffers it binds and reused while the step's shapes stay
(ort_cache.InPlaceBindings): a step fills its inputs and runs.

Weights: one copy for all sessions. ONNX Runtime memory-maps external data stored at page-aligned
offsets (lowering/weights.py save_models writes them so), and every session of OUT maps the same
weights.bin: the pages are the file's, shared by the sessions (and by other processes running the
same OUT). What would copy them is prepacking, where a CPU kernel copies a constant weight into
its own packed layout at session creation: each session then holds its own packed copy (ONNX
Runtime's Python API has no shared prepacked-weights container). It is off by default (`prepack`
turns it on). Measured on the bench config (2.92 GB weights.bin, fp32, 2 threads,
benchmarks/weights_sharing.py): proportional resident memory after a first step 2.70 GB without
prepacking, 3.62 GB with it (load 0.3 s vs 2.6-3.0 s); with it prefill is 4-11% faster and decode
4-5% (README, "Measured"). Session loading goes through `WeightsFile.open` first (runtime/weights.py):
a truncated or foreign weights.bin is refused before any session opens, and a write into the file
while the engine runs stops the next step.

One device copy on a GPU: ONNX Runtime's CUDA provider copies every initializer of a session to the
device, so on CUDA and TensorRT ONE session, of the contract's decode graph, runs every step; steps
through a half-precision decode graph are cut into chunks of `max_step_tokens` new tokens
(runtime/ort_sessions.py says which graphs open per provider, and why).

Quantized engines (`export --weights int8|int4`): MatMulNBits and QMoE compute from a packed
layout they build when the session is created (prepacking); without it they unpack every weight
on every call. Two sessions would hold two packed copies, so ONE session runs prefill and decode
steps: of the in-place graph made for any number of new tokens (`new_tokens` "any": the causal
limit of new token j is write_index + j), so a prefill writes its rows into capacity buffers and
each decode step writes one row, neither copying the cache (exports without it: the contract's
decode graph, whose Concat copies it every step: 0.8 ms of an 18 ms int4 step at context 1024;
in place, decode takes 0.95-0.97x the time at contexts 128 and 1024: benchmarks/in_place_steps.py).
Measured on the bench config, int4 (705 MB weights.bin): proportional resident memory 0.86x
weights.bin after a first step; decode at context 1024 in 18 ms, prefill of 128 tokens in 0.92 s;
with two prepacked sessions 1.4x.

Provider: "auto" picks CUDA when onnxruntime offers it and a CUDA GPU is present, else CPU;
"cpu", "cuda" and "tensorrt" insist. ONNX Runtime itself never refuses a GPU provider: where its
library does not load (no GPU, no CUDA 13 libraries, no TensorRT) it logs a warning and runs the
session on CPU, and its Python API retries a failed session on CPU ("Falling back to
['CPUExecutionProvider']"). So every GPU session is opened without the Python retry and checked
with `session.get_providers()`: a session that did not get the provider asked for is refused in
one line (`ProviderUnavailable`), and "auto" reopens on CPU and says so in `notes`. The session
config entry `session.disable_cpu_ep_fallback` is not used: it fails any session with a node on
the CPU provider, and the CUDA provider leaves shape computations there by design.

Float32 is IEEE float32: the CUDA provider's default `use_tf32=1` (GEMM inputs rounded to 10
mantissa bits) is turned off unless `tf32=True` (`provider_chain`). ONNX Runtime's TensorRT
provider has no such option (TensorRT builds with TF32), so a float32 engine runs on it only with
`tf32=True`. The TensorRT provider gets explicit optimization profiles from the manifest's limits
and an engine cache (ort_sessions.tensorrt_provider_options). Session logs are limited to errors:
a CPU machine with the onnxruntime-gpu wheel prints nothing alarming.

Shape legend: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import torch

from dscompile.errors import EngineError, OptionError, first_line
from dscompile.runtime.contract import (ATTENTION_MASK, DECODE, DECODE_IN_PLACE, INPUT_IDS, LOGITS, LOGITS_FROM, PAST,
                                        POSITION_IDS, PREFILL, PRESENT, STEP_INPUTS, WRITE_INDEX, EngineInfo, KVCache,
                                        cache_names, choose_graph)
from dscompile.runtime.engine import Engine, SlotCache
from dscompile.runtime.ort_cache import CacheBuffers, InPlaceBindings, OrtCapacityCache, OrtKVCache
from dscompile.runtime.manifest import read_manifest
from dscompile.runtime.native import register_for as register_native
from dscompile.runtime.ort_sessions import (max_step_tokens, session_graphs, tensorrt_cache_dir,
                                            tensorrt_provider_options)
from dscompile.runtime.weights import WeightsFile

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
# onnx.TensorProto element types (ints are what IOBinding and OrtValue accept for bfloat16 too).
_ONNX_TYPES = {torch.float32: 1, torch.int64: 7, torch.float16: 10, torch.bfloat16: 16}
CAPACITY_STEP = 128  # tokens: in-place cache buffers grow by this much (one copy per CAPACITY_STEP steps)


def cuda_gpu_present() -> bool:
    """A CUDA driver that reports at least one device (without importing torch.cuda or starting ORT's CUDA)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    return False


def _ort():
    try:
        import onnxruntime  # noqa: PLC0415 - the engine's one heavy dependency, imported when used
    except ImportError as err:
        raise EngineError(f"onnxruntime is not installed ({err}): pip install onnxruntime-gpu (Linux x86-64) "
                          "or onnxruntime") from None
    return onnxruntime


# What ONNX Runtime's GPU providers load (onnxruntime-gpu 1.31, CUDA 13 builds), to name what is missing.
_LIBRARIES = {"cuda": ("libcudart.so.13", "libcublas.so.13", "libcudnn.so.9"),
              "tensorrt": ("libcudart.so.13", "libcublas.so.13", "libcudnn.so.9", "libnvinfer.so.10")}
_CHAINS = {"cpu": ("cpu",), "cuda": ("cuda", "cpu"), "tensorrt": ("tensorrt", "cuda", "cpu")}


class ProviderUnavailable(EngineError):
    """The ONNX Runtime provider asked for cannot run here (no GPU, or its libraries do not load)."""


def choose_providers(provider: str) -> list[str]:
    """ONNX Runtime provider list for `provider` (see the module docstring), or an EngineError."""
    if provider not in PROVIDERS:
        raise EngineError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    available = _ort().get_available_providers()
    gpu = cuda_gpu_present()
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in available and gpu else "cpu"
    wanted = _ORT_PROVIDER[provider]
    if wanted not in available or (provider != "cpu" and not gpu):
        why = (missing_for(provider) or "no CUDA GPU is present") if wanted in available else \
            f"this onnxruntime has only {available}"
        raise ProviderUnavailable(f"provider {provider!r} is not usable here: {why}")
    return [_ORT_PROVIDER[p] for p in _CHAINS[provider]]


def missing_for(provider: str) -> str | None:
    """What keeps `provider` ("cuda" or "tensorrt") from loading here, in words; None when the GPU
    and the libraries it loads are all found."""
    missing = []
    for lib in _LIBRARIES.get(provider, ()):
        try:
            ctypes.CDLL(lib)
        except OSError:
            missing.append(lib)
    parts = ([] if cuda_gpu_present() else ["no CUDA GPU is present"]) + ([f"{', '.join(missing)} not found"]
                                                                          if missing else [])
    return " and ".join(parts) or None


def provider_chain(providers: list[str], tf32: bool = False, tensorrt: dict[str, str] | None = None
                   ) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) pairs a session is created with: the CUDA provider computes float32
    GEMMs in IEEE float32 (`use_tf32` "0") unless `tf32` opts in to TF32; the TensorRT provider
    gets `tensorrt` (tensorrt_provider_options)."""
    options = {"CUDAExecutionProvider": {"use_tf32": "1" if tf32 else "0"},
               "TensorrtExecutionProvider": dict(tensorrt or {})}
    return [(p, options.get(p, {})) for p in providers]


def _open_sessions(ort, out: Path, manifest: dict[str, Any], options, chain: list[tuple[str, dict[str, str]]]
                   ) -> dict[str, Any]:
    """The sessions OUT needs on `chain` (provider_chain; which graphs: session_graphs), each refused
    with ProviderUnavailable when ONNX Runtime did not give it the first provider of the chain."""
    wanted = chain[0][0]
    cpu = wanted == "CPUExecutionProvider"
    plan = session_graphs(manifest, wanted)
    by_file: dict[str, Any] = {}
    name = {v: k for k, v in _ORT_PROVIDER.items()}[wanted]
    for file in dict.fromkeys(plan.values()):
        path = out / file
        if not cpu:  # a provider that does not load logs errors on fd 2: the one-line refusal below says it
            ort.set_default_logger_severity(4)
        try:
            # enable_fallback=0: no silent retry on CPU by ONNX Runtime's Python API (module docstring).
            session = ort.InferenceSession(os.fspath(path), options, providers=[p for p, _ in chain],
                                           provider_options=[o for _, o in chain], enable_fallback=0)
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
            why = None if cpu else missing_for(name)
            if why:  # the provider's own libraries, not the graph (TensorRT's plugins fail here)
                raise ProviderUnavailable(f"provider {name!r} is not usable here: {why}") from None
            raise EngineError(f"{path}: ONNX Runtime cannot load it: {first_line(err)}") from None
        finally:
            if not cpu:
                ort.set_default_logger_severity(2)  # ONNX Runtime's default (warnings)
        got = session.get_providers()
        if got[0] != wanted:  # ONNX Runtime skipped the provider (its library did not load) and went on
            why = missing_for(name) or "its library did not load (a dependency missing, or a driver too old)"
            raise ProviderUnavailable(f"provider {name!r} is not usable here: {why} (ONNX Runtime gave the "
                                      f"session {got[0]} instead)")
        by_file[file] = session
    return {graph: by_file[file] for graph, file in plan.items()}


class OrtEngine(Engine):
    """Prefill and decode ONNX Runtime sessions over one OUT folder."""

    capacity_step = CAPACITY_STEP

    def __init__(self, out_dir: Path, manifest: dict[str, Any], sessions: dict[str, Any], device: str,
                 weights: WeightsFile, provider: str = "CPUExecutionProvider", notes: tuple[str, ...] = ()):
        self.out_dir, self.manifest, self.sessions, self.device = out_dir, manifest, sessions, device
        self.weights = weights
        self.provider, self.notes = provider, notes  # what the sessions run on, and why when auto fell back
        self.max_step_tokens = max_step_tokens(manifest, provider)  # longer steps run in chunks (None: no limit)
        self.info = EngineInfo.from_manifest(manifest, str(out_dir / "manifest.json"))
        # graph -> whether its session takes the optional `logits_from` (lowering/logits.py)
        self._logits_from = {name: any(i.name == LOGITS_FROM for i in s.get_overridable_initializers())
                             for name, s in sessions.items()}
        n = self.info.num_layers
        self._past, self._present = cache_names(PAST, n), cache_names(PRESENT, n)
        # the in-place graph runs every step (quantized CPU engines: ort_sessions.session_graphs)
        self._any_in_place = DECODE_IN_PLACE in sessions and sessions.get(PREFILL) is sessions[DECODE_IN_PLACE]
        if DECODE_IN_PLACE in sessions:
            self._in_place = InPlaceBindings(sessions[DECODE_IN_PLACE], self._past, self._present,
                                             _ONNX_TYPES[self.info.cache_dtype], self.info.vocab_size)
        for name, session in sessions.items():
            got = [i.name for i in session.get_inputs()]
            want = [*STEP_INPUTS, *self._past]
            in_place = name == DECODE_IN_PLACE or (name == PREFILL and self._any_in_place)
            graph = manifest["graphs"][DECODE]["in_place"] if in_place else manifest["graphs"][name]
            if got != (want + [WRITE_INDEX] if in_place else want):
                raise EngineError(f"{out_dir / graph['file']}: inputs {got} do not follow the engine contract")

    @classmethod
    def load(cls, out_dir: str | Path, provider: str = "auto", threads: int | None = None,
             prepack: bool = False, tf32: bool = False, profile_prefix: str | None = None) -> "OrtEngine":
        """Open OUT: validate the manifest and files, create both sessions on the chosen provider.

        `prepack` lets ONNX Runtime's kernels copy their constant weights into packed layouts when
        a session is created (see "Weights" in the module docstring): faster GEMMs for long
        prefills, one more copy of those weights per session. `tf32` lets the CUDA provider round
        float32 GEMM inputs to TF32 (see "Provider"; `compare` then judges with tolerance.TF32).
        `profile_prefix` turns on ONNX Runtime's profiler (its JSON files start with it; `end_profiling`).
        """
        out = Path(out_dir)
        manifest = read_manifest(out)
        if manifest.get("runtime", "onnxruntime") != "onnxruntime":
            raise EngineError(f"{out / 'manifest.json'}: runtime {manifest.get('runtime')!r} is not onnxruntime")
        quant = manifest.get("quantization")
        asked = quant.get("provider", "cpu") if quant and provider == "auto" else provider
        providers = choose_providers(asked)
        if quant and providers[0] != _ORT_PROVIDER[quant.get("provider", "cpu")]:
            raise EngineError(f"{out}: an {quant.get('scheme')} engine is lowered for ONNX Runtime's "
                              f"{quant.get('provider', 'cpu')} kernels ({manifest['dtype']} MatMulNBits/QMoE); "
                              f"run it with --provider {quant.get('provider', 'cpu')}")
        if providers[0] == _ORT_PROVIDER["tensorrt"] and manifest["dtype"] == "float32" and not tf32:
            raise OptionError(f"{out}: a float32 engine on ONNX Runtime's TensorRT provider would compute in TF32 "
                              "(TensorRT builds with it, and the provider has no option to turn it off): "
                              "use --provider cuda, or opt in with --tf32")
        cls.check_device(out, manifest, providers[0])
        weights = WeightsFile.open(out, manifest)  # a truncated or foreign file stops here, before any session
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        if not prepack and not quant:  # quantized kernels need their packed layout (below)
            options.add_session_config_entry("session.disable_prepacking", "1")
        if threads is not None:
            if threads < 1:
                raise EngineError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        register_native(manifest, options, out)  # engines exported with --native-kernels (runtime/native)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        notes = []
        trt = None
        if providers[0] == _ORT_PROVIDER["tensorrt"] and missing_for("tensorrt") is None:
            # (where the provider cannot load, opening the session says so first: ProviderUnavailable)
            trt = tensorrt_provider_options(manifest, tensorrt_cache_dir(out))
            Path(trt["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        try:
            sessions = _open_sessions(ort, out, manifest, options, provider_chain(providers, tf32, trt))
        except ProviderUnavailable as err:
            if provider != "auto":
                raise
            notes.append(f"{err}: running on CPU")
            providers = choose_providers("cpu")
            cls.check_device(out, manifest, providers[0])
            sessions = _open_sessions(ort, out, manifest, options, provider_chain(providers))
        device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        return cls(out, manifest, sessions, device, weights, providers[0], tuple(notes))

    @staticmethod
    def check_device(out: Path, manifest: dict[str, Any], provider: str) -> None:
        """Refuse a half-precision export lowered for the CUDA provider (`export --device cuda`) on CPU:
        ONNX Runtime's CPU com.microsoft.MoE returns zeros for float16 instead of failing, and a quantized
        one's MatMulNBits/QMoE are set for the CUDA kernels (half-precision scales, QMoE weights_prepacked=0
        for the GPU's own repacking; bfloat16 has no CPU kernels at all)."""
        if manifest.get("device", "cpu") != "cuda" or manifest["dtype"] == "float32" \
                or provider != "CPUExecutionProvider":
            return
        quantization = manifest.get("quantization")
        if quantization:
            raise EngineError(f"{out}: an {quantization['scheme']} {manifest['dtype']} engine exported for CUDA (--device "
                              "cuda) runs on ONNX Runtime's CUDA provider only (its MatMulNBits/QMoE nodes are set for "
                              "the CUDA kernels): run it with --provider cuda on a GPU, or export with --device cpu "
                              "(float32)")
        raise EngineError(f"{out}: a {manifest['dtype']} engine exported for CUDA (--device cuda) runs on ONNX "
                          "Runtime's CUDA provider only (its CPU MoE kernel has no half precision): run it with "
                          "--provider cuda on a GPU, or export with --device cpu")

    def _step_last(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """The last token's logits: graphs with `logits_from` (lowering/logits.py) compute no others."""
        return self._step(input_ids, position_ids, attention_mask, cache, last_only=True)

    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
              cache: KVCache | None, last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        B, S = input_ids.shape
        P = cache.length if cache is not None else 0
        if self.max_step_tokens is not None and S > self.max_step_tokens:
            return self._step_in_chunks(input_ids, position_ids, attention_mask, cache, last_only)
        graph = choose_graph(S, P, in_place=DECODE_IN_PLACE in self.sessions)
        if graph == DECODE_IN_PLACE or self._any_in_place:
            return self._step_in_place(input_ids, position_ids, attention_mask, cache, last_only)
        session = self.sessions[graph]
        binding = session.io_binding()
        keep = []  # tensors whose memory is bound by pointer: alive until the run returns
        for name, t in zip(STEP_INPUTS, (input_ids, position_ids, attention_mask)):
            keep.append(self._bind_tensor(binding, name, t.to(torch.int64)))
        sliced = last_only and S > 1 and self._logits_from[graph]
        if sliced:
            keep.append(self._bind_tensor(binding, LOGITS_FROM, torch.tensor([S - 1])))
        if isinstance(cache, OrtKVCache):
            if len(cache.values) != len(self._past):
                raise EngineError(f"cache has {len(cache.values) // 2} layers, the engine {self.info.num_layers}")
            for name, value in zip(self._past, cache.values):
                binding.bind_ortvalue_input(name, value)
        else:
            for name, t in zip(self._past, self._cache_rows(cache, B, P)):
                keep.append(self._bind_tensor(binding, name, t))
        binding.bind_output(LOGITS, "cpu")
        for name in self._present:
            binding.bind_output(name, self.device)
        self._run(session, binding, B=B, S=S, P=P)
        outputs = binding.get_outputs()
        logits = torch.from_dlpack(outputs[0]._ortvalue)
        return (logits if sliced or not last_only else logits[:, -1:]).float(), OrtKVCache(list(outputs[1:]), P + S)

    def _step_in_chunks(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                        cache: KVCache | None, last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """S new tokens as consecutive steps of at most max_step_tokens (Engine._step_planned)."""
        return self._step_planned(lambda _graph, *step: self._step(*step, last_only=last_only), input_ids,
                                  position_ids, attention_mask, cache, self.max_step_tokens, last_only)

    def end_profiling(self) -> list[str]:
        """Stop the profiler of every session (loaded with `profile_prefix`); the JSON files it wrote."""
        return [f for f in dict.fromkeys(s.end_profiling() for s in dict.fromkeys(self.sessions.values())) if f]

    def own_cache(self, cache: KVCache) -> KVCache:
        """`cache` in capacity buffers when decode runs in place (rows copied once), else as it is."""
        if DECODE_IN_PLACE not in self.sessions or cache.length == 0 or isinstance(cache, OrtCapacityCache):
            return cache
        return self._new_buffers(cache, int(cache.layers[0][0].shape[0])).cache(cache.length)

    def truncated_cache(self, cache: KVCache, length: int) -> KVCache:
        """In-place buffers are cut without a copy: the rows after `length` become free again."""
        if isinstance(cache, OrtCapacityCache):
            return cache.buffers.cache(length)
        return super().truncated_cache(cache, length)

    def _step_in_place(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                       cache: KVCache | None, last_only: bool = False) -> tuple[torch.Tensor, KVCache]:
        """S new tokens (1 unless the graph takes any) through the in-place graph: rows [P, P + S) of the
        cache buffers are written, nothing copied (unless the buffers are shared or full: module docstring)."""
        (B, S), P = input_ids.shape, cache.length if cache is not None else 0
        if isinstance(cache, OrtCapacityCache) and cache.buffers.batch == B and cache.buffers.writable_at(P, S):
            buffers = cache.buffers
        else:
            buffers = self._new_buffers(cache, B, S)
        logits = self._run_in_place(input_ids, position_ids, attention_mask, P, buffers.values, last_only, buffers)
        return (logits if not last_only or logits.shape[1] == 1 else logits[:, -1:]), buffers.cache(P + S)

    def _run_in_place(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                      write_index: torch.Tensor | int, buffers, last_only: bool, owner: Any) -> torch.Tensor:
        """One run of the in-place graph with `buffers` (OrtValues, or (shape, pointer) pairs of torch
        memory, both owned by `owner`: CacheBuffers or SlotCache, of `capacity` rows) bound as both the
        cache inputs and outputs, through the binding kept for `owner` (ort_cache.InPlaceBindings); `mask`
        covers the first rows, the rows after it are not attended; `write_index`: each row's, or one int
        for every row; float32 logits [B, S or 1, V]."""
        B, S = input_ids.shape
        steps = {INPUT_IDS: input_ids, POSITION_IDS: position_ids, ATTENTION_MASK: mask, WRITE_INDEX: write_index}
        run = functools.partial(self._run, self.sessions[DECODE_IN_PLACE], B=B, S=S, P=write_index)
        return self._in_place.run(owner, run, buffers, steps, owner.capacity,
                                  last_only and S > 1 and self._logits_from[DECODE_IN_PLACE])

    def prefill_slot(self, tokens, slots: SlotCache, slot: int, length: int) -> torch.Tensor:
        """In place into the slot's rows where the in-place graph takes the step (any number of tokens,
        or one after a cached prefix); otherwise through `step`."""
        S = len(tokens)
        if DECODE_IN_PLACE in self.sessions and slots.device == "cpu" and length + S <= slots.capacity \
                and (self._any_in_place or (S == 1 and length > 0)):
            ids = torch.tensor([list(tokens)], dtype=torch.int64)
            return self._ragged_in_place(ids, torch.tensor([length]), slots, slot)[0]
        return super().prefill_slot(tokens, slots, slot, length)

    def step_ragged(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: SlotCache, first: int = 0
                    ) -> torch.Tensor:
        """The ragged decode step in place (CPU engines with the in-place graph): slots [first, first + B)
        of the slot buffers are bound by pointer as both the cache inputs and outputs, each row writes
        its new token at its own `write_index` (its length) and attends rows [0, length]; nothing is
        copied. Elsewhere (GPU providers) the base's form through `step`."""
        if DECODE_IN_PLACE not in self.sessions or slots.device != "cpu":
            return super().step_ragged(tokens, lengths, slots, first)
        return self._ragged_in_place(tokens.reshape(-1, 1), lengths, slots, first)

    def _ragged_in_place(self, ids: torch.Tensor, lengths: torch.Tensor, slots: SlotCache, first: int
                         ) -> torch.Tensor:
        """`ids` [B, S] after each slot's `lengths[b]` rows, in place in slots [first, first + B) (bound by
        pointer); row b attends rows [0, lengths[b] + S). Float32 logits [B, V] of the last new token."""
        (B, S), T = ids.shape, slots.capacity
        lengths = lengths.to(torch.int64)
        if int(lengths.max()) + S > T or int(lengths.min()) < (0 if S > 1 or self._any_in_place else 1):
            raise EngineError(f"ragged step: lengths {lengths.tolist()} + {S} do not fit slots of capacity {T}")
        self.check_inputs(ids, 0)  # ids within the vocabulary (the slots' capacity bounds the lengths)
        if self.weights is not None:
            self.weights.check()
        mask = (torch.arange(T).unsqueeze(0) < (lengths + S).unsqueeze(1)).to(torch.int64)  # own rows + the new
        positions = lengths.unsqueeze(1) + torch.arange(S).unsqueeze(0)
        memory = [([B, T, int(b.shape[-1])], b[first].data_ptr()) for b in slots.tensors]
        return self._run_in_place(ids, positions, mask, lengths, memory, True, slots)[:, -1]

    def _new_buffers(self, cache: KVCache | None, batch: int, new_tokens: int = 1) -> CacheBuffers:
        """Buffers with room for `new_tokens` more rows at least, holding `cache`'s rows (free rows zero)."""
        P = cache.length if cache is not None else 0
        capacity = (P + new_tokens + self.capacity_step - 1) // self.capacity_step * self.capacity_step
        rows = self._cache_rows(cache, batch, P)
        return CacheBuffers.holding(_ort(), rows, capacity, _ONNX_TYPES[self.info.cache_dtype])

    def _cache_rows(self, cache: KVCache | None, B: int, P: int) -> list[torch.Tensor]:
        """The cache as [B, P, dim] tensors in contract order (views where possible), or an EngineError."""
        if isinstance(cache, OrtCapacityCache):
            if cache.buffers.batch != B or len(cache.buffers.values) != len(self._past):
                raise EngineError(f"cache holds batch {cache.buffers.batch} and {len(cache.buffers.values) // 2} "
                                  f"layers, the step batch {B} and the engine {self.info.num_layers} layers")
            return cache.rows()
        layers = cache.layers if cache is not None else None
        if layers is not None and len(layers) != self.info.num_layers:
            raise EngineError(f"cache has {len(layers)} layers, the engine {self.info.num_layers}")
        rows = []
        for i in range(self.info.num_layers):
            for j, dim in enumerate(self.info.cache_widths):
                t = layers[i][j] if layers is not None else torch.zeros(B, 0, dim, dtype=self.info.cache_dtype)
                if tuple(t.shape) != (B, P, dim):
                    raise EngineError(f"cache tensor {self._past[2 * i + j]} has shape {tuple(t.shape)}, "
                                      f"expected {(B, P, dim)}")
                rows.append(t.to(self.info.cache_dtype))
        return rows

    @staticmethod
    def _run(session, binding, *, B: int, S: int, P: int | torch.Tensor) -> None:
        """Run `binding`; an EngineError naming the step's B, S and P (P: past tokens, or each row's
        write_index, the largest named: read only on failure) where ONNX Runtime fails."""
        try:
            session.run_with_iobinding(binding)
        except Exception as err:
            first = first_line(err)
            P = int(P.max()) if isinstance(P, torch.Tensor) else P
            raise EngineError(f"ONNX Runtime failed on a step with B={B}, S={S}, P={P}: {first}") from None

    def _bind_tensor(self, binding, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu").contiguous()
        if t.numel() == 0:  # an empty tensor may have no storage; ORT gets a real (empty) OrtValue
            value = _ort().OrtValue.ortvalue_from_shape_and_type(list(t.shape), _ONNX_TYPES[t.dtype])
            binding.bind_ortvalue_input(name, value)
            return value
        binding.bind_input(name, "cpu", 0, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
        return t
