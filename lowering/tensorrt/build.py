"""Build the TensorRT engine (`model.engine`) of an OUT folder from its decode graph.

The official TensorRT Python API does the work: `trt.OnnxParser` reads `decode.onnx` (external
weights are found next to the file), two optimization profiles on one builder config cover the
steps of the engine contract, and `builder.build_serialized_network` produces the plan, written
atomically into OUT. The returned dict is the manifest's "tensorrt" section (documented in
`runtime/trt_engine.py`, which loads and runs the engine).

One engine, one device copy of the weights: an engine embeds the weights its network reads, so an
engine per graph held two copies on the GPU (DeepSeek-V2-Lite in bfloat16: 31 GB each). The
contract's decode graph (absorbed attention) takes any S and any P, so it serves prefill too, as
ONNX Runtime's GPU sessions do (runtime/ort_sessions.py); the prefill graph is not built (it stays
in OUT for ONNX Runtime). Its "gather" experts copy K experts' weights per token (lowering/ops.py
choose_moe_experts), so the prefill profile's S stops at `step_tokens`: max_prompt_tokens, or less
where `ort_sessions.gather_step_tokens` (at the engine's precision) says so; the runtime runs longer
steps in chunks of that many tokens.

No plugin: the `dsc` ops reach TensorRT lowered to standard ONNX operators (`--target tensorrt`
gathers experts with Gather/MatMul where ONNX Runtime exports use `com.microsoft.MoE`, which the
parser lacks), so one ONNX serves every backend. `build_engines` runs the static parser check
(`lowering/tensorrt/compat.py`) first and refuses the first offending ops before any TensorRT work.

Profiles (B batch, S new tokens, P past tokens, T = P + S), index 0 and 1 of one builder config:
- prefill: B 1..max_batch, S 1..step_tokens, P 0..max_context-1, T 1..max_context. P == 0 (the
  first step) is an empty tensor, which TensorRT accepts as a zero-length dimension.
- decode: S == 1, P 1..max_context-1, T 2..max_context (a first step is always prefill).
Kernels are tuned at `opt`: B = max_batch; prefill at P = 0 with S half of max_prompt_tokens (one
prefill of a whole prompt), or a whole chunk where prompts that long run in chunks; decode at P =
half of max_context. `opt` is always a consistent point (T = P + S), a shape that really occurs.

Precision: when the export's dtype (that of `past.0.kv_latent`) already is the requested precision,
the network is created strongly typed (types come from the ONNX, as TensorRT 10 recommends). An fp32
export built for fp16/bf16 uses the weakly typed network with `BuilderFlag.FP16`/`BF16` (deprecated
since TensorRT 10.12, absent where TensorRT removed weak typing: then re-export in that dtype).
TensorRT's builder sets `BuilderFlag.TF32` by default, which rounds float32 GEMM and convolution
inputs to 10 mantissa bits: an fp32 build clears it (float32 is IEEE float32) unless `tf32`
opts in, and the manifest records the choice (`compare` then judges with tolerance.TF32).
`builder_flags` decides the flags, without TensorRT.

Version floor: every graph normalizes with ONNX's `RMSNormalization` (and the in-place decode graph
writes its cache with `TensorScatter`), which TensorRT's ONNX parser reads from 10.15 on
(`min_trt` in lowering/tensorrt/data/trt_onnx_ops.json). The static check runs without TensorRT,
so it can only warn; `build_engines` reads the installed `tensorrt.__version__` before parsing
and refuses an older TensorRT in one line, naming the op that needs the newer one
(`required_tensorrt` / `check_tensorrt_version`, tested with version strings).

`tensorrt` is imported only inside functions, through `require_tensorrt()`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx

from dscompile.lowering.tensorrt.compat import check_model, load_table
from dscompile.dtypes import TABLE
from dscompile.errors import DscompileError, EngineError, OptionError
from dscompile.runtime.contract import DECODE
from dscompile.runtime.ort_sessions import gather_step_tokens
from dscompile.runtime.trt_engine import (ENGINE_FILE, PRECISIONS, PROFILES, TRT_FORMAT, TensorRTUnavailable,
                                          require_tensorrt)

__all__ = [
    "TensorRTBuildError",
    "TensorRTUnavailable",
    "require_tensorrt",
    "validate_options",
    "read_graph_io",
    "compute_profiles",
    "step_tokens",
    "network_mode",
    "builder_flags",
    "trt_section",
    "build_engines",
    "MIN_TENSORRT",
    "required_tensorrt",
    "check_tensorrt_version",
]

MIN_TENSORRT = "10.15"  # RMSNormalization (every graph) and TensorScatter enter the ONNX parser in 10.15

_ONNX_DTYPE_PRECISION = {d.onnx: d.short for d in TABLE}  # an exported graph's float type -> TensorRT precision
_PAST = re.compile(r"^past\.(\d+)\.(kv_latent|k_rope)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(kv_latent|k_rope)$")
# Axis roles of each contract input: B batch, S new tokens, T = P + S, P past, "C" a static width.
_ROLES = {"input_ids": ("B", "S"), "position_ids": ("B", "S"), "attention_mask": ("B", "T")}
_PAST_ROLES = ("B", "P", "C")


class TensorRTBuildError(DscompileError):
    """TensorRT's ONNX parser or builder refused a graph of an OUT folder."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or []  # every parser error, one line each, for the CLI to list


