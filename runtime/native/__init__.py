"""dscompile's own ONNX Runtime kernels: a custom-op library built here from C++ source, on demand.

ONNX Runtime's CPU provider has no kernel, or a slower one, for some of what a quantized engine
computes. The library (domain ai.dscompile) adds:
- `MatMulQ4`/`MatMulQ8` (matmul.cc) and `MoEQ4`/`MoEQ8` (moe.cc, in QMoE's place): int4/int8 linear
  layers and routed experts with VNNI dot products (and `MatMulQ6`: lm_head in 6 bits, as llama.cpp's
  Q4_0 files keep their output layer in Q6_K), weights in panels of 16 rows with float16 scales
  (4.5 and 8.5 bits per weight, as llama.cpp's q4_0 and q8_0; panels.h holds what they share, their
  weights copied onto huge pages at session creation included). MatMulQ4 against MatMulNBits (int4,
  blocks of 32, float32 scales, accuracy_level 4), 20 layers 2048 -> 10944 in one graph, 2 threads:
  7.3-7.7 against 10.5-11.2 ms for one token (33-34 against 25-27 GB/s of weights), 185-197 against
  416-448 ms for 128 tokens (benchmarks/native_q4.py);
- `HeadsMatMulQ8` (heads_q8.cc): MLA's absorbed per-head W_UK / W_UV in int8, which quantized engines
  otherwise keep in float32 (MatMulNBits takes one 2-D weight, not a batch of heads);
- `ExpertsQ4`/`ExpertsQ8` (moe.cc, lowering/fuse_experts.py): a MoE layer's experts as one op, TopK's
  choice taken as given and the shared MLP run as one more task beside the chosen experts;
- `LatentAttention` (attention.cc, lowering/fuse_attention.py): MLA's attention over the compressed cache
  in the decode graphs of native exports, each cached token read once per use;
- `QueryRope`/`LatentKey` (rope.cc, lowering/fuse_query_key.py): the attention's inputs from its projections
  (the query split, rotated and transposed; the latent normalized and the key rotated), in the place of
  twelve small nodes a layer in the same decode graphs;
- `MatMulF32`/`LinearF32` (f32.cc) and `MoEF32` (moe.cc): a float32 engine's decode step (its linear
  layers and routed experts, lowering/native_f32.py), reading the weights where ONNX Runtime maps them
  (floats.h), so the prefill graph's MatMul/Gemm/MoE share them.
Engines exported with `--native-kernels` carry these nodes; the manifest lists the ops (`native_ops`),
and every session that opens such a graph registers the library first (`register`).

The library is compiled with g++ against ONNX Runtime's C/C++ API headers, which the onnxruntime
wheels do not ship. Found, in order: $DSCOMPILE_ORT_INCLUDE, /usr/include/onnxruntime,
/usr/local/include/onnxruntime (Debian 13 and Ubuntu 25.04's `libonnxruntime-dev` install them in
the second). Headers of any version up to the running ONNX Runtime's serve (checked): the library asks
the runtime for its headers' API version, which later runtimes keep serving. It is built once per source, headers and
compiler, into $DSCOMPILE_HOME (or ~/.cache/dscompile)/native/KEY/, written to a temporary name and
renamed, so concurrent builds do not see each other's half-written file. The kernels are written with
AVX-512 (F, BW, VNNI) and F16C intrinsics; other CPUs are refused with that reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from dscompile.errors import DscompileError, EngineError, first_line
from dscompile.runtime.home import cache_home

DOMAIN = "ai.dscompile"
OPS = ("ExpertsQ4", "ExpertsQ8", "HeadsMatMulQ8", "LatentAttention", "LatentKey", "LinearF32", "MatMulF32", "MatMulQ4",
       "MatMulQ6", "MatMulQ8", "MoEF32", "MoEQ4", "MoEQ8", "QueryRope")
# The library's files: register.cc adds every op; native.h is what they share.
SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("register.cc", "attention.cc", "f32.cc", "heads_q8.cc", "matmul.cc", "moe.cc", "rope.cc"))
HEADERS = tuple(Path(__file__).with_name(f) for f in ("floats.h", "native.h", "panels.h"))
LIBRARY = "libdscompile_native.so"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mf16c", "-mfma", "-shared", "-fPIC", "-std=c++17"]
HEADER = "onnxruntime_lite_custom_op.h"
INCLUDE_DIRS = ("/usr/include/onnxruntime", "/usr/local/include/onnxruntime")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "f16c")


class NativeKernelsUnavailable(DscompileError):
    """The native kernel library cannot be built or loaded here (the reason in one line)."""


def ort_include() -> Path | None:
    """The folder of ONNX Runtime's C/C++ API headers, or None."""
    named = os.environ.get("DSCOMPILE_ORT_INCLUDE")
    for folder in ([named] if named else []) + list(INCLUDE_DIRS):
        if (Path(folder) / HEADER).is_file():
            return Path(folder)
    return None


