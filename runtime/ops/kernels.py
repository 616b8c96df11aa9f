"""Which implementation the `dsc` ops ran on CUDA: their Triton kernels, or their torch definitions
where Triton cannot be imported. A fallback is never silent: every CUDA call is counted by
implementation (`CALLS`, which GPU tests and benchmarks/gpu_check.py read to prove the compiled
kernel ran) and the first fallback of each op warns with the import error.
"""

from __future__ import annotations

import warnings
from collections import Counter
from types import ModuleType

CALLS: Counter = Counter()  # (op, "triton" | "torch") -> calls on CUDA tensors
_WARNED: set[str] = set()


def triton_kernels(op: str) -> ModuleType | None:
    """The Triton kernels module for a CUDA call of `dsc::{op}`, or None (the caller then runs the
    op's torch definition) after counting and, once per op, warning."""
    try:
        from dscompile.runtime.ops import triton_kernels as module  # noqa: PLC0415 - Triton is optional
    except ImportError as err:
        CALLS[(op, "torch")] += 1
        if op not in _WARNED:
            _WARNED.add(op)
            warnings.warn(f"dsc::{op} runs its torch definition on CUDA, not its Triton kernel: {err}",
                          RuntimeWarning, stacklevel=3)
        return None
    CALLS[(op, "triton")] += 1
    return module
