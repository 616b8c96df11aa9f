"""Load time and resident memory of one engine, each measured in a fresh process.

`dscompile bench` runs every system in one process, where the memory of one (and the allocator's
free lists it leaves behind) would count against the next, and where no one system's peak can be
read. So each load is measured in a child process of its own that imports the loader's
libraries, reads its own VmRSS from /proc/self/status, loads, reads VmRSS again and VmHWM (the
process's peak), prints the numbers and exits. The child is a new interpreter
(`python -c`, not fork: a forked child would start with the parent's pages), and it is given a
loader's name and plain arguments (strings, numbers), not pickled code.

What is and is not counted:
- the load time ("load_s") and the RSS growth (rss_after - rss_before) start after the loader's
  libraries are imported (torch, onnxruntime, transformers and its model's module: the same for
  every engine they load); their import is "import_s" and rss_before - rss_start ("rss_start": the
  bare interpreter), so rss_after - rss_start is everything from nothing to ready to run. What a
  loader imports only while it loads is counted in the load (our eager model: torch's meta-device
  initialization imports torch._dynamo);
- the files are read from the page cache as the machine has it (the bench reads them in-process
  before, so they are usually warm): a cold disk would add its read time to "load_s";
- RSS counts the pages of a memory-mapped file only once touched, so it grows after the load
  when an engine maps its weights instead of copying them (ours: every ONNX Runtime session maps
  weights.bin). So the engine then runs a first step (a 16-token prompt and one decode step;
  transformers' model: the same two forward calls) and the readings are taken again
  ("rss_after_step", "pss_after_step"; "rss_peak" is read last). VmRSS counts a file page once for
  every map of it, and our prefill and decode sessions each map weights.bin: PSS ("pss_*",
  /proc/self/smaps_rollup) counts it once, so PSS is the measure of what the process holds.
  "rss_file_after" and "rss_anon_after" split "rss_after" into file-backed pages and the
  process's own (copies).

This module imports only the standard library at the top, so a child holds nothing a loader
does not import itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

LOAD_TIMEOUT_S = 900
_MARK = "dscompile-load:"  # the child's result line; loaders may print lines of their own


def hf_model_class(checkpoint: str | Path):
    """transformers' DeepseekV2ForCausalLM or DeepseekV3ForCausalLM, as `checkpoint`'s config names."""
    import transformers

    model_type = json.loads((Path(checkpoint) / "config.json").read_text()).get("model_type")
    return transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM


def load_hf_model(checkpoint: str | Path):
    """transformers' model of `checkpoint` in float32, in eval mode (its defaults otherwise)."""
    import torch

    return hf_model_class(checkpoint).from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_onnx_session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session of transformers' exported graph, with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


FIRST_STEP = list(range(1, 17))  # the prompt of the first step: 16 tokens, then one decode step


def _generate(engine) -> None:
    engine.generate([FIRST_STEP], max_new_tokens=2)


def _hf_forward(model) -> None:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([FIRST_STEP]), use_cache=True)
        model(torch.tensor([[1]]), past_key_values=out.past_key_values, use_cache=True)


# Each loader imports its libraries and returns the call to time (so imports stay outside it) and
# the first step to run on what it loaded (None: no step is measured).
Loader = Callable[..., tuple[Callable[[], Any], Callable[[Any], None] | None]]


def _ours(folder: str, threads: int, prepack: bool = False):
    import onnxruntime  # noqa: F401  (OrtEngine imports it on first use)

    from dscompile.runtime.ort_engine import OrtEngine

    return lambda: OrtEngine.load(folder, provider="cpu", threads=threads, prepack=prepack), _generate


def _eager(checkpoint: str):
    from dscompile.exporter.verify.eager import EagerEngine
    from dscompile.model.checkpoint import load_checkpoint

    return lambda: EagerEngine(load_checkpoint(checkpoint)), _generate


def _hf(checkpoint: str):
    import torch  # noqa: F401  (transformers imports it lazily, as it does its model's module)

    hf_model_class(checkpoint)
    return lambda: load_hf_model(checkpoint), _hf_forward


def _hf_onnx(path: str, threads: int):
    import onnxruntime  # noqa: F401

    return lambda: hf_onnx_session(path, threads), None


LOADERS: dict[str, tuple[Loader, str]] = {
    "ours": (_ours, "OrtEngine.load(folder, provider='cpu'): its prefill and decode ONNX Runtime sessions"),
    "eager": (_eager, "load_checkpoint + EagerEngine: our PyTorch model with the checkpoint's weights"),
    "hf": (_hf, "transformers' from_pretrained of the checkpoint (float32)"),
    "hf-onnx": (_hf_onnx, "the ONNX Runtime session of transformers' exported graph (the export not included)"),
}


class LoadMeasureError(RuntimeError):
    """The child process that loads an engine failed, was killed, or ran out of time."""


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
    kind, *args = json.loads(spec_json)
    start = _status()["VmRSS"]
    t0 = time.perf_counter()
    load, step = LOADERS[kind][0](*args)
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
    ("ours", folder, threads[, prepack]), ("eager", checkpoint), ("hf", checkpoint), ("hf-onnx", onnx_file, threads).

    Returns {"load_s", "rss_before", "rss_after", "rss_peak", "pss_before", "pss_after"}, after a
    first step {"rss_after_step", "pss_after_step"} (not for "hf-onnx"), and, to see where they come
    from, {"import_s", "rss_start", "rss_anon_after", "rss_file_after"} (seconds and bytes; see the
    module docstring), or raises LoadMeasureError.
    """
    kind = spec[0]
    if kind not in LOADERS:
        raise ValueError(f"loader {kind!r} is not one of {', '.join(LOADERS)}")
    root = Path(__file__).resolve().parents[1]  # this checkout's code, not another installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from exporter.loadmem import _child; _child(sys.argv[1])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(spec))], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadMeasureError(f"{kind}: loading took over {timeout} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"])[-1]
        raise LoadMeasureError(f"{kind}: the loading process failed: {tail[:300]}")
    return json.loads(lines[-1][len(_MARK):])
