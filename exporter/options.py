"""The export's options: one frozen dataclass, its defaults and its validation.

`dscompile export`, `dscompile.export(...)`, `dscompile demo`, the bench's engines and
`export_checkpoint` all build an `ExportOptions`, so they export with the same defaults (those the
README documents for the command line) and refuse the same values with the same one-line
OptionError, which names the command-line flag at fault. Options are checked when the object is
built, before any checkpoint is read; what needs the checkpoint (a sharding plan that must divide
the model, a quantization block that must divide a weight) is checked by the export itself.

The stages' tables (dtypes, absorb forms, frontends, block sizes) are imported when an object is
checked, not with the module: the command line reads its defaults from here without loading torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dscompile.dtypes import DTYPES, SPELLINGS
from dscompile.errors import OptionError

if TYPE_CHECKING:
    from dscompile.capture import Limits
    from dscompile.model.quant import Scheme
    from dscompile.passes.shard import Plan

TARGETS = ("onnxruntime", "tensorrt")  # what the lowering is restricted for
DEVICES = ("cpu", "cuda")  # where an ONNX Runtime engine will run: picks the lowerings its kernels have
WEIGHT_FORMATS = {"int8": 8, "int4": 4}  # --weights: block-wise weight-only quantization (model/quant.py)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ONNX Runtime's MatMulNBits/QMoE accuracy_level attribute
MIN_OPSET = 23  # the lowering emits RMSNormalization and Attention
TRT_WORKSPACE_GB = 8.0  # TensorRT's builder workspace for `--target tensorrt` engines


@dataclass(frozen=True)
class ExportOptions:
    """Every option of an export, with the command line's defaults; invalid values raise OptionError."""

    # numerics
    dtype: str = "float32"  # float32, float16 or bfloat16 (or fp32, fp16, bf16)
    weights: str | None = None  # int8 / int4: block-wise weight-only quantization; None: the dtype
    block_size: int = 32  # values per quantization scale with `weights`
    lm_head_bits: int = 8  # lm_head's bits with `weights` (model/quant.py: 8, as llama.cpp keeps its output layer wider)
    accuracy_level: int | None = None  # None: the kernels' measured setting (lowering/quantize.py)
    calibration: str | None = None  # a text file: quantization scales chosen by the activations on it (model/calibration.py)
    native_kernels: bool = False  # float32 on CPU: dscompile's own ONNX Runtime kernels (runtime/native)
    # passes
    absorb: str = "auto"  # MLA absorption: auto (cost model), fold, reassociate or none
    fuse_moe: bool = True
    verify: bool = False  # check each pass (and a quantized engine) numerically
    # lowering
    opset: int = MIN_OPSET
    target: str = "onnxruntime"  # or tensorrt: standard ONNX ops only, and TensorRT engines (the API builds them)
    device: str = "cpu"  # cuda: ONNX Runtime graphs for its CUDA provider (com.microsoft.MoE in float16/bfloat16;
    #                      with `weights`, MatMulNBits/QMoE in float16/bfloat16: lowering/quantize.py)
    precision: str = "fp16"  # TensorRT engines' precision (target tensorrt)
    tf32: bool = False  # fp32 TensorRT engines compute GEMMs in TF32 (opt-in; else IEEE float32)
    # the engines' limits: the captured graphs' dynamic ranges
    max_batch: int = 64
    max_prompt_tokens: int = 4096  # the most tokens one step takes
    max_context: int = 16384  # past + new tokens
    # what is captured and written
    frontend: str = "dscompile"  # the PyTorch code captured: our model, or transformers' own
    graphs_only: bool = False  # graphs and manifest from the config alone, no weights
    tp: int = 1  # tensor-parallel ranks
    ep: int = 1  # expert-parallel ranks
    # the job
    force: bool = False  # replace a non-empty OUT
    allow_nonfinite: bool = False  # export NaN/Inf weights (with a warning) instead of refusing them

    def __post_init__(self) -> None:
        from dscompile.passes.absorb_mla import FORMS as ABSORB_FORMS  # noqa: PLC0415 - module docstring

        object.__setattr__(self, "dtype", SPELLINGS.get(self.dtype, self.dtype))  # frozen: normalized once
        if self.dtype not in DTYPES:
            raise OptionError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.absorb not in ABSORB_FORMS:
            raise OptionError(f"--absorb {self.absorb!r} is not one of {', '.join(ABSORB_FORMS)}")
        if self.target not in TARGETS:
            raise OptionError(f"--target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.device not in DEVICES:
            raise OptionError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.device != "cpu" and self.target != "onnxruntime":
            raise OptionError(f"--device {self.device} is an option of --target onnxruntime (TensorRT engines run on "
                              "the GPU by construction)")
        if self.opset < MIN_OPSET:
            raise OptionError(f"--opset {self.opset} is too old: the lowering needs opset >= {MIN_OPSET} "
                              "(RMSNormalization, Attention)")
        try:
            self.limits  # noqa: B018 - Limits checks its own rules
        except ValueError as err:  # the limits name the rule they break
            raise OptionError(f"--max-batch/--max-prompt-tokens/--max-context: {str(err).split(': ', 1)[-1]}") from None
        scheme = self.scheme
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise OptionError(f"accuracy level {self.accuracy_level} is not one of 0-4")
        self._check_calibration(scheme)
        self._check_native(scheme)
        self._check_frontend(scheme)
        if self.graphs_only and self.verify:
            raise OptionError("--graphs-only and --verify: verifying the passes runs the model on its weights, "
                              "which a graph-only export does not read")
        self._check_sharding(scheme)
        if self.tf32 and self.target != "tensorrt":
            raise OptionError("--tf32 is a TensorRT build option (--target tensorrt); ONNX Runtime engines take "
                              "it at run time (run/compare --tf32)")
        if self.builds_tensorrt:
            from dscompile.lowering.tensorrt.build import validate_options  # noqa: PLC0415 - TensorRT's module

            validate_options(self.precision, self.max_batch, self.max_prompt_tokens, self.max_context,
                             TRT_WORKSPACE_GB, self.tf32)

    @classmethod
    def within(cls, limits: Limits, **options) -> ExportOptions:
        """Options whose engine limits are `limits` (capture's Limits), the others as given."""
        return cls(max_batch=limits.max_batch, max_prompt_tokens=limits.max_prompt_tokens,
                   max_context=limits.max_context, **options)

    @property
    def limits(self) -> Limits:
        from dscompile.capture import Limits  # noqa: PLC0415 - module docstring

        return Limits(max_batch=self.max_batch, max_prompt_tokens=self.max_prompt_tokens,
                      max_context=self.max_context)

    @property
    def scheme(self) -> Scheme | None:
        """The quantization scheme of `weights` / `block_size`, or None (weights stored at the dtype)."""
        from dscompile.model.quant import BLOCK_SIZES, HEAD_BITS, Scheme  # noqa: PLC0415 - module docstring

        if self.weights is None or self.weights == self.dtype:
            return None
        if self.weights not in WEIGHT_FORMATS:
            raise OptionError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHT_FORMATS)} "
                              "(or the export dtype)")
        if self.block_size not in BLOCK_SIZES:
            raise OptionError(f"--block-size {self.block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.target != "onnxruntime":
            raise OptionError(f"--weights {self.weights} with --target {self.target}: quantized engines are lowered "
                              "for ONNX Runtime only (MatMulNBits, QMoE)")
        if self.device == "cuda" and self.dtype == "float32":
            raise OptionError(f"--weights {self.weights} with --device cuda and --dtype float32: ONNX Runtime's CUDA "
                              "provider has no float32 QMoE kernel (its routed experts would run on CPU); add "
                              "--dtype float16 or bfloat16")
        if self.device == "cuda" and self.block_size % 32:
            raise OptionError(f"--block-size {self.block_size} with --device cuda --weights: ONNX Runtime's CUDA "
                              "QMoE kernels take quantization groups of a multiple of 32 values; use --block-size "
                              "32, 64 or 128")
        if self.device == "cpu" and self.dtype != "float32":
            raise OptionError(f"--weights {self.weights} with --dtype {self.dtype}: quantized engines for CPU compute "
                              "in float32 (ONNX Runtime's CPU MatMulNBits/QMoE kernels); drop --dtype, or export "
                              "for the GPU with --device cuda")
        if self.lm_head_bits not in HEAD_BITS:
            raise OptionError(f"--lm-head-bits {self.lm_head_bits} is not one of {', '.join(map(str, HEAD_BITS))}")
        if self.lm_head_bits == 6 and not (self.native_kernels and self.block_size == 32):
            raise OptionError("--lm-head-bits 6 is stored for dscompile's native kernels only (ONNX Runtime's "
                              "MatMulNBits has no 6-bit form): add --native-kernels, with --block-size 32")
        return Scheme(WEIGHT_FORMATS[self.weights], self.block_size, head_bits=self.lm_head_bits)

    @property
    def plan(self) -> Plan:
        from dscompile.passes.shard import Plan  # noqa: PLC0415 - module docstring

        return Plan(self.tp, self.ep)

    @property
    def builds_tensorrt(self) -> bool:
        """Whether the export ends with TensorRT engines (they need the weights: not graph-only)."""
        return self.target == "tensorrt" and not self.graphs_only

    def _check_native(self, scheme: Scheme | None) -> None:
        if not self.native_kernels:
            return
        if self.device != "cpu" or self.target != "onnxruntime" or self.dtype != "float32" or self.tp > 1 or self.ep > 1:
            raise OptionError("--native-kernels: dscompile's native kernels serve float32 engines (quantized or not) "
                              "for ONNX Runtime's CPU provider on one device: use them with --device cpu, --target "
                              "onnxruntime, --dtype float32, no --tp/--ep")
        from dscompile.runtime.native import unavailable  # noqa: PLC0415 - a file check, no ONNX Runtime

        why = unavailable()
        if why and not self.graphs_only:  # the export runs the engine (verification); graphs alone need no library
            raise OptionError(f"--native-kernels: cannot build them here: {why}")

    def _check_calibration(self, scheme: Scheme | None) -> None:
        if self.calibration is None:
            return
        from pathlib import Path  # noqa: PLC0415 - one use

        object.__setattr__(self, "calibration", str(self.calibration))  # a Path or a str: the same options
        if scheme is None:
            raise OptionError("--calibration chooses quantization scales: it needs --weights int4 or int8")
        if self.graphs_only:
            raise OptionError("--calibration with --graphs-only: calibration runs the model on its weights, which a "
                              "graph-only export does not read")
        if not Path(self.calibration).is_file():
            raise OptionError(f"--calibration {self.calibration}: text file not found")

    def _check_frontend(self, scheme: Scheme | None) -> None:
        from dscompile.capture.frontends import FRONTENDS  # noqa: PLC0415 - module docstring

        if self.frontend not in FRONTENDS:
            raise OptionError(f"--frontend {self.frontend!r} is not one of {', '.join(FRONTENDS)}")
        if self.frontend != "transformers":
            return
        if self.graphs_only:
            raise OptionError("--frontend transformers with --graphs-only: transformers' model is built from the "
                              "checkpoint's weights; graph-only exports capture our model from the config")
        if scheme is not None:
            raise OptionError(f"--frontend transformers with --weights {scheme.name}: quantized engines are built "
                              "from our model (--frontend dscompile) only")
        if importlib.util.find_spec("transformers") is None:  # optional: only this frontend needs it
            raise OptionError('--frontend transformers needs transformers: pip install "dscompile[transformers]"')

    def _check_sharding(self, scheme: Scheme | None) -> None:
        if self.tp < 1 or self.ep < 1:
            raise OptionError(f"--tp {self.tp} and --ep {self.ep} must be >= 1")
        if self.plan.world == 1:
            return
        other = (f"--weights {scheme.name}" if scheme is not None
                 else "--target tensorrt" if self.target == "tensorrt" else
                 "--frontend transformers" if self.frontend == "transformers" else None)
        if other:
            raise OptionError(f"--tp {self.tp} --ep {self.ep} with {other}: sharded engines are float programs of "
                              "our model for the torch backend")
