"""OUT's weights file as engines hold it: checked before use, mapped once, watched while running.

Every engine of an OUT reads its weights from one file (`weights.bin`, see lowering/weights.py
save_models). `WeightsFile.open` refuses a file that is not the one the manifest describes
before any session or program is created: its size must be the manifest's, and so must a
fingerprint of sampled blocks (a file from another export of the same size differs there; a
whole-file hash would read every byte at each load). The file is then mapped once, copy-on-write
(`mmap.ACCESS_COPY`): every tensor the torch engine makes is a view of that one map, so the
programs share their weights and nothing is read before it is used.

Replacing the file while an engine runs. An export replaces OUT by renaming a new folder over it:
the running engine keeps the old file (its map and ONNX Runtime's hold the old inode) and stays
consistent. Writing into the file in place (cp over it, a text editor) changes the bytes under
the maps: `check()`, called before every step, compares the file's inode, size and modification
time with those seen at load and raises an EngineError, so no step runs on mixed weights without
saying so (a step already running when the write happens can still read them; truncating the
file under a running engine can end the process with SIGBUS, as for any memory-mapped file).
Export writes the file read-only to make such a write a deliberate act.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
from pathlib import Path
from typing import Any

import torch

from dscompile.errors import EngineError

FINGERPRINT_BLOCKS = 64  # sampled blocks: enough to tell two exports apart, cheap on a 100 GB file
FINGERPRINT_BLOCK = 4096  # bytes each


def fingerprint(path: str | Path) -> str:
    """sha256 of the file size and of FINGERPRINT_BLOCKS blocks spread evenly from its start to its end."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        last = max(size - FINGERPRINT_BLOCK, 0)  # the first block starts the file, the last one ends it
        for i in range(FINGERPRINT_BLOCKS):
            f.seek(last * i // (FINGERPRINT_BLOCKS - 1))
            h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()


class WeightsFile:
    """One OUT's weights file: validated, mapped once, and checked for changes (module docstring)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd
        st = os.fstat(fd)
        self._identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        self._map: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None

    @classmethod
    def open(cls, out: Path, manifest: dict[str, Any]) -> "WeightsFile":
        """Open and check OUT's weights file against the manifest, or raise a one-line EngineError."""
        weights = manifest.get("weights") or {}
        name = weights.get("file")
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise EngineError(f"{out / 'manifest.json'}: weights.file {name!r} is not a file name inside {out}")
        path = out / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise EngineError(f"{path}: cannot open the weights file ({err.strerror})") from None
        file = cls(path, fd)
        try:
            expected = (manifest.get("files") or {}).get(name, {}).get("bytes", weights.get("bytes"))
            if expected is not None and file.size != int(expected):
                raise EngineError(f"{path}: {file.size} bytes where the manifest says {int(expected)} "
                                  "(truncated, or from another export)")
            want = weights.get("fingerprint")
            if want is not None and fingerprint(path) != want:
                raise EngineError(f"{path}: its contents do not match the manifest's fingerprint "
                                  "(a weights file from another export?)")
        except BaseException:
            file.close()
            raise
        return file

    def check(self) -> None:
        """Raise an EngineError if the file was written in place since it was opened."""
        st = os.fstat(self._fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            raise EngineError(f"{self.path}: changed on disk after the engine loaded it; load the engine again")

    def bytes(self) -> torch.Tensor:
        """The whole file as one uint8 CPU tensor over the copy-on-write map (made once, no read)."""
        if self._bytes is None:
            if self.size == 0:
                self._bytes = torch.empty(0, dtype=torch.uint8)
            else:
                self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        return self._bytes

    def tensor(self, place: dict[str, Any], dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """The tensor at a manifest place: {"offset", "bytes"} of contiguous bytes, optionally viewed
        with {"shape", "stride", "storage_offset"} (elements); a view of the map, never a copy."""
        offset, nbytes = int(place["offset"]), int(place["bytes"])
        elt = torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset % elt or nbytes % elt or offset + nbytes > self.size:
            raise EngineError(f"{self.path}: {what} lies outside the file or is misaligned; re-export")
        base = self.bytes()[offset: offset + nbytes].view(dtype)
        if "stride" not in place:
            if base.numel() != math.prod(shape):
                raise EngineError(f"{self.path}: {what} has {base.numel()} values, expected shape {list(shape)}")
            return base.view(shape)
        view_shape, stride, start = tuple(place["shape"]), tuple(place["stride"]), int(place["storage_offset"])
        last = start + sum((n - 1) * s for n, s in zip(view_shape, stride)) if math.prod(view_shape) else start
        if view_shape != tuple(shape) or start < 0 or min(stride, default=0) < 0 or last >= max(base.numel(), 1):
            raise EngineError(f"{self.path}: {what} is a view that does not fit its stored tensor; re-export")
        return base.as_strided(view_shape, stride, base.storage_offset() + start)  # as_strided's offset is absolute

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # tensors still view it: the map goes when they do
                pass
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def resident_estimate(out: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Weight bytes each backend keeps in memory for OUT, from the places its files give.

    ONNX Runtime on CPU and the torch engine map weights.bin once for all their graphs/programs,
    so they hold the union of the byte ranges they read. ONNX Runtime's CUDA and TensorRT providers
    copy a session's initializers to the device, so there the graphs opened add up: one session,
    the decode graph (ort_sessions.session_graphs). The TensorRT engine (`--target tensorrt`) holds
    the weights the decode graph reads, once for both its profiles (model.engine). Activations and
    the cache come on top; prepacking (OrtEngine.load(prepack=True)) adds packed copies.
    """
    import onnx  # noqa: PLC0415 - only the estimate reads graphs

    def regions_of(rel: str) -> set[tuple[int, int]]:
        model = onnx.load(str(out / rel), load_external_data=False)
        found = set()
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                found.add((int(info.get("offset", 0)), int(info["length"])))
        return found

    graphs = manifest["graphs"]
    per_graph = {name: regions_of(g["file"]) for name, g in graphs.items()}
    in_place = graphs["decode"].get("in_place")
    cpu_decode = regions_of(in_place["file"]) if in_place else per_graph["decode"]
    programs = {(int(p["offset"]), int(p["bytes"])) for g in graphs.values()
                for p in (g.get("program_weights") or {}).values()}
    ort_cpu = _covered(per_graph["prefill"] | cpu_decode)
    torch_bytes = _covered(programs)
    from dscompile.runtime.ort_sessions import session_graphs  # noqa: PLC0415 - the engine's own choice

    if manifest.get("quantization"):  # one session of the decode graph, its kernels' packed copy (ort_engine.py)
        (one,) = set(session_graphs(manifest, "CPUExecutionProvider").values())
        return {"onnxruntime-cpu": {"bytes": _covered(regions_of(one)),
                                    "how": "one session of the decode graph: quantized kernels hold a packed "
                                           "copy of their weights (about their size), the rest is mapped"}}
    gpu_files = set(session_graphs(manifest, "CUDAExecutionProvider").values())
    gpu = _covered(set().union(*(regions_of(f) for f in gpu_files)))
    report = {
        "onnxruntime-cpu": {"bytes": ort_cpu, "how": "one memory map of weights.bin shared by the sessions"},
        "onnxruntime-cuda": {"bytes": gpu, "how": "device memory: one session (the decode graph, every step) "
                                                  "copies its initializers"},
        "torch-cpu": {"bytes": torch_bytes, "how": "the programs' weights are views of one memory map"},
        "torch-cuda": {"bytes": torch_bytes, "how": "device memory: each stored region copied once, shared by "
                                                    "the programs"},
    }
    if manifest.get("target") == "tensorrt":
        # an fp32 export built as fp16/bf16 engines holds its weights at half the width
        half = manifest["dtype"] == "float32" and (manifest.get("tensorrt") or {}).get("precision") in ("fp16", "bf16")
        one = _covered(per_graph["decode"])
        report["tensorrt"] = {"bytes": one // 2 if half else one,
                              "how": "device memory: model.engine holds the weights the decode graph reads, "
                                     "once for its prefill and decode profiles"
                                     + (" (built in half precision)" if half else "")}
    elif not any("." in op for op in graphs["decode"].get("op_counts") or {}):  # ORT's TensorRT provider runs it
        report["onnxruntime-tensorrt"] = {"bytes": gpu, "how": "device memory: one session (the decode graph), "
                                                               "its TensorRT engine holding the weights"}
    return report


def _covered(regions) -> int:
    """Bytes covered by a set of (offset, length) ranges, overlaps counted once."""
    total, end = 0, -1
    for offset, length in sorted(regions):
        start, stop = max(offset, end), offset + length
        if stop > start:
            total += stop - start
        end = max(end, stop)
    return total