@dataclass(frozen=True)
class GraphIO:
    """Inputs and outputs of one ONNX graph: name -> (dims: int or None when dynamic, ONNX elem type)."""

    path: Path
    inputs: dict[str, tuple[tuple[int | None, ...], int]]
    outputs: dict[str, tuple[tuple[int | None, ...], int]]

    @property
    def num_layers(self) -> int:
        return len({m.group(1) for n in self.inputs if (m := _PAST.match(n))})

    @property
    def model_dtype(self) -> int:
        return self.inputs["past.0.kv_latent"][1]


def validate_options(
    precision: str, max_batch: int, max_prompt_tokens: int, max_context: int, workspace_gb: float,
    tf32: bool = False,
) -> None:
    """OptionError naming the first option outside what a build accepts."""
    if precision not in PRECISIONS:
        raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if tf32 and precision != "fp32":
        raise OptionError(f"--tf32 with --precision {precision}: TF32 is a choice for float32 GEMMs (--precision fp32)")
    sizes = (("--max-batch", max_batch), ("--max-prompt-tokens", max_prompt_tokens), ("--max-context", max_context))
    for option, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{option} must be an integer >= 1, got {value!r}")
    if max_context < max_prompt_tokens:
        raise OptionError(f"--max-context ({max_context}) must be >= --max-prompt-tokens ({max_prompt_tokens})")
    if max_context < 2:
        raise OptionError(f"--max-context must be >= 2 so that decode has a past token, got {max_context}")
    if not isinstance(workspace_gb, (int, float)) or not math.isfinite(workspace_gb) or workspace_gb <= 0:
        raise OptionError(f"--workspace-gb must be a number > 0, got {workspace_gb!r}")


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def read_graph_io(path: str | os.PathLike, graph: str) -> GraphIO:
    """Read a graph's IO from its ONNX file (weights not loaded) and check it follows the engine contract."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends; the file name is what the user needs
        raise EngineError(f"{path}: not a valid ONNX file ({type(e).__name__})") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = {
        vi.name: (_dims(vi), vi.type.tensor_type.elem_type) for vi in model.graph.input if vi.name not in initializers
    }
    outputs = {vi.name: (_dims(vi), vi.type.tensor_type.elem_type) for vi in model.graph.output}
    io = GraphIO(path, inputs, outputs)
    _check_contract(io, graph)
    return io


def _check_contract(io: GraphIO, graph: str) -> None:
    where = io.path
    for name in io.inputs:
        if name not in _ROLES and not _PAST.match(name):
            raise EngineError(
                f"{where}: input '{name}' is not part of the engine contract "
                "(input_ids, position_ids, attention_mask, past.{i}.kv_latent, past.{i}.k_rope)"
            )
    for name in _ROLES:
        if name not in io.inputs:
            raise EngineError(f"{where}: input '{name}' is missing")
        dims = io.inputs[name][0]
        if len(dims) != 2:
            raise EngineError(f"{where}: input '{name}' must be 2D [B, {_ROLES[name][1]}], has {len(dims)} dims")
    layers = sorted({int(m.group(1)) for n in io.inputs if (m := _PAST.match(n))})
    if not layers or layers != list(range(len(layers))):
        raise EngineError(f"{where}: past.{{i}}.* inputs must cover layers 0..L-1 (L >= 1), got {layers}")
    for i in layers:
        for kind in ("kv_latent", "k_rope"):
            for prefix, table in (("past", io.inputs), ("present", io.outputs)):
                name = f"{prefix}.{i}.{kind}"
                if name not in table:
                    raise EngineError(f"{where}: {'input' if prefix == 'past' else 'output'} '{name}' is missing")
                dims = table[name][0]
                if len(dims) != 3 or dims[2] is None:
                    seq = "P" if prefix == "past" else "P+S"
                    raise EngineError(f"{where}: '{name}' must be [B, {seq}, width] with a static width")
    if "logits" not in io.outputs:
        raise EngineError(f"{where}: output 'logits' is missing")
    for name in io.outputs:
        if name != "logits" and not _PRESENT.match(name):
            raise EngineError(f"{where}: output '{name}' is not part of the engine contract")
        if _PRESENT.match(name) and int(_PRESENT.match(name).group(1)) not in layers:
            raise EngineError(f"{where}: output '{name}' has no matching past input")
    if io.model_dtype not in _ONNX_DTYPE_PRECISION:
        dtype = onnx.TensorProto.DataType.Name(io.model_dtype)
        raise EngineError(f"{where}: cache dtype {dtype} is not float32/float16/bfloat16")
    if graph == "decode":
        s = io.inputs["input_ids"][0][1]
        if s not in (None, 1):
            raise EngineError(f"{where}: decode input_ids must have S == 1, has {s}")


def _ranges(profile: str, max_batch: int, max_prompt_tokens: int, max_context: int, step_tokens: int
            ) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per axis role of one profile; opt is a consistent point: T = P + S."""
    if profile == DECODE:
        p_opt = max(1, max_context // 2)
        return {"B": (1, max_batch, max_batch), "S": (1, 1, 1), "P": (1, p_opt, max_context - 1),
                "T": (2, p_opt + 1, max_context)}
    # a whole prompt in one step: half the longest; prompts longer than a chunk run as whole chunks
    s_opt = max(1, max_prompt_tokens // 2) if step_tokens >= max_prompt_tokens else step_tokens
    return {"B": (1, max_batch, max_batch), "S": (1, s_opt, step_tokens), "P": (0, 0, max_context - 1),
            "T": (1, s_opt, max_context)}


def step_tokens(manifest: dict[str, Any] | None, precision: str, max_prompt_tokens: int) -> int:
    """The most new tokens one step of the engine takes (the prefill profile's S max): max_prompt_tokens,
    less where the decode graph gathers experts per token (ort_sessions.gather_step_tokens, at the width
    of `precision`). Without a manifest (an OUT of bare graphs) nothing is known of the experts."""
    if not isinstance((manifest or {}).get("graphs"), dict) or DECODE not in manifest["graphs"]:
        return max_prompt_tokens
    bound = gather_step_tokens(manifest, width=4 if precision == "fp32" else 2)
    return min(max_prompt_tokens, bound) if bound else max_prompt_tokens


def compute_profiles(io: GraphIO, *, max_batch: int, max_prompt_tokens: int, max_context: int, step_tokens: int
                     ) -> dict[str, dict[str, dict[str, list[int]]]]:
    """Profile name (PROFILES, in index order) -> min/opt/max shapes of every input of the decode graph;
    static ONNX dims are kept as they are."""
    profiles = {}
    for name in PROFILES:
        ranges = _ranges(name, max_batch, max_prompt_tokens, max_context, step_tokens)
        shapes = {}
        for tensor, (dims, _) in io.inputs.items():
            roles = _ROLES.get(tensor, _PAST_ROLES)
            shape = {"min": [], "opt": [], "max": []}
            for dim, role in zip(dims, roles):
                lo, opt, hi = (dim, dim, dim) if dim is not None else ranges[role]
                shape["min"].append(lo)
                shape["opt"].append(opt)
                shape["max"].append(hi)
            shapes[tensor] = shape
        profiles[name] = shapes
    return profiles


def network_mode(export_dtype: int, precision: str) -> tuple[bool, str | None]:
    """(strongly typed?, BuilderFlag name or None) for an export dtype and a requested precision."""
    exported = _ONNX_DTYPE_PRECISION.get(export_dtype)
    if exported == precision:
        return True, None
    if exported == "fp32" and precision in ("fp16", "bf16"):
        return False, precision.upper()
    raise OptionError(
        f"--precision {precision} cannot be built from a {exported} export (TensorRT keeps exported "
        f"low-precision types): use --precision {exported} or re-export in {precision}"
    )


def builder_flags(flag: str | None, precision: str, tf32: bool = False) -> tuple[list[str], list[str]]:
    """(BuilderFlag names to set, to clear) for a build: `flag` from network_mode; TF32 cleared in
    an fp32 build unless `tf32` (TensorRT sets it by default: module docstring)."""
    to_set = [flag] if flag else []
    if precision != "fp32":
        return to_set, []
    return (to_set + ["TF32"], []) if tf32 else (to_set, ["TF32"])


def _version(v: str) -> tuple[int, ...]:
    """(major, minor, ...) of a version string such as "10.15.1.29" or "10.8.0.43"; () when it starts with none."""
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(v))
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def required_tensorrt(paths) -> tuple[str, str]:
    """(the oldest TensorRT whose ONNX parser reads every op of the ONNX files `paths`, the op that sets
    it): the largest `min_trt` of their ops in trt_onnx_ops.json, at least MIN_TENSORRT."""
    ops = load_table()["ops"]  # the table the static check reads
    best, why = MIN_TENSORRT, "RMSNormalization"
    for path in paths:
        model = onnx.load(str(path), load_external_data=False)
        for node in model.graph.node:
            need = (ops.get(node.op_type) or {}).get("min_trt") if node.domain in ("", "ai.onnx") else None
            if need and _version(need) > _version(best):
                best, why = need, node.op_type
    return best, why


def check_tensorrt_version(installed: str, required: str = MIN_TENSORRT, needed_by: str = "RMSNormalization") -> None:
    """TensorRTUnavailable (one line) when TensorRT `installed` is older than `required`, or its version
    cannot be read; None when it is recent enough."""
    have, need = _version(installed), _version(required)
    if not have:
        raise TensorRTUnavailable(f"TensorRT reports version {installed!r}, which is not a version number: this "
                                  f"export needs TensorRT >= {required}")
    if have < need:
        raise TensorRTUnavailable(f"TensorRT {installed} is too old: the graphs use {needed_by}, which TensorRT's "
                                  f"ONNX parser reads from {required} on: pip install \"tensorrt>={required}\"")


def _decode_file(out: Path) -> tuple[Path, dict[str, Any] | None]:
    """(the decode graph's ONNX file: the manifest's `graphs.decode.file` where there is one, else
    decode.onnx; the manifest, None where OUT has none)."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return out / f"{DECODE}.onnx", None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entry = manifest.get("graphs", {}).get(DECODE)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise EngineError(f"{manifest_path}: not valid JSON") from None
    name = entry.get("file") if isinstance(entry, dict) else None
    return out / (name if isinstance(name, str) else f"{DECODE}.onnx"), manifest


def _refuse_incompatible(path: Path) -> None:
    errors = [f for f in check_model(path) if f.severity == "error"]
    if errors:
        first = ", ".join(
            f"{f.op_type if f.domain == 'ai.onnx' else f.domain + '::' + f.op_type} ({f.node})" for f in errors[:3]
        )
        more = f" and {len(errors) - 3} more" if len(errors) > 3 else ""
        raise TensorRTBuildError(
            f"{path}: not buildable by TensorRT: {first}{more}: {errors[0].reason} "
            f"(details: dscompile inspect {path.parent} --trt-compat)"
        )


def _write_atomic(path: Path, data) -> None:
    """Write to a temporary name in the same folder, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parser_errors(parser) -> list[str]:
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node_name = e.node_name() if hasattr(e, "node_name") else ""
        operator = e.node_operator() if hasattr(e, "node_operator") else ""
        where = node_name or f"node #{e.node()}"
        lines.append(_one_line(f"{where} ({operator or '?'}): {e.desc()}"))
    return lines


def build_engines(
    out_dir: str | os.PathLike,
    *,
    precision: str = "fp16",
    max_batch: int = 1,
    max_prompt_tokens: int = 512,
    max_context: int = 4096,
    workspace_gb: float = 8.0,
    timing_cache_path: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    tf32: bool = False,
) -> dict[str, Any]:
    """Build OUT/model.engine (decode graph; prefill and decode profiles); return the manifest's "tensorrt" section.

    `max_prompt_tokens` is the longest prefill (S) a step takes (less where `step_tokens` bounds it),
    `max_context` the longest P + S. Everything that needs no TensorRT (options, contract, compatibility)
    is checked before TensorRT is imported. `tf32`: fp32 GEMMs in TF32 (module docstring). An older
    build's prefill.engine and decode.engine (two more copies of the weights) go once model.engine is written.
    """
    say = progress or (lambda _msg: None)
    validate_options(precision, max_batch, max_prompt_tokens, max_context, workspace_gb, tf32)
    out = Path(out_dir)
    if not out.is_dir():
        raise EngineError(f"{out}: no such engine folder")
    onnx_path, manifest = _decode_file(out)
    io = read_graph_io(onnx_path, DECODE)
    if io.inputs["input_ids"][0][1] == 1:
        raise EngineError(f"{onnx_path}: input_ids has a static S == 1, so the one engine cannot run prefills "
                          "through it: re-export (the contract's decode graph takes any number of new tokens)")
    _refuse_incompatible(onnx_path)
    strongly_typed, flag = network_mode(io.model_dtype, precision)
    config_flags = builder_flags(flag, precision, tf32)
    chunk = step_tokens(manifest, precision, max_prompt_tokens)
    profiles = compute_profiles(io, max_batch=max_batch, max_prompt_tokens=max_prompt_tokens, max_context=max_context,
                                step_tokens=chunk)

    required, needed_by = required_tensorrt([onnx_path])
    trt = require_tensorrt()
    check_tensorrt_version(trt.__version__, required, needed_by)  # before any parsing: one line, not a parser error
    logger = trt.Logger(trt.Logger.WARNING)
    say(f"model: parsing {onnx_path.name}")
    plan = _build_one(trt, logger, onnx_path, [profiles[name] for name in PROFILES], strongly_typed, config_flags,
                      workspace_gb, timing_cache_path, say)
    engine_path = out / ENGINE_FILE
    _write_atomic(engine_path, plan)
    say(f"model: wrote {engine_path.name} ({engine_path.stat().st_size / 2**20:.1f} MiB)")
    for old in ("prefill.engine", "decode.engine"):
        (out / old).unlink(missing_ok=True)
    return trt_section(
        tensorrt_version=trt.__version__, precision=precision, strongly_typed=strongly_typed, max_batch=max_batch,
        max_prompt_tokens=max_prompt_tokens, max_context=max_context, workspace_gb=workspace_gb,
        timing_cache_path=timing_cache_path, onnx_file=onnx_path.name, profiles=profiles, step_tokens=chunk,
        tf32=tf32,
    )


def trt_section(*, tensorrt_version: str, precision: str, strongly_typed: bool, max_batch: int, max_prompt_tokens: int,
                max_context: int, workspace_gb: float, timing_cache_path, onnx_file: str,
                profiles: dict[str, dict], step_tokens: int, tf32: bool = False) -> dict[str, Any]:
    """The manifest's "tensorrt" section (schema in runtime/trt_engine.py, read by `read_trt_section`)."""
    return {
        "format": TRT_FORMAT,
        "tensorrt_version": tensorrt_version,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "tf32": tf32,
        "max_batch": max_batch,
        "max_prompt_tokens": max_prompt_tokens,
        "max_context": max_context,
        "workspace_gb": float(workspace_gb),
        "timing_cache": str(timing_cache_path) if timing_cache_path else None,
        "onnx": onnx_file,
        "engine": ENGINE_FILE,
        "step_tokens": step_tokens,
        "profiles": {name: {"index": i, "shapes": profiles[name]} for i, name in enumerate(PROFILES)},
    }


def _build_one(trt, logger, onnx_path: Path, profiles: list[dict], strongly_typed: bool,
               config_flags: tuple[list[str], list[str]], workspace_gb: float, timing_cache_path, say) -> Any:
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the only creation flag that matters is typing.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so that external weights are found next to the ONNX file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser)
        for line in errors:
            say(f"parser error: {line}")
        first = errors[0] if errors else "no error detail"
        raise TensorRTBuildError(
            f"{onnx_path}: TensorRT's ONNX parser refused {len(errors)} node(s); first: {first}", errors
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    to_set, to_clear = config_flags
    for flag in to_set:
        builder_flag = getattr(trt.BuilderFlag, flag, None)
        if builder_flag is None:
            raise TensorRTBuildError(
                f"{onnx_path}: TensorRT {trt.__version__} has no BuilderFlag.{flag} (weak typing removed): "
                f"re-export the model in {flag.lower()}"
            )
        config.set_flag(builder_flag)
    for flag in to_clear:
        config.clear_flag(getattr(trt.BuilderFlag, flag))

    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for index, profile in enumerate(profiles):
        trt_profile = builder.create_optimization_profile()
        for name in network_inputs:
            if name not in profile:
                raise TensorRTBuildError(f"{onnx_path}: network input '{name}' has no shapes in profile {index}")
            p = profile[name]
            trt_profile.set_shape(name, p["min"], p["opt"], p["max"])
        if config.add_optimization_profile(trt_profile) != index:
            # The likeliest cause is the prefill profile's P == 0 (empty past tensors); the log names the input.
            raise TensorRTBuildError(f"{onnx_path}: TensorRT rejected optimization profile {index} "
                                     f"({PROFILES[index]}; see the TensorRT log for the input at fault)")

    cache = None
    if timing_cache_path is not None:
        blob = Path(timing_cache_path).read_bytes() if Path(timing_cache_path).is_file() else b""
        cache = config.create_timing_cache(blob)
        # A cache from another TensorRT version or GPU is refused rather than silently mixed in.
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise TensorRTBuildError(f"{timing_cache_path}: timing cache does not match this TensorRT/GPU; delete it")

    say(f"model: building {len(profiles)} profiles ({'strongly typed' if strongly_typed else ', '.join(to_set)})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    if cache is not None:
        _write_atomic(Path(timing_cache_path), config.get_timing_cache().serialize())
    return plan
