"""`export --calibration TEXT`: the importance of every quantized weight's input channels, measured on
a text, for the quantizer's scale search (model/calibration.py, model/quant.py quantize_weighted).

The float32 model is loaded in memory (as `--verify` does) and run on the text, tokenized with the
checkpoint's tokenizer, in windows of `WINDOW` tokens. The importance is stored in OUT
(`calibration.safetensors`, one float32 vector per input channel of each quantized weight, per
expert for routed experts), so `compare` rebuilds the same fake-quantized eager reference (verify/compare.py importance_of); the
manifest's `quantization.calibration` gives the text's sha256 and token count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from dscompile.errors import OptionError
from dscompile.model.calibration import CALIBRATION_FILE, collect_importance
from dscompile.model.checkpoint import load_checkpoint
from dscompile.runtime.text import Tokenizer
from dscompile.verify.quality import read_text

WINDOW = 512  # tokens per forward pass (at most the model's max_position_embeddings)


def calibrate(checkpoint: str | Path, text_file: str | Path, allow_nonfinite: bool = False,
              progress: Callable[[str, int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(importance by our parameter name, the manifest's calibration entry) of `checkpoint` on the text."""
    text, digest = read_text(text_file)
    tokenizer = Tokenizer.load(Path(checkpoint))
    if tokenizer is None:
        raise OptionError(f"--calibration needs the checkpoint's tokenizer.json to read the text ({checkpoint} has none)")
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise OptionError(f"--calibration {text_file}: {len(ids)} token, too short to calibrate on")
    model = load_checkpoint(checkpoint, torch.float32, allow_nonfinite=allow_nonfinite)
    window = min(WINDOW, model.args.max_position_embeddings)
    importance, stats = collect_importance(model, ids, window,
                                           None if progress is None else lambda d, t: progress("calibrate", d, t))
    entry = {"file": CALIBRATION_FILE, "text_sha256": digest, **stats,
             "method": "per input channel, mean squared activation of the float32 eager model on the text; each "
                       "block's scale minimizes the squared error weighted by it (model/quant.py quantize_weighted)"}
    return importance, entry


def save_importance(importance: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sorted(importance.items())}, str(folder / CALIBRATION_FILE))
