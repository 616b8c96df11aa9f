"""Lazy weights: tensors whose values are read or computed only when a weight file is written.

The protocol. A *lazy weight* is a meta tensor (shape and dtype, no storage) carrying a
`dsc_source` attribute: an object with `load() -> torch.Tensor` that returns its real values.
- Who creates them: the loaders (model/checkpoint.py's CheckpointSource reads a weight from the
  safetensors files; the transformers frontend's fused gate/up weight is derived) when a model is
  loaded on the meta device, and every stage that computes a new weight from others (the passes'
  absorbed and fused weights, the lowering's folded layouts and quantized blocks) through
  `derive(fn, *weights)`, whose result is lazy when any input is.
- Who materializes them: whoever writes values (lowering/weights.py, one weight at a time while
  writing weights.bin; tests), through `materialize(t)`, never by calling `load()` directly.
- What must hold: `load()` returns a tensor of exactly the meta tensor's shape and dtype
  (`materialize` checks it); a `derive` function is pure (the same inputs give the same values,
  so a weight may be computed again, or on another copy); real (non-meta) tensors pass through
  unchanged, so the same code runs on a model loaded in memory. A meta tensor without a source
  has no values (a graph-only export builds the model from its config): `has_values` says so
  before anything tries to write it.

This module is the base: it imports torch and nothing of the package.
"""

from __future__ import annotations

from typing import Callable

import torch


class Derived:
    """The `dsc_source` of a weight computed from other (possibly lazy) weights: `fn(*inputs)`."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]):
        self.fn, self.inputs = fn, inputs

    def load(self) -> torch.Tensor:
        return self.fn(*(materialize(t) for t in self.inputs))


def derive(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """`fn(*inputs)`, a new weight computed from weights; lazy (a meta tensor whose source is
    `Derived(fn, inputs)`) when any input is a meta tensor. `fn` must be a pure function of its inputs."""
    out = fn(*inputs)
    if out.is_meta:
        out.dsc_source = Derived(fn, inputs)
    return out


def materialize(t: torch.Tensor) -> torch.Tensor:
    """The real value of a weight: `t` itself, or what its `dsc_source` loads or computes."""
    if not t.is_meta:
        return t
    source = getattr(t, "dsc_source", None)
    if source is None:
        raise RuntimeError(f"a meta tensor of shape {list(t.shape)} has no source to load its values from")
    value = source.load()
    if tuple(value.shape) != tuple(t.shape) or value.dtype != t.dtype:
        raise RuntimeError(f"a weight loaded as {value.dtype} {list(value.shape)}, expected {t.dtype} {list(t.shape)}")
    return value


def has_values(t: torch.Tensor) -> bool:
    """Whether `materialize(t)` can work: `t` is real, or its source reaches real data (a model built
    from a config alone, for a graph-only export, has meta weights without sources)."""
    if not t.is_meta:
        return True
    source = getattr(t, "dsc_source", None)
    if isinstance(source, Derived):
        return all(has_values(i) for i in source.inputs)
    return source is not None
