"""The dtypes an engine runs in: one table, read by the command line, the manifest, the tolerances and the lowerings.

Each has its name (the manifest's, `--dtype`'s), the short spelling `--dtype` also accepts and
TensorRT's precisions use, its torch dtype and its ONNX element type (onnx.TensorProto's number,
which onnx_ir's DataType shares).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dtype:
    name: str
    short: str
    torch_dtype: torch.dtype
    onnx: int


TABLE = (
    Dtype("float32", "fp32", torch.float32, 1),
    Dtype("float16", "fp16", torch.float16, 10),
    Dtype("bfloat16", "bf16", torch.bfloat16, 16),
)
DTYPES = {d.name: d.torch_dtype for d in TABLE}  # name -> torch dtype: the dtypes engines run
SPELLINGS = {s: d.name for d in TABLE for s in (d.name, d.short)}  # what --dtype accepts -> the name
