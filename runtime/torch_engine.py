"""TorchEngine: runs the optimized ExportedPrograms of OUT (`prefill.pt2`, `decode.pt2`) directly.

The programs hold `dsc` ops; torch dispatches them to their Triton kernels on CUDA and to the
reference implementations on CPU. Same `step`/`generate` interface and IO contract as the other
engines. Needs only OUT (and torch): the programs carry their weights.

torch.export.load unpickles parts of a .pt2 archive, so each program is first checked by
runtime.manifest.check_program_file (nothing but raw tensors, JSON and weights_only-loadable
sample inputs); an OUT from an untrusted source is safest with the ONNX Runtime backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import runtime.ops  # noqa: F401  (registers torch.ops.dsc.* before the programs are loaded)
from runtime.engine import Engine, EngineInfo, KVCache, choose_graph
from runtime.errors import EngineError
from runtime.manifest import check_program_file, read_manifest

class TorchEngine(Engine):
    """Prefill and decode ExportedPrograms on CPU or CUDA."""

    def __init__(self, out_dir: Path, manifest: dict[str, Any], modules: dict[str, Any], device: str):
        self.out_dir, self.manifest, self.modules, self.device = out_dir, manifest, modules, device
        self.info = EngineInfo.from_manifest(manifest, str(out_dir / "manifest.json"))

    @classmethod
    def load(cls, out_dir: str | Path, device: str = "auto") -> "TorchEngine":
        out = Path(out_dir)
        manifest = read_manifest(out, check_graphs=False)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise EngineError(f"device {device!r} is not one of auto, cpu, cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device 'cuda' asked for, but torch sees no CUDA GPU")
        modules = {}
        for name in ("prefill", "decode"):
            rel = manifest["graphs"][name].get("program")
            path = out / rel if rel else None
            if path is None or not path.is_file():
                raise EngineError(f"{out}: the {name} program ({rel}) is missing; re-export to run the torch backend")
            check_program_file(out, rel)  # torch.export.load unpickles: only plain-tensor archives pass
            try:
                program = torch.export.load(path)
            except Exception as err:  # torch raises several types for a damaged archive
                raise EngineError(f"{path}: cannot load the program ({str(err).splitlines()[0]})") from None
            modules[name] = program.module().to(device)
        return cls(out, manifest, modules, device)

    def step(self, input_ids, position_ids, attention_mask, cache):
        P = cache.length if cache is not None else 0
        self.check_inputs(input_ids, P, position_ids, attention_mask)
        B = input_ids.shape[0]
        if cache is None:
            cache = KVCache.empty(self.info, B, self.device)
        if len(cache.layers) != self.info.num_layers or cache.layers[0][0].shape[0] != B:
            raise EngineError(f"cache of {len(cache.layers)} layers and batch {cache.layers[0][0].shape[0]} does not "
                              f"fit {self.info.num_layers} layers and batch {B}")
        graph = choose_graph(int(input_ids.shape[1]), P)
        dev = self.device
        with torch.no_grad():
            logits, present = self.modules[graph](
                input_ids.to(dev), position_ids.to(dev), attention_mask.to(dev),
                [(k.to(dev), r.to(dev)) for k, r in cache.layers],
            )
        return logits.float(), KVCache([tuple(p) for p in present])
