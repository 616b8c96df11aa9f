"""OUT/manifest.json: what an engine needs to know about an exported model, and its validation.

The manifest (written by `exporter/export.py`, read by every engine) records:

    format_version   int, MANIFEST_FORMAT; an engine refuses versions it does not know
    tool             {"name", "version"} of the exporter
    target, dtype, opset
    model            the Hugging Face config (ModelArgs.to_config())
    limits           {"max_batch", "max_new_tokens", "max_context"}: the graphs' dynamic ranges
    cache            per-layer layout {"kv_latent": C, "k_rope": R}, dtype, bytes per token (all
                     layers) and the MHA-equivalent bytes per token with what it counts
    weights          the shared external data file, its bytes and tensor counts
    graphs           per graph ("prefill", "decode"): file, program (.pt2), inputs/outputs
                     (name, dtype, shape with symbolic dims as strings), passes (PassReport), lowering
    files            per file in OUT: bytes and sha256

`read_manifest(out_dir)` validates OUT before any graph is loaded: the manifest parses, its format
version is known, the graph files exist and parse as ONNX (without their weights), and no
external-data location is absolute or escapes OUT. Every failure is one EngineError line naming
the file. Nothing here imports the compiler: an engine runs from OUT alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from runtime.errors import EngineError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
GRAPHS = ("prefill", "decode")
_REQUIRED = ("format_version", "model", "dtype", "target", "limits", "cache", "graphs")


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json with sorted keys and a final newline (byte-reproducible)."""
    path = Path(out_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(out_dir: str | Path, *, check_graphs: bool = True) -> dict[str, Any]:
    """The validated manifest of OUT (see the module docstring), or an EngineError."""
    out = Path(out_dir)
    if not out.is_dir():
        raise EngineError(f"{out}: engine folder not found")
    path = out / MANIFEST_FILE
    if not path.is_file():
        raise EngineError(f"{path}: manifest not found (is {out} an export folder?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT:
        raise EngineError(f"{path}: format_version {version!r} is not supported (this dscompile reads "
                          f"{MANIFEST_FORMAT}); re-export the model")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise EngineError(f"{path}: missing field(s) {', '.join(missing)}")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or any(g not in graphs or "file" not in graphs[g] for g in GRAPHS):
        raise EngineError(f"{path}: 'graphs' must name the files of {' and '.join(GRAPHS)}")
    if check_graphs:
        for g in GRAPHS:
            check_onnx_file(out, graphs[g]["file"])
    return manifest


def _inside(out: Path, rel: str) -> bool:
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        return False
    return os.path.realpath(out / rel).startswith(os.path.realpath(out) + os.sep)


def check_onnx_file(out: Path, rel: str) -> None:
    """The ONNX file exists inside OUT, parses (weights not loaded) and its external data stays in OUT."""
    import onnx  # noqa: PLC0415 - only engines that read ONNX need it

    if not isinstance(rel, str) or not _inside(out, rel):
        raise EngineError(f"{out / MANIFEST_FILE}: graph file {rel!r} is not a path inside {out}")
    path = out / rel
    if not path.is_file():
        raise EngineError(f"{path}: graph file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError / RuntimeWarning-ish errors on truncation
        raise EngineError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    if not model.graph.output:
        raise EngineError(f"{path}: ONNX model has no outputs (truncated or empty file?)")
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None or not _inside(out, location):
            raise EngineError(f"{path}: tensor {tensor.name} has external data at {location!r}, "
                              f"which is not a relative path inside {out}")
        if not (out / location).is_file():
            raise EngineError(f"{out / location}: external data of tensor {tensor.name} not found")


def _tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
