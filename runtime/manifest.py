"""OUT/manifest.json: what an engine needs to know about an exported model, and its validation.

The manifest (written by `exporter/export.py`, read by every engine) records:

    format_version   int, MANIFEST_FORMAT; an engine refuses versions it does not know
    tool             {"name", "version"} of the exporter
    runtime          "onnxruntime": what runs the graphs (TensorRT engines are built from them)
    target           what the graphs were lowered for: "onnxruntime" (contrib ops allowed) or
                     "tensorrt" (standard ONNX ops only, so TensorRT's parser takes them)
    dtype, opset
    model            the Hugging Face config (ModelArgs.to_config())
    limits           {"max_batch", "max_prompt_tokens", "max_context"}: the graphs' dynamic ranges
    cache            per-layer layout {"kv_latent": C, "k_rope": R}, dtype, bytes per token (all
                     layers) and the MHA-equivalent bytes per token with what it counts
    weights          the shared external data file: its bytes, tensor counts, parameter_bytes,
                     fingerprint (runtime/weights.py: checked before any engine opens it),
                     viewed_tensors and layouts (what it holds beyond one copy of each weight:
                     second_layouts and pass-computed weights, each with its bytes)
    graphs_only      true for a graph-only export (`export --graphs-only`): graphs and manifest, no
                     weights file (weights.bytes is the planned size) and no programs; engines
                     refuse it (load_manifest), `inspect` reads it
    graphs           per graph ("prefill", "decode"): file, program (.pt2, saved without weights),
                     program_weights ({weight name: {"offset", "bytes"}} of stored bytes in the
                     weights file, plus {"shape", "stride", "storage_offset"} in elements where the
                     weight is a strided view of a tensor a graph stores in another layout: where
                     the torch engine reads the program's weights), inputs/outputs (name, dtype,
                     shape with symbolic dims as strings), passes (PassReport), lowering;
                     decode may add "in_place" {file, opset, inputs, outputs, op_counts, new_tokens,
                     use}: the same decode step writing its cache into capacity buffers (optional;
                     engines that do not use it run the contract's decode graph); new_tokens 1 (or
                     absent): one new token per step, "any": any number (quantized CPU exports, whose
                     one session runs every step through it)
    tokenizer        null, or what the checkpoint's tokenizer brought (copied into OUT, runtime/text.py):
                     files (tokenizer.json and those of tokenizer_config.json and
                     generation_config.json it shipped), bos_token_id, eos_token_ids (also
                     config.json's), chat_template (whether one came), vocab_size
    files            per file in OUT: bytes and sha256

`read_manifest(out_dir)` validates OUT before any graph is loaded: the manifest parses, its format
version is known, the graph files exist and parse as ONNX (without their weights), and no
external-data location is absolute or escapes OUT. Every failure is one EngineError line naming
the file. Nothing here imports the compiler: an engine runs from OUT alone.

`check_program_file(out_dir, rel)` does the same for a `.pt2` program before torch.export.load
reads it. torch.export.load is not safe on untrusted files: it unpickles payloads marked
`use_pickle`, custom and opaque constants, legacy `.pt` weight files, and falls back to
`torch.load(weights_only=False)` for sample inputs that do not load with weights_only=True; an
archive can also carry AOTInductor shared libraries. So a program is loaded only if its archive
holds nothing but what torch.export.save writes for our graphs: raw tensor payloads, JSON, and
sample inputs that load with weights_only=True. An OUT from an unknown source is still best run
with the ONNX Runtime backend, which executes no Python from OUT.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from dscompile.errors import EngineError, first_line
from dscompile.runtime.contract import DECODE, PHASES

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_REQUIRED = ("format_version", "model", "dtype", "target", "limits", "cache", "graphs")


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json with sorted keys and a final newline (byte-reproducible)."""
    path = Path(out_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_manifest(out_dir: str | Path, *, graphs_only_ok: bool = False) -> dict[str, Any]:
    """OUT's manifest parsed, unchecked but for one thing: a graph-only export is refused unless
    `graphs_only_ok`. Every engine reads its manifest through here, so none runs graphs whose
    weights were never written."""
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
    if manifest.get("graphs_only") and not graphs_only_ok:
        weights = manifest.get("weights")
        name = weights.get("file") if isinstance(weights, dict) else None
        raise EngineError(f"{out}: a graph-only export (no {name or 'weights file'}); export without --graphs-only "
                          "to run it")
    return manifest


def read_manifest(out_dir: str | Path, *, check_graphs: bool = True, graphs_only_ok: bool = False) -> dict[str, Any]:
    """The validated manifest of OUT (see the module docstring), or an EngineError.

    A graph-only export (`"graphs_only": true`: graphs and manifest, no weights file) is refused
    (load_manifest) unless `graphs_only_ok`, as `inspect` reads it; its graphs are then checked
    without looking for their external data.
    """
    out = Path(out_dir)
    manifest = load_manifest(out, graphs_only_ok=graphs_only_ok)
    path = out / MANIFEST_FILE
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT:
        raise EngineError(f"{path}: format_version {version!r} is not supported (this dscompile reads "
                          f"{MANIFEST_FORMAT}); re-export the model")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise EngineError(f"{path}: missing field(s) {', '.join(missing)}")
    graphs = manifest["graphs"]
    if manifest.get("sharding") is not None:  # programs and per-rank weights only (runtime/sharded.py)
        if not isinstance(graphs, dict) or any(g not in graphs or "program" not in graphs[g] for g in PHASES):
            raise EngineError(f"{path}: 'graphs' must name the programs of {' and '.join(PHASES)}")
        if not isinstance(manifest["sharding"].get("ranks"), list) or not manifest["sharding"]["ranks"]:
            raise EngineError(f"{path}: 'sharding.ranks' must list every rank's weights file")
        return manifest
    if not isinstance(graphs, dict) or any(g not in graphs or "file" not in graphs[g] for g in PHASES):
        raise EngineError(f"{path}: 'graphs' must name the files of {' and '.join(PHASES)}")
    in_place = graphs[DECODE].get("in_place")
    if in_place is not None and (not isinstance(in_place, dict) or "file" not in in_place):
        raise EngineError(f"{path}: 'graphs.decode.in_place' must name its file")
    if check_graphs:
        with_data = not manifest.get("graphs_only")
        for g in PHASES:
            check_onnx_file(out, graphs[g]["file"], with_data=with_data)
        if in_place is not None:
            check_onnx_file(out, in_place["file"], with_data=with_data)
    return manifest


def _inside(out: Path, rel: str) -> bool:
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        return False
    return os.path.realpath(out / rel).startswith(os.path.realpath(out) + os.sep)


def check_onnx_file(out: Path, rel: str, *, with_data: bool = True) -> None:
    """The ONNX file exists inside OUT, parses (weights not loaded) and its external data stays in
    OUT (and exists, unless not `with_data`: a graph-only export names a file it never wrote)."""
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
        if with_data and not (out / location).is_file():
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


# What torch.export.save writes for a program of plain tensors (under the archive's root folder).
_PT2_MEMBERS = re.compile(
    r"^[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/\w+\.json|data/weights/weight_\d+|data/weights/\w+_weights_config\.json"
    r"|data/constants/tensor_\d+|data/constants/\w+_constants_config\.json|data/sample_inputs/\w+\.pt)$"
)


def check_program_file(out: str | Path, rel: str) -> Path:
    """The .pt2 inside OUT holds nothing torch.export.load would unpickle or execute (module docstring)."""
    out = Path(out)
    if not isinstance(rel, str) or not _inside(out, rel):
        raise EngineError(f"{out / MANIFEST_FILE}: program file {rel!r} is not a path inside {out}")
    path = out / rel
    if not path.is_file():
        raise EngineError(f"{path}: program file not found; re-export to run the torch backend")
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not _PT2_MEMBERS.match(name):
                    raise EngineError(f"{path}: archive member {name!r} is not one dscompile writes; refusing to load "
                                      "it (torch.export.load may unpickle or execute it)")
                if name.endswith("_config.json"):
                    _check_payload_config(path, name, archive.read(name))
                elif name.endswith(".pt"):
                    _check_weights_only(path, name, archive.read(name))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineError(f"{path}: not a readable program archive ({type(err).__name__}: {err})") from None
    return path


def _check_payload_config(path: Path, name: str, data: bytes) -> None:
    entries = json.loads(data.decode()).get("config", {})
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                ("weight_", "tensor_")):
            raise EngineError(f"{path}: {name} stores {fqn} as a pickled or custom object; refusing to load it")


def _check_weights_only(path: Path, name: str, data: bytes) -> None:
    import torch  # noqa: PLC0415 - only the torch backend loads programs

    try:
        with warnings.catch_warnings():  # a crafted pickle's protocol warning would precede our one line
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # UnpicklingError for forbidden globals, others for damage
        first = first_line(err)[:200]
        raise EngineError(f"{path}: {name} does not load with weights_only=True ({first}); refusing to load it "
                          "(torch.export.load would retry with weights_only=False)") from None
