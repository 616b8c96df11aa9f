"""What `export --verify` checks numerically, beside the export job (exporter/export.py) that asks for it.

- `passes_in_float32`: every pass run on a float32 copy of the model, in memory, each rewrite
  checked against the program it was given (the export itself runs on meta weights: nothing to run);
- `finished_engine`: the finished quantized engine against eager with the same fake-quantized
  weights, and a float32 engine on dscompile's native kernels against the float32 eager model.

The passes are the exporter's to run (verify/ does not import passes/): it hands them in as a
function of (program, phase, model args) that returns the pass report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.export import ExportedProgram

from dscompile.capture import Limits, capture
from dscompile.capture.frontends.transformers import capture_transformers, load_transformers_model
from dscompile.lowering import LoweringError
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.quant import Scheme
from dscompile.runtime.contract import PHASES
from dscompile.runtime.ort_engine import OrtEngine
from dscompile.verify.compare import importance_of, lowering_rms_bound, lowering_table, run_compare
from dscompile.verify.eager import EagerEngine

RunPasses = Callable[[ExportedProgram, str, Any], Any]  # (program, phase, ModelArgs) -> verified PassReport


def passes_in_float32(checkpoint, limits: Limits, run_passes: RunPasses, *, frontend: str = "dscompile",
                      scheme: Scheme | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """The verified pass report of each phase, on a float32 copy of the model loaded in memory.

    float32 whatever the export's dtype: the passes rewrite algebra that does not depend on it, and
    checking them in fp16/bf16 on random inputs is not meaningful: rounding flips near-tied MoE
    routing decisions (a different expert, a large difference) even when the rewrite is exact.
    """
    if frontend == "transformers":
        model, args = load_transformers_model(checkpoint, torch.float32, "cpu", allow_nonfinite=allow_nonfinite)
        traced = capture_transformers(model, args, limits)
    else:
        model = load_checkpoint(checkpoint, dtype=torch.float32, allow_nonfinite=allow_nonfinite, quantize=scheme)
        traced, args = capture(model, limits), model.args
    return {phase: run_passes(traced, phase, args) for phase in PHASES}


def finished_engine(checkpoint, folder: Path, manifest: dict[str, Any], scheme: Scheme | None,
                    allow_nonfinite: bool) -> dict[str, Any]:
    """The finished engine (ONNX Runtime, CPU) against the eager model: with `scheme`, the same fake-quantized
    weights; without (a float32 engine whose decode graph runs dscompile's native kernels), the float32 model.
    A prefill and two decode steps of a left-padded batch, within the tolerance `compare` uses for it
    (verify.compare.lowering_table). A LoweringError if it is outside."""
    engine = OrtEngine.load(folder, provider="cpu")
    eager = EagerEngine(load_checkpoint(checkpoint, torch.float32, allow_nonfinite=allow_nonfinite, quantize=scheme,
                                        importance=importance_of(folder, manifest)))
    bound = lowering_rms_bound(manifest)
    report = run_compare(engine, eager, dtype=manifest["dtype"], decode_steps=2, table=lowering_table(manifest),
                         rms_bound=bound)
    worst = max(report["steps"], key=lambda s: s["logits"]["max_abs"] / max(s["atol"], 1e-30))
    if bound is not None:
        worst = max(report["steps"], key=lambda s: max(s["logits"]["rel_rms"], s["cache_rel_rms"]))
    weights = f"the same {scheme.name} weights (fake-quantized)" if scheme is not None else "float32 weights"
    result = {"passed": report["passed"], "steps": len(report["steps"]), "worst_step": worst["step"],
              "max_abs": worst["logits"]["max_abs"], "atol": worst["atol"], "against": f"eager with {weights}"}
    if bound is not None:
        result.update(rel_rms=max(worst["logits"]["rel_rms"], worst["cache_rel_rms"]), rel_rms_bound=bound)
    del engine
    what = f"the {scheme.name} engine differs from eager with the same quantized weights" if scheme is not None \
        else "the engine's native kernels differ from eager"
    if not report["passed"] and bound is not None:
        raise LoweringError(f"{what}: relative RMS error {result['rel_rms']:.3g} > {bound:.3g} at step {worst['step']}")
    if not report["passed"]:
        raise LoweringError(f"{what}: max |Δ| {worst['logits']['max_abs']:.3g} > {worst['atol']:.3g} at step "
                            f"{worst['step']}")
    return result
