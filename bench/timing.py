"""Timing on a machine whose speed drifts: the machine probe, timed calls, and calls taken in turn.

The read bandwidth and GEMM rate of a shared (virtual) machine drift by up to 2x within minutes,
so the probe is read again just before every timed run (each run is held against the machine of
its own moment), and ratios between two systems come from the two run alternately, not from rows
of a table taken minutes apart.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from dscompile.bench.systems import System

BANDWIDTH_BYTES = 1 << 30  # large enough that no cache level holds it
GEMM_SIZE = 1024  # ~2 GFLOP: a reading of ~15 ms before each prefill run
# Pause before and after a probe reading and between calls taken in turn: the threads of whatever
# ran last (torch's after a probe, ONNX Runtime's after a step) spin-wait for a while after their
# work and share the cores with what runs next (measured: a decode step 57 -> 61 ms right after
# a probe; a probe 32.5 -> 24.6 GB/s right after a step).
SETTLE_S = 0.1


class MachineProbe:
    """What the machine can do right now: read bandwidth (bytes/s, one sum over a tensor of
    `nbytes`) and fp32 GEMM rate (FLOP/s, one `gemm_size`³ matmul), torch threads as set.

    The buffers are allocated once and read again before every timed run, so each run's floor
    comes from what the machine had at that moment: on a shared (virtual) machine both drift by
    up to 2x within minutes, far more than the differences the floor fractions are meant to show."""

    def __init__(self, nbytes: int = BANDWIDTH_BYTES, gemm_size: int = GEMM_SIZE):
        self.nbytes, self.gemm_size = nbytes, gemm_size
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(gemm_size, gemm_size, generator=gen) for _ in range(2))
        self.buffer.sum()  # first touch: page faults are not bandwidth
        self.a @ self.b

    def bandwidth(self) -> float:
        """Bytes per second of one sum over the buffer."""
        t = time.perf_counter()
        self.buffer.sum()
        return self.nbytes / (time.perf_counter() - t)

    def gemm(self) -> float:
        """FLOP per second of one square fp32 matmul."""
        t = time.perf_counter()
        self.a @ self.b
        return 2.0 * self.gemm_size**3 / (time.perf_counter() - t)

    def median(self, reading: Callable[[], float], repeats: int = 5) -> float:
        """The median of `repeats` readings."""
        return statistics.median(reading() for _ in range(repeats))


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int,
            probe: Callable[[], Any] | None = None) -> tuple[list[float], list[Any]]:
    """Milliseconds of `repeats` calls of `fn` after `warmup` calls; with `probe`, each timed call is
    preceded by one reading of the machine (with a pause of SETTLE_S on each side), returned beside the times
    (else an empty list)."""
    for _ in range(warmup):
        fn()
    out, readings = [], []
    for _ in range(repeats):
        if probe is not None:
            time.sleep(SETTLE_S)
            readings.append(probe())
            time.sleep(SETTLE_S)
        t = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t))
    return out, readings


def alternate(fns: list[Callable[[], Any]], repeats: int, warmup: int) -> list[list[float]]:
    """Milliseconds of each of `fns`, run in turn: runs[i][j] is repeat i of fns[j]. Calls taken
    moments apart see the same machine, so their ratio is free of the drift between the table's
    rows (minutes apart)."""
    for _ in range(warmup):
        for fn in fns:
            fn()

    def settled(fn: Callable[[], Any]) -> float:
        time.sleep(SETTLE_S)
        return time_ms(fn, 1, 0)[0][0]

    return [[settled(fn) for fn in fns] for _ in range(repeats)]


def context_scaling(system: System, short: int, long: int, repeats: int, warmup: int) -> dict | None:
    """Decode step at context `long` over the step at `short` (batch 1), the two run alternately.
    None when the contexts are equal or the system cannot decode."""
    if long <= short:
        return None
    fns = [system.decode(1, short), system.decode(1, long)]
    if None in fns:
        return None
    pairs = alternate(fns, repeats, warmup)
    return {"contexts": [short, long], "ratio": statistics.median(b / a for a, b in pairs),
            "runs_ms": [[round(a, 3), round(b, 3)] for a, b in pairs]}


def compare_alternately(ours: System, reference: System, configs: list[tuple[str, int, int]],
                        prefill_tokens: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Our time over the reference's for each (phase, batch, context), the two run alternately;
    configs either cannot run are left out."""
    rows = []
    for phase, batch, context in configs:
        if phase == "prefill":
            fns = [ours.prefill(batch, prefill_tokens), reference.prefill(batch, prefill_tokens)]
        else:
            fns = [ours.decode(batch, context), reference.decode(batch, context)]
        if None in fns:
            continue
        pairs = alternate(fns, repeats, warmup)
        rows.append({"system": ours.name, "reference": reference.name, "phase": phase, "batch": batch,
                     "context": context, "time_ratio": statistics.median(a / b for a, b in pairs),
                     "runs_ms": [[round(a, 3), round(b, 3)] for a, b in pairs]})
        del fns
    return rows
