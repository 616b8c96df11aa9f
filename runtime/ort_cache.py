"""The forms ONNX Runtime engines keep the latent cache in (runtime/ort_engine.py's docstring says
when each is used): `OrtKVCache`, the OrtValues a step returned, bound as the next step's past
without a copy; `CacheBuffers` and `OrtCapacityCache`, capacity buffers the in-place decode graph
writes one row of per step, and the first rows of them a cache holds.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from dscompile.runtime.contract import KVCache


class OrtKVCache(KVCache):
    """The latent cache as ONNX Runtime's own OrtValues: [kv_latent.0, k_rope.0, kv_latent.1, ...]."""

    def __init__(self, values: list[Any], length: int):
        self.values = values
        self._length = length
        self._torch: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        return self._length

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Torch views of the OrtValues (DLPack, no copy), made on first use."""
        if self._torch is None:
            t = [torch.from_dlpack(v._ortvalue) for v in self.values]
            self._torch = [(t[i], t[i + 1]) for i in range(0, len(t), 2)]
        return self._torch

    @layers.setter
    def layers(self, value) -> None:  # KVCache's dataclass fields are assignable; keep that true
        raise AttributeError("OrtKVCache is read-only: build a KVCache from torch tensors instead")


def _bytes(t: torch.Tensor):
    """A numpy view of `t`'s bytes (any dtype, bfloat16 included: numpy has none), the last dim made
    contiguous first where it is not."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.view(torch.uint8).numpy()


class CacheBuffers:
    """Capacity buffers [B, T, dim] for every cache tensor, as OrtValues and torch views of them."""

    def __init__(self, values: list[Any], batch: int, capacity: int):
        self.values, self.batch, self.capacity = values, batch, capacity
        self.tensors = [torch.from_dlpack(v._ortvalue) for v in values]
        self.readers: weakref.WeakSet = weakref.WeakSet()  # live OrtCapacityCaches over these buffers

    @classmethod
    def holding(cls, ort, rows: list[torch.Tensor], capacity: int, onnx_type: int) -> "CacheBuffers":
        """New buffers of `capacity` rows (OrtValues of ONNX element type `onnx_type`, made by the
        onnxruntime module `ort`) holding `rows` [B, P, dim] first; the free rows are zero (masked rows
        still enter the products: no garbage, no NaN, there)."""
        batch, P = int(rows[0].shape[0]), int(rows[0].shape[1])
        values = [ort.OrtValue.ortvalue_from_shape_and_type([batch, capacity, int(t.shape[-1])], onnx_type)
                  for t in rows]
        buffers = cls(values, batch, capacity)
        for buffer, t in zip(buffers.tensors, rows):
            # Through numpy: one thread. torch's copy_/zero_ split these sizes over its intra-op threads,
            # which must then wait for the cores ONNX Runtime's threads still spin on after the step
            # before (measured: a 128-token prefill's fresh buffers took 27-34 ms instead of 1 ms,
            # in stretches of minutes, on 2 cores).
            out = _bytes(buffer)
            out[:, P:] = 0
            if P:
                out[:, :P] = _bytes(t.to(buffer.dtype))
        return buffers

    def writable_at(self, row: int, count: int = 1) -> bool:
        """Rows [row, row + count) exist and no live cache reads them (or anything after them)."""
        return row + count <= self.capacity and all(c.length <= row for c in self.readers)

    def cache(self, length: int) -> "OrtCapacityCache":
        cache = OrtCapacityCache(self, length)
        self.readers.add(cache)
        return cache


class OrtCapacityCache(KVCache):
    """The first `length` rows of CacheBuffers: what the in-place decode graph steps from."""

    __eq__ = object.__eq__  # identity: CacheBuffers tracks its readers in a WeakSet
    __hash__ = object.__hash__

    def __init__(self, buffers: CacheBuffers, length: int):
        self.buffers = buffers
        self._length = length

    @property
    def length(self) -> int:
        return self._length

    def rows(self) -> list[torch.Tensor]:
        """Views [B, length, dim] of the buffers, in contract order (no copy)."""
        return [t[:, : self._length] for t in self.buffers.tensors]

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of this cache's rows: a later step may reuse the buffers once this cache is gone."""
        t = [r.clone() for r in self.rows()]
        return [(t[i], t[i + 1]) for i in range(0, len(t), 2)]

    @layers.setter
    def layers(self, value) -> None:
        raise AttributeError("OrtCapacityCache is read-only: build a KVCache from torch tensors instead")
