"""transformers' model and its exported graph, loaded for `dscompile bench`.

The loaders of the systems that wrap transformers ("hf", "hf-onnx"), for the load time and
resident memory each system is measured for in a fresh process (memory.py adds them to ours),
and the calls hf_systems.py loads them with. transformers is the optional `transformers` extra:
it is imported inside the functions, when a system is loaded.

This module imports only the standard library at the top, so a child process that loads one
system holds nothing its loader does not import itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

FIRST_STEP = list(range(1, 17))  # the prompt of the first step: 16 tokens, then one decode step, as ours


def hf_model_class(checkpoint: str | Path) -> type:
    """transformers' DeepseekV2ForCausalLM or DeepseekV3ForCausalLM, as `checkpoint`'s config names."""
    import transformers

    model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    return transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM


def load_hf_model(checkpoint: str | Path) -> Any:
    """transformers' model of `checkpoint` in float32, in eval mode (its defaults otherwise)."""
    import torch

    return hf_model_class(checkpoint).from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_onnx_session(path: str | Path, threads: int) -> Any:
    """An ONNX Runtime CPU session of transformers' exported graph, with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _hf_forward(model: Any) -> None:
    """The first step on transformers' model: the prompt, then one decode step on its cache."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([FIRST_STEP]), use_cache=True)
        model(torch.tensor([[1]]), past_key_values=out.past_key_values, use_cache=True)


def _hf(checkpoint: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    import torch

    del torch  # imported before the timed load, as transformers' model module is by hf_model_class
    hf_model_class(checkpoint)
    return lambda: load_hf_model(checkpoint), _hf_forward


def _hf_onnx(path: str, threads: int) -> tuple[Callable[[], Any], None]:
    import onnxruntime

    del onnxruntime  # imported before the timed load
    return lambda: hf_onnx_session(path, threads), None


# name -> (loader, what it loads), as dscompile.bench.memory.LOADERS
LOADERS: dict[str, tuple[Callable[..., Any], str]] = {
    "hf": (_hf, "transformers' from_pretrained of the checkpoint (float32)"),
    "hf-onnx": (_hf_onnx, "the ONNX Runtime session of transformers' exported graph (the export not included)"),
}
