"""The forms ONNX Runtime engines keep the latent cache in (runtime/ort_engine.py's docstring says
when each is used): `OrtKVCache`, the OrtValues a step returned, bound as the next step's past
without a copy; `CacheBuffers` and `OrtCapacityCache`, capacity buffers the in-place decode graph
writes one row of per step, and the first rows of them a cache holds; `InPlaceBindings`, the
in-place graph's IOBindings kept from step to step over the same buffers.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable

import numpy as np
import torch

from dscompile.runtime.contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_FROM, POSITION_IDS, WRITE_INDEX,
                                        KVCache)


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


class _Binding:
    """One IOBinding of the in-place graph for B rows of S new tokens over capacity T, its cache bound
    once (`values`: OrtValues, or ([B, T, dim], pointer) pairs of torch memory) and its step inputs
    bound by pointer to int64 numpy arrays that each run fills (numpy: one thread, as CacheBuffers)."""

    def __init__(self, session, past: list[str], present: list[str], kind: int, values: list[Any], B: int, S: int,
                 T: int, logits_from: bool, vocab: int):
        self.lock = threading.Lock()  # a binding serves one run at a time
        self.binding = binding = session.io_binding()
        self.logits = (B, 1 if logits_from else S, vocab)  # float32 (the contract's), bound anew by each run
        self.inputs = {INPUT_IDS: np.zeros((B, S), np.int64), POSITION_IDS: np.zeros((B, S), np.int64),
                       ATTENTION_MASK: np.zeros((B, T), np.int64), WRITE_INDEX: np.zeros(B, np.int64)}
        if logits_from:
            self.inputs[LOGITS_FROM] = np.array([S - 1], np.int64)
        for name, a in self.inputs.items():
            binding.bind_input(name, "cpu", 0, np.int64, list(a.shape), a.ctypes.data)
        for name, output, value in zip(past, present, values):
            if isinstance(value, tuple):  # torch memory by pointer
                binding.bind_input(name, "cpu", 0, kind, *value)
                binding.bind_output(output, "cpu", 0, kind, *value)
            else:
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(output, value)

    def run(self, run: Callable[[Any], None], steps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fill the step inputs from `steps` (name -> tensor of the bound shape, or an int for all of it;
        the mask may cover the first rows only: the rest are set to 0, not attended), run (`run(binding)`);
        the logits, float32 [B, S or 1, V]: a new torch tensor each run, which ONNX Runtime writes by
        pointer (LOGITS is bound anew, so a tensor returned before is never written again; reading ONNX
        Runtime's own output back through get_outputs cost 40-100 us more per int4 step, its caches cold)."""
        for name, t in steps.items():
            into = self.inputs[name]
            if isinstance(t, int):  # one value for every row (the write index of a uniform batch)
                into.fill(t)
                continue
            if name == ATTENTION_MASK:
                into[:, t.shape[1]:] = 0
                into = into[:, : t.shape[1]]
            np.copyto(into, t.numpy(), casting="unsafe")  # as .to(torch.int64) did
        logits = torch.empty(self.logits)
        self.binding.bind_output(LOGITS, "cpu", 0, np.float32, list(self.logits), logits.data_ptr())
        run(self.binding)
        return logits


class InPlaceBindings:
    """The in-place graph's IOBindings, one per owner of the cache buffers it binds (CacheBuffers,
    SlotCache: held weakly, so a binding goes with its buffers), reused while the step's shapes and
    buffers stay the same: a generation loop binds its cache once per CAPACITY_STEP tokens instead of
    every step. What a step does outside ONNX Runtime is slow because a step streams the weights through
    the caches: the interpreter's code and objects are cold (a small torch op takes 75-160 us then, 3-8 us
    warm). Measured on the int4 bench engine, decode at context 128, 2 cores, processes alternated: the
    time outside the run fell from 0.74-0.85 to 0.59-0.77 ms, and the step's median from 9.5-10.0 to
    9.2-9.6 ms. A run that finds the binding busy (another thread's step) makes one of its own."""

    def __init__(self, session, past: list[str], present: list[str], kind: int, vocab: int):
        self.session, self.past, self.present, self.kind, self.vocab = session, past, present, kind, vocab
        self._kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> (key, _Binding)

    def run(self, owner: Any, run: Callable[[Any], None], values: list[Any], steps: dict[str, torch.Tensor],
            capacity: int, logits_from: bool) -> torch.Tensor:
        """One run of the graph over cache `values` of `capacity` rows, step inputs `steps` (INPUT_IDS,
        POSITION_IDS, ATTENTION_MASK of the first rows, WRITE_INDEX); float32 logits [B, S or 1
        (`logits_from`), V]."""
        B, S = steps[INPUT_IDS].shape
        pointers = tuple(v[1] if isinstance(v, tuple) else v.data_ptr() for v in values)
        key = (B, S, capacity, logits_from, pointers)
        new = functools.partial(_Binding, self.session, self.past, self.present, self.kind, values, B, S, capacity,
                                logits_from, self.vocab)
        kept = self._kept.get(owner)
        if kept is None or kept[0] != key:
            kept = self._kept[owner] = (key, new())
        binding = kept[1]
        if not binding.lock.acquire(blocking=False):
            binding = new()
            binding.lock.acquire()
        try:
            return binding.run(run, steps)
        finally:
            binding.lock.release()
