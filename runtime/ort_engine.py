"""Run an exported model with ONNX Runtime: `OrtEngine(Engine)`, from OUT alone.

OUT (see runtime/manifest.py) holds `prefill.onnx` and `decode.onnx` sharing one weight file.
`step` runs the decode graph for one new token against a non-empty cache (S == 1, P > 0) and the
prefill graph otherwise, through IOBinding:
- inputs are bound by pointer from contiguous CPU torch tensors (no copy on the CPU provider);
- ONNX Runtime allocates the outputs; the `present.*` OrtValues are kept as they are in an
  `OrtKVCache` and bound as the next step's `past.*` (no numpy or torch round trip per step);
  they become torch tensors (zero-copy, DLPack) only when someone reads `cache.layers`;
- logits come back as a float32 torch tensor (zero-copy view of ORT's output on CPU).

Provider: "auto" picks CUDA when onnxruntime offers it and a CUDA GPU is present, else CPU;
"cpu", "cuda" and "tensorrt" insist. Session logs are limited to errors: a CPU machine with the
onnxruntime-gpu wheel prints nothing alarming.

Shape legend: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch

from runtime.engine import Engine, EngineInfo, KVCache, choose_graph
from runtime.errors import EngineError
from runtime.manifest import read_manifest

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                 "tensorrt": "TensorrtExecutionProvider"}
# onnx.TensorProto element types (ints are what IOBinding and OrtValue accept for bfloat16 too).
_ONNX_TYPES = {torch.float32: 1, torch.int64: 7, torch.float16: 10, torch.bfloat16: 16}


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
        why = "no CUDA GPU is present" if wanted in available else f"this onnxruntime has only {available}"
        raise EngineError(f"provider {provider!r} is not usable here: {why}")
    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}[provider]
    return [_ORT_PROVIDER[p] for p in chain]


class OrtKVCache(KVCache):
    """The latent cache as ONNX Runtime's own OrtValues: [kv_latent.0, k_rope.0, kv_latent.1, ...]."""

    def __init__(self, values: list[Any], length: int):
        self.values = values
        self._length = length
        self._torch: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        return self._length

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Torch views of the OrtValues (DLPack, no copy), made on first use."""
        if self._torch is None:
            t = [torch.from_dlpack(v._ortvalue) for v in self.values]
            self._torch = [(t[i], t[i + 1]) for i in range(0, len(t), 2)]
        return self._torch

    @layers.setter
    def layers(self, value) -> None:  # KVCache's dataclass fields are assignable; keep that true
        raise AttributeError("OrtKVCache is read-only: build a KVCache from torch tensors instead")


class OrtEngine(Engine):
    """Prefill and decode ONNX Runtime sessions over one OUT folder."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], sessions: dict[str, Any], device: str):
        self.out_dir, self.manifest, self.sessions, self.device = out_dir, manifest, sessions, device
        self.info = EngineInfo.from_manifest(manifest, str(out_dir / "manifest.json"))
        n = self.info.num_layers
        self._past = [f"past.{i}.{k}" for i in range(n) for k in ("kv_latent", "k_rope")]
        self._present = [f"present.{i}.{k}" for i in range(n) for k in ("kv_latent", "k_rope")]
        for name, session in sessions.items():
            got = [i.name for i in session.get_inputs()]
            if got != ["input_ids", "position_ids", "attention_mask", *self._past]:
                raise EngineError(f"{out_dir / manifest['graphs'][name]['file']}: inputs {got} do not follow "
                                  "the engine contract")

    @classmethod
    def load(cls, out_dir: str | Path, provider: str = "auto", threads: int | None = None) -> "OrtEngine":
        """Open OUT: validate the manifest and files, create both sessions on the chosen provider."""
        out = Path(out_dir)
        manifest = read_manifest(out)
        if manifest.get("target") != "onnxruntime":
            raise EngineError(f"{out / 'manifest.json'}: target {manifest.get('target')!r} is not onnxruntime")
        providers = choose_providers(provider)
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        if threads is not None:
            if threads < 1:
                raise EngineError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        sessions = {}
        for name in ("prefill", "decode"):
            path = out / manifest["graphs"][name]["file"]
            try:
                sessions[name] = ort.InferenceSession(os.fspath(path), options, providers=providers)
            except Exception as err:  # ORT raises its own Fail/InvalidGraph/RuntimeException types
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise EngineError(f"{path}: ONNX Runtime cannot load it: {first}") from None
        device = "cuda" if providers[0] != "CPUExecutionProvider" else "cpu"
        return cls(out, manifest, sessions, device)

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
             cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        B, S = input_ids.shape
        P = cache.length if cache is not None else 0
        self.check_inputs(input_ids, P, position_ids, attention_mask)
        session = self.sessions[choose_graph(S, P)]
        binding = session.io_binding()
        keep = []  # tensors whose memory is bound by pointer: alive until the run returns
        for name, t in (("input_ids", input_ids), ("position_ids", position_ids), ("attention_mask", attention_mask)):
            keep.append(self._bind_tensor(binding, name, t.to(torch.int64)))
        if isinstance(cache, OrtKVCache):
            if len(cache.values) != len(self._past):
                raise EngineError(f"cache has {len(cache.values) // 2} layers, the engine {self.info.num_layers}")
            for name, value in zip(self._past, cache.values):
                binding.bind_ortvalue_input(name, value)
        else:
            layers = cache.layers if cache is not None else None
            if layers is not None and len(layers) != self.info.num_layers:
                raise EngineError(f"cache has {len(layers)} layers, the engine {self.info.num_layers}")
            for i in range(self.info.num_layers):
                for j, dim in enumerate((self.info.kv_lora_rank, self.info.qk_rope_head_dim)):
                    t = layers[i][j] if layers is not None else torch.zeros(B, 0, dim, dtype=self.info.cache_dtype)
                    if tuple(t.shape) != (B, P, dim):
                        raise EngineError(f"cache tensor {self._past[2 * i + j]} has shape {tuple(t.shape)}, "
                                          f"expected {(B, P, dim)}")
                    keep.append(self._bind_tensor(binding, self._past[2 * i + j], t.to(self.info.cache_dtype)))
        binding.bind_output("logits", "cpu")
        for name in self._present:
            binding.bind_output(name, self.device)
        try:
            session.run_with_iobinding(binding)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EngineError(f"ONNX Runtime failed on a step with B={B}, S={S}, P={P}: {first}") from None
        outputs = binding.get_outputs()
        logits = torch.from_dlpack(outputs[0]._ortvalue)
        return logits.float(), OrtKVCache(list(outputs[1:]), P + S)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden state after each block for a prefill (debug exports only: outputs `hidden.{i}`)."""
        session = self.sessions["prefill"]
        names = [o.name for o in session.get_outputs() if o.name.startswith("hidden.")]
        if len(names) != self.info.num_layers:
            raise EngineError(f"{self.out_dir}: not a debug export (no hidden.{{i}} outputs)")
        B = input_ids.shape[0]
        feeds = {"input_ids": input_ids.numpy(), "position_ids": position_ids.numpy(),
                 "attention_mask": attention_mask.numpy()}
        empty = KVCache.empty(self.info, B)
        for name, t in zip(self._past, (t for layer in empty.layers for t in layer)):
            feeds[name] = t.numpy()
        return [torch.from_numpy(v) for v in session.run(names, feeds)]

    def _bind_tensor(self, binding, name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu").contiguous()
        if t.numel() == 0:  # an empty tensor may have no storage; ORT gets a real (empty) OrtValue
            value = _ort().OrtValue.ortvalue_from_shape_and_type(list(t.shape), _ONNX_TYPES[t.dtype])
            binding.bind_ortvalue_input(name, value)
            return value
        binding.bind_input(name, "cpu", 0, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())
        return t
