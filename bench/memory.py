"""Load time and resident memory of one system, each measured in a fresh process.

`dscompile bench` runs every system in one process, where the memory of one (and the allocator's
free lists it leaves behind) would count against the next, and where no one system's peak can be
read. So each load is measured in a child process of its own that imports the loader's
libraries, reads its own VmRSS from /proc/self/status, loads, reads VmRSS again and VmHWM (the
process's peak), prints the numbers and exits. The child is a new interpreter running this module
(not fork: a forked child would start with the parent's pages), and it is given a loader's name
and plain arguments (strings, numbers), not pickled code.

What is and is not counted:
- the load time ("load_s") and the RSS growth (rss_after - rss_before) start after the loader's
  libraries are imported (torch, onnxruntime, or transformers and its model's module: the same
  for every engine they load); their import is "import_s" and rss_before - rss_start
  ("rss_start": the bare interpreter), so rss_after - rss_start is everything from nothing to
  ready to run. What a loader imports only while it loads is counted in the load (our eager
  model: torch's meta-device initialization imports torch._dynamo);
- the files are read from the page cache as the machine has it (the bench reads them in-process
  before, so they are usually warm): a cold disk would add its read time to "load_s";
- RSS counts the pages of a memory-mapped file only once touched, so it grows after the load
  when an engine maps its weights instead of copying them (ours: every ONNX Runtime session maps
  weights.bin). So the engine then runs a first step (a 16-token prompt and one decode step) and
  the readings are taken again ("rss_after_step", "pss_after_step"; "rss_peak" is read last).
  VmRSS counts a file page once for every map of it, and our prefill and decode sessions each
  map weights.bin: PSS ("pss_*", /proc/self/smaps_rollup) counts it once, so PSS is the measure
  of what the process holds. "rss_file_after" and "rss_anon_after" split "rss_after" into
  file-backed pages and the process's own (copies).

The loaders here are our systems'; those of the systems that wrap transformers are
hf_loaders.py's. This module and hf_loaders.py import only the standard library at the top, and
the bench package's __init__ imports nothing, so a child holds nothing a loader does not import
itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, Callable

from dscompile.bench import hf_loaders

LOAD_TIMEOUT_S = 900
FIRST_STEP = list(range(1, 17))  # the prompt of the first step: 16 tokens, then one decode step
_MARK = "dscompile-load:"  # the child's result line; loaders may print lines of their own

# A loader imports its libraries and returns the call to time (so imports stay outside it) and
# the first step to run on what it loaded (None: no step is measured).
Loader = Callable[..., tuple[Callable[[], Any], Callable[[Any], None] | None]]


class LoadMeasureError(RuntimeError):
    """The child process that loads an engine failed, was killed, or ran out of time."""


def _generate(engine: Any) -> None:
    engine.generate([FIRST_STEP], max_new_tokens=2)


def _ours(folder: str, threads: int, prepack: bool = False) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    import onnxruntime

    from dscompile.runtime.ort_engine import OrtEngine

    del onnxruntime  # imported before the timed load: OrtEngine imports it only when it loads
    return lambda: OrtEngine.load(folder, provider="cpu", threads=threads, prepack=prepack), _generate


def _eager(checkpoint: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    from dscompile.verify.eager import EagerEngine
    from dscompile.model.checkpoint import load_checkpoint

    return lambda: EagerEngine(load_checkpoint(checkpoint)), _generate


LOADERS: dict[str, tuple[Loader, str]] = {
    "ours": (_ours, "OrtEngine.load(folder, provider='cpu'): its prefill and decode ONNX Runtime sessions"),
    "eager": (_eager, "load_checkpoint + EagerEngine: our PyTorch model with the checkpoint's weights"),
    **hf_loaders.LOADERS,
}


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and Pss of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f, open("/proc/self/smaps_rollup") as g:
        for line in [*f, *list(g)[1:]]:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Pss"):
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def _child(spec_json: str) -> None:
    """The child process: load as `spec_json` says, print the readings on one marked line."""
    kind, *args = json.loads(spec_json)
    setup = LOADERS[kind][0]
    start = _status()["VmRSS"]
    t0 = time.perf_counter()
    load, step = setup(*args)
    t1 = time.perf_counter()
    before = _status()
    t2 = time.perf_counter()
    engine = load()
    seconds = time.perf_counter() - t2
    after = _status()
    result = {"load_s": seconds, "import_s": t1 - t0, "rss_start": start,
              "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
              "rss_peak": after["VmHWM"], "rss_anon_after": after["RssAnon"],
              "rss_file_after": after["RssFile"], "pss_before": before["Pss"], "pss_after": after["Pss"]}
    if step is not None:
        step(engine)
        stepped = _status()
        result.update(rss_after_step=stepped["VmRSS"], pss_after_step=stepped["Pss"], rss_peak=stepped["VmHWM"])
    print(_MARK + json.dumps(result), flush=True)
    del engine  # held until the readings above: its memory is what they measure


def measure_load(spec: tuple | list, timeout: float = LOAD_TIMEOUT_S) -> dict[str, Any]:
    """Load one engine in a fresh process: `spec` is (loader, *args), the loader one of LOADERS:
    ("ours", folder, threads[, prepack]), ("eager", checkpoint), ("hf", checkpoint) and ("hf-onnx", onnx_file,
    threads) where transformers is installed.

    Returns {"load_s", "rss_before", "rss_after", "rss_peak", "pss_before", "pss_after"}, after a
    first step {"rss_after_step", "pss_after_step"} (where the loader has one), and, to see where
    they come from, {"import_s", "rss_start", "rss_anon_after", "rss_file_after"} (seconds and
    bytes; see the module docstring), or raises LoadMeasureError.
    """
    kind = spec[0]
    if kind not in LOADERS:
        raise ValueError(f"loader {kind!r} is not one of {', '.join(LOADERS)}")
    # this module run in a new interpreter: the child imports the standard library and what its loader imports
    argv = [sys.executable, "-m", __spec__.name, json.dumps(list(spec))]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadMeasureError(f"{kind}: loading took over {timeout} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"])[-1]
        raise LoadMeasureError(f"{kind}: the loading process failed: {tail[:300]}")
    return json.loads(lines[-1][len(_MARK):])


if __name__ == "__main__":  # the child: python -m dscompile.bench.memory SPEC_JSON
    _child(*sys.argv[1:])