def _cpu_lacks() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(CPU_FLAGS)  # not Linux: nothing says the CPU has them
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f not in flags]


def unavailable() -> str | None:
    """Why the library cannot be built here, or None."""
    lacks = _cpu_lacks()
    if lacks:
        return f"this CPU lacks {', '.join(lacks)} (the native kernels are written for AVX-512)"
    if shutil.which("g++") is None:
        return "g++ is not installed (the native kernels are compiled on first use)"
    include = ort_include()
    if include is None:
        named = os.environ.get("DSCOMPILE_ORT_INCLUDE")
        where = f"DSCOMPILE_ORT_INCLUDE={named} has no {HEADER}" if named else \
            f"none in {' or '.join(INCLUDE_DIRS)} and DSCOMPILE_ORT_INCLUDE is not set"
        return (f"ONNX Runtime's C/C++ API headers are needed to build the native kernels ({where}; "
                "e.g. Debian 13's libonnxruntime-dev)")
    headers, running = _api_version(include), _runtime_api_version()
    if headers is None:
        return f"{include / 'onnxruntime_c_api.h'} does not define ORT_API_VERSION"
    if running is not None and headers > running:
        return (f"the headers in {include} are of ONNX Runtime API version {headers}, newer than the running "
                f"ONNX Runtime's ({running}): use headers of version {running} or older")
    return None


def _api_version(include: Path) -> int | None:
    """ORT_API_VERSION of the headers in `include`."""
    try:
        text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"^#define ORT_API_VERSION (\d+)", text, re.M)
    return int(found.group(1)) if found else None


def _runtime_api_version() -> int | None:
    """The API version the installed ONNX Runtime serves at most (its minor version), or None."""
    try:
        import onnxruntime  # noqa: PLC0415 - only where a library is asked for
    except ImportError:
        return None
    parts = onnxruntime.__version__.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


@functools.cache
def _build_key(include: Path) -> str:
    """What the library is built from, hashed (source, headers, compiler, flags): its cache folder's name.
    Once per process and header folder: engine loads do not run g++ --version again."""
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256()
    parts = [f.read_bytes() for f in SOURCES + HEADERS]
    for part in parts + [(include / "onnxruntime_c_api.h").read_bytes(), " ".join(FLAGS + compiler).encode()]:
        key.update(hashlib.sha256(part).digest())
    return key.hexdigest()[:16]


def library() -> Path:
    """The built library (building it first where needed); NativeKernelsUnavailable says why not."""
    why = unavailable()
    if why:
        raise NativeKernelsUnavailable(why)
    include = ort_include()
    folder = cache_home() / "native" / _build_key(include)
    path = folder / LIBRARY
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run(["g++", *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
            raise NativeKernelsUnavailable(f"building the native kernels against {include} failed: {lines[0].strip()}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def register(options) -> None:
    """Register the library with ONNX Runtime SessionOptions `options`."""
    path = library()
    try:
        options.register_custom_ops_library(str(path))
    except Exception as err:  # ORT raises its own types
        raise NativeKernelsUnavailable(f"ONNX Runtime could not load {path}: {first_line(err)}") from None


def register_for(manifest: dict, options, where) -> None:
    """Register the library with `options` where the engine at `where` (its `manifest`) uses native ops;
    an EngineError in one line where it cannot be built or loaded here."""
    native = manifest.get("native_ops")
    if not native:
        return
    try:
        register(options)
    except NativeKernelsUnavailable as err:
        raise EngineError(f"{where}: its graphs use dscompile's native kernels ({', '.join(native.get('ops', []))}), "
                          f"which cannot be loaded here: {err}; or re-export it without --native-kernels") from None
