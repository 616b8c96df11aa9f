"""TorchEngine: runs the optimized ExportedPrograms of OUT (`prefill.pt2`, `decode.pt2`) directly.

The programs hold `dsc` ops; torch dispatches them to their Triton kernels on CUDA and to the
reference implementations on CPU. Same `step`/`generate` interface and IO contract as the other
engines. Needs only OUT (and torch). The programs are saved without their weights: they are
views of OUT's weights.bin, mapped once and shared by both programs (runtime/weights.py), at the
places the manifest gives (`graphs.<phase>.program_weights`; a weight the graphs store in another
layout, e.g. transposed, is a strided view of those bytes). On CUDA each stored region is copied
to the device once.

torch.export.load unpickles parts of a .pt2 archive, so each program is first checked by
runtime.manifest.check_program_file (nothing but raw tensors, JSON and weights_only-loadable
sample inputs); an OUT from an untrusted source is safest with the ONNX Runtime backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export.passes import move_to_device_pass

import dscompile.runtime.ops  # noqa: F401  (registers torch.ops.dsc.* before the programs are loaded)
from dscompile.errors import EngineError, first_line
from dscompile.runtime.contract import PHASES, EngineInfo, KVCache, choose_graph
from dscompile.runtime.engine import Engine
from dscompile.runtime.manifest import check_program_file, read_manifest
from dscompile.runtime.weights import WeightsFile

class TorchEngine(Engine):
    """Prefill and decode ExportedPrograms on CPU or CUDA."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], modules: dict[str, Any], device: str,
                 weights: WeightsFile):
        self.out_dir, self.manifest, self.modules, self.device = out_dir, manifest, modules, device
        self.weights = weights
        self.info = EngineInfo.from_manifest(manifest, str(out_dir / "manifest.json"))
        limits = manifest.get("limits", {})
        self.max_batch, self.max_step_tokens = limits.get("max_batch"), limits.get("max_prompt_tokens")

    @classmethod
    def load(cls, out_dir: str | Path, device: str = "auto") -> "TorchEngine":
        out = Path(out_dir)
        manifest = read_manifest(out, check_graphs=False)
        quant = manifest.get("quantization")
        if quant:
            raise EngineError(f"{out}: an {quant.get('scheme')} engine runs on ONNX Runtime only (--backend "
                              "onnxruntime); the torch backend needs a float export")
        device = choose_device(device)
        weights = WeightsFile.open(out, manifest)  # checked before any program is read
        modules = load_programs(out, manifest, weights, device)
        return cls(out, manifest, modules, device, weights)

    def _step(self, input_ids, position_ids, attention_mask, cache):
        logits, present = run_programs(self.modules, self.info, self.device, input_ids, position_ids, attention_mask,
                                       cache)
        return logits.float(), present


def run_programs(modules: dict[str, Any], info: EngineInfo, device: str, input_ids, position_ids, attention_mask,
                 cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
    """One step of the contract through the program the step needs (prefill or decode), on `device`."""
    B = input_ids.shape[0]
    if cache is None:
        cache = KVCache.empty(info, B, device)
    if len(cache.layers) != info.num_layers or cache.layers[0][0].shape[0] != B:
        raise EngineError(f"cache of {len(cache.layers)} layers and batch {cache.layers[0][0].shape[0]} does not "
                          f"fit {info.num_layers} layers and batch {B}")
    graph = choose_graph(int(input_ids.shape[1]), cache.length)
    with torch.no_grad():
        logits, present = modules[graph](input_ids.to(device), position_ids.to(device), attention_mask.to(device),
                                         [(k.to(device), r.to(device)) for k, r in cache.layers])
    return logits, KVCache([tuple(p) for p in present])


def choose_device(device: str) -> str:
    """"cpu" or "cuda" for auto/cpu/cuda, or a one-line EngineError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise EngineError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' asked for, but torch sees no CUDA GPU")
    return device


def load_programs(out: Path, manifest: dict[str, Any], weights: WeightsFile, device: str,
                  edit: Any = None) -> dict[str, Any]:
    """Both programs of OUT as callable modules, their weights views of `weights`. `edit(program)`
    may change a loaded program's graph first (runtime/sharded.py binds its process groups)."""
    modules = {}
    on_device: dict[tuple[int, int], torch.Tensor] = {}
    for name in PHASES:
        rel = manifest["graphs"][name].get("program")
        path = out / rel if rel else None
        if path is None or not path.is_file():
            raise EngineError(f"{out}: the {name} program ({rel}) is missing; re-export to run the torch backend")
        check_program_file(out, rel)  # torch.export.load unpickles: only plain-tensor archives pass
        try:
            program = torch.export.load(path)
        except Exception as err:  # torch raises several types for a damaged archive
            raise EngineError(f"{path}: cannot load the program ({first_line(err)})") from None
        _load_weights(program, weights, manifest, name, device, on_device)
        if edit is not None:
            edit(program)
        # Captured on the meta device: device arguments in the graph (arange, zeros) say "meta".
        program._example_inputs = None  # meta sample inputs, which cannot be moved
        program = move_to_device_pass(program, device)
        modules[name] = program.module()
    return modules


def _load_weights(program, weights: WeightsFile, manifest: dict[str, Any], graph: str, device: str,
                  on_device: dict[tuple[int, int], torch.Tensor]) -> None:
    """Fill a weightless program's weights and constants with views of OUT's one weight map.

    On CPU each weight is a view of the map (no copy, no read until used), so prefill and
    decode share their tensors. On CUDA each stored region is copied to the device once
    (`on_device`, shared by the programs) and the weights are views of those copies.
    """
    places = manifest["graphs"][graph].get("program_weights")
    if places is None:
        raise EngineError(f"{weights.path.parent}: the manifest gives no program_weights for {graph}; re-export to "
                          "run the torch backend")
    for table in (program.state_dict, program.constants):
        for fqn, like in list(table.items()):
            if not isinstance(like, torch.Tensor) or not like.is_meta:
                continue
            place = places.get(fqn)
            what = f"program weight {fqn} of {graph}"
            if place is None or (place.get("stride") is None and place["bytes"] != like.numel() * like.element_size()):
                raise EngineError(f"{weights.path}: {what} is missing from it or does not match its shape; re-export")
            tensor = weights.tensor(place, like.dtype, tuple(like.shape), what)
            if device != "cpu":
                region = (int(place["offset"]), int(place["bytes"]))
                if region not in on_device:
                    on_device[region] = weights.tensor({"offset": region[0], "bytes": region[1]}, torch.uint8,
                                                       (region[1],), what).to(device)
                tensor = on_device[region].view(like.dtype).as_strided(tensor.shape, tensor.stride(),
                                                                        tensor.storage_offset() - region[0] // like.element_size())
            table[fqn] = torch.nn.Parameter(tensor, requires_grad=False) if isinstance(like, torch.nn.Parameter) else tensor
