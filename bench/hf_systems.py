"""The systems of `dscompile bench` that wrap transformers: its model ("hf") and its own ONNX export ("hf-onnx").

- "hf":      transformers' DeepseekV2/V3ForCausalLM (its defaults: SDPA, grouped_mm experts) with
             its DynamicCache;
- "hf-onnx": transformers' own ONNX export of the same weights, run in ONNX Runtime (every
             attempt and its outcome are reported; DeepSeek-V2's complex RoPE stops both
             exporters, so its RoPE is rewritten in real numbers and transformers' eager
             attention and batched_mm experts are selected: see `_hf_onnx_attempts`).

transformers is the optional `transformers` extra, imported inside the functions only: where it
is missing, `missing()` says so and the bench reports both systems skipped. The RoPE rewrite is
the transformers frontend's (capture/frontends/transformers_patches.py `real_valued_rope`). Run
as `python -m dscompile.bench.hf_systems`, this module is the child process of `hf_onnx_export`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from dscompile.bench.cache import checkpoint_key
from dscompile.bench.hf_loaders import hf_onnx_session, load_hf_model
from dscompile.bench.systems import System
from dscompile.capture.frontends.transformers_patches import real_valued_rope
from dscompile.model.args import ModelArgs
from dscompile.runtime.contract import random_step_inputs

EXPORTABLE_IMPLEMENTATIONS = {"attention": "eager", "experts": "batched_mm"}
HF_ONNX_TIMEOUT_S = 900
HF_ONNX_RECIPE = "r2"  # bump when _hf_onnx_attempts changes what it tries: cached reports are keyed by it


def missing() -> str | None:
    """Why the systems here cannot run on this machine (transformers is not installed), or None."""
    try:
        import transformers
    except ImportError as err:
        return f"transformers is not installed ({err}): pip install \"dscompile[transformers]\""
    del transformers
    return None


class HFSystem(System):
    """transformers' DeepseekV2/V3ForCausalLM with its DynamicCache (its default attention and experts)."""

    name = "hf"

    def __init__(self, checkpoint: Path, args: ModelArgs):
        self.model = load_hf_model(checkpoint)
        self.args = args

    def _cache(self, batch: int, context: int) -> Any:
        """A DynamicCache of `context` random tokens, filled through its public `update`.

        Each layer's entries are shaped as the model's own first step writes them (transformers
        5 stores MLA's latent and rotated key, not expanded keys and values).
        """
        from transformers import DynamicCache

        probe = DynamicCache(config=self.model.config)
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, 1, 0, 4)
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=probe, use_cache=True)
        cache = DynamicCache(config=self.model.config)
        gen = torch.Generator().manual_seed(2)
        for i, layer in enumerate(probe.layers):
            k, v = layer.keys, layer.values
            cache.update(torch.randn(*k.shape[:-2], context, k.shape[-1], generator=gen).to(k.dtype),
                         torch.randn(*v.shape[:-2], context, v.shape[-1], generator=gen).to(v.dtype), i)
        return cache

    def cache_bytes_per_token(self) -> int:
        """Bytes transformers' DynamicCache holds per token, all layers (measured on its tensors)."""
        from transformers import DynamicCache

        tokens = 8
        ids, pos, mask = random_step_inputs(self.args.vocab_size, 1, tokens, 0, 5)
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return total // tokens

    def prefill(self, batch: int, tokens: int) -> Callable[[], Any]:
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, tokens, 0, 1)

        def run() -> Any:
            from transformers import DynamicCache

            with torch.no_grad():
                return self.model(input_ids=ids, position_ids=pos, attention_mask=mask, logits_to_keep=1,
                                  past_key_values=DynamicCache(config=self.model.config), use_cache=True)

        return run

    def decode(self, batch: int, context: int) -> Callable[[], Any]:
        cache = self._cache(batch, context)
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, 1, context, 3)

        def run() -> Any:
            with torch.no_grad():
                out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache,
                                 use_cache=True)
            cache.crop(-1)  # every timed step starts from the same context
            return out

        return run

    def close(self) -> None:
        self.model = None


# ---------------------------------------------------------------- transformers' own ONNX export


def _first_reason(err: BaseException) -> str:
    """The line of a (multi-page) exporter error that says what failed: torch.onnx puts it under
    '## Exception summary'; other exporters say it first."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        hit = rest[0] if rest else lines[0]
    else:
        hit = lines[0] if lines else ""
    return f"{type(err).__name__}: {hit}"[:400]


def _hf_cache_names(prefix: str, num_layers: int) -> list[str]:
    """The exported transformers graph's cache IO names: `{prefix}.{i}.key`, `{prefix}.{i}.value` per layer."""
    return [f"{prefix}.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]


class _HFDecodeGraph(torch.nn.Module):
    """transformers' model with its cache as flat tensors, the form an ONNX graph can take and return."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, position_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def _hf_onnx_attempts(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Try transformers' model through torch.onnx, stopping at the first graph that exports.

    1. The model as loaded (its default SDPA attention and grouped_mm experts), with its cache:
       dynamo, then TorchScript.
    2. Where both fail: the same model, with DeepSeek-V2's complex RoPE rewritten in real numbers
       (the frontend's `real_valued_rope`, shown to give transformers' logits first; V3's RoPE is real already)
       and with transformers' own export-friendly implementations selected through its public
       setters (eager attention: torchlib maps SDPA to an MHA `Attention` that rejects MLA's
       one-head latent key; batched_mm experts: grouped_mm is a custom op with no ONNX
       translation, and the eager expert loop is data-dependent): with the cache (dynamo, then
       TorchScript), then without.

    An exported graph is then run in ONNX Runtime on a fresh input and compared with transformers'
    model as loaded (`ort_max_abs_diff`). Returns {"file", "with_cache", "rope", "implementations",
    "rope_rewrite_max_abs_diff", "ort_max_abs_diff", "attempts": [{"exporter", "graph", "rope",
    "ok", "error", "seconds"}], "cache_dims"}.
    """
    args = ModelArgs.from_json(checkpoint / "config.json")
    hf = HFSystem(checkpoint, args)
    L = args.num_hidden_layers
    wrapper = _HFDecodeGraph(hf.model, L).eval()
    probe = hf._cache(1, 4)
    past = [t for layer in probe.layers for t in (layer.keys, layer.values)]
    ids, pos, mask = random_step_inputs(args.vocab_size, 1, 1, 4, 6)
    names = ["input_ids", "position_ids", "attention_mask"]
    names += _hf_cache_names("past", L)
    outs = ["logits"] + _hf_cache_names("present", L)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in names[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    auto = torch.export.Dim.AUTO
    # *past is one element of the inputs for torch.export: its shapes are one nested tuple
    # (a decode graph: one new token, so S is static; a dynamic S makes SDPA's is_causal symbolic)
    shapes = ({0: auto}, {0: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
    plain_ids, _, plain_mask = random_step_inputs(args.vocab_size, 1, 4, 0, 6)
    plain_axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    class NoCache(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    cached = (wrapper, (ids, pos, mask, *past), names, outs)
    plain = (NoCache(hf.model), (plain_ids, plain_mask), list(plain_axes), ["logits"])
    plans = {("dynamo", "decode with cache"): (*cached, {"dynamic_shapes": shapes}),
             ("torchscript", "decode with cache"): (*cached, {"dynamic_axes": axes}),
             ("dynamo", "no cache"): (*plain, {"dynamic_shapes": ({0: auto, 1: auto}, {0: auto, 1: auto})}),
             ("torchscript", "no cache"): (*plain, {"dynamic_axes": plain_axes})}
    loaded = {"attention": hf.model.config._attn_implementation,
              "experts": getattr(hf.model.config, "_experts_implementation", None)}
    result: dict[str, Any] = {"file": None, "with_cache": False, "attempts": [], "rope": "transformers' code",
                              "implementations": loaded, "cache_dims": [t.shape[-1] for t in past]}

    def attempt(rope: str, exporter: str, graph: str) -> bool:
        module, example, in_names, out_names, dyn = plans[exporter, graph]
        path = out / f"hf-{exporter}-{graph.replace(' ', '-')}{'-real-rope' if rope == 'real-valued' else ''}.onnx"
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    torch.onnx.export(module, example, str(path), dynamo=True, opset_version=23, external_data=True,
                                      input_names=in_names, output_names=out_names, verbose=False, **dyn)
                else:
                    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17,
                                      input_names=in_names, output_names=out_names, **dyn)
            ok, error = True, None
        except Exception as err:  # every exporter failure is a finding to report, not a crash
            ok, error = False, _first_reason(err)
        result["attempts"].append({"exporter": f"torch.onnx.export ({exporter})", "graph": graph, "rope": rope,
                                   "ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 1)})
        if ok:
            result.update(file=str(path), with_cache=graph == "decode with cache")
        return ok

    def exported() -> dict[str, Any]:
        result["ort_max_abs_diff"] = _check_hf_onnx(Path(result["file"]), hf, args, result["with_cache"])
        return result

    if attempt("transformers'", "dynamo", "decode with cache") or attempt("transformers'", "torchscript",
                                                                         "decode with cache"):
        return exported()
    with real_valued_rope(hf.model) as rewritten, torch.no_grad():
        got = wrapper(ids, pos, mask, *past)[0] if rewritten else None
    if rewritten:
        with torch.no_grad():
            want = wrapper(ids, pos, mask, *past)[0]
        result["rope_rewrite_max_abs_diff"] = diff = float((got - want).abs().max())
        if not diff <= 1e-4 * max(1.0, float(want.abs().max())):
            result["rope"] = "real-valued rewrite refused: its logits differ from transformers' code"
            return result
        result["rope"] = "rewritten in real numbers (nothing else of transformers' code changed)"
    hf.model.set_attn_implementation(EXPORTABLE_IMPLEMENTATIONS["attention"])
    hf.model.set_experts_implementation(EXPORTABLE_IMPLEMENTATIONS["experts"])
    result["implementations"] = dict(EXPORTABLE_IMPLEMENTATIONS)
    try:
        with real_valued_rope(hf.model):
            rope = "real-valued" if rewritten else "transformers'"
            ok = any(attempt(rope, exporter, graph) for exporter, graph in plans)
    finally:
        hf.model.set_attn_implementation(loaded["attention"])
        if loaded["experts"] is not None:
            hf.model.set_experts_implementation(loaded["experts"])
    return exported() if ok else result


def _check_hf_onnx(path: Path, hf: HFSystem, args: ModelArgs, with_cache: bool) -> float:
    """Max |logits| difference between the exported graph in ONNX Runtime and transformers' model
    as loaded, on an input unlike the export's example (another context length and tokens)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if with_cache:
        cache = hf._cache(1, 7)
        past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        ids, pos, mask = random_step_inputs(args.vocab_size, 1, 1, 7, 9)
        feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
        feeds.update({name: t.numpy() for name, t in zip(_hf_cache_names("past", args.num_hidden_layers), past)})
        with torch.no_grad():
            want = _HFDecodeGraph(hf.model, args.num_hidden_layers)(ids, pos, mask, *past)[0]
    else:
        ids, _, mask = random_step_inputs(args.vocab_size, 1, 5, 0, 9)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        with torch.no_grad():
            want = hf.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    got = torch.from_numpy(session.run(["logits"], feeds)[0])
    return float((got - want).abs().max())


def hf_onnx_export(checkpoint: Path, home: Path) -> dict[str, Any]:
    """transformers' own ONNX export of `checkpoint` (see `_hf_onnx_attempts`), cached per checkpoint and versions.

    The attempts run in a child process (this module run with -m): exporters print pages of
    graph dumps on failure, hold the model's memory, and may not finish; the child is given up
    after HF_ONNX_TIMEOUT_S.
    """
    import transformers

    key = (f"{checkpoint_key(checkpoint)}-torch{torch.__version__}-transformers{transformers.__version__}"
           f"-{HF_ONNX_RECIPE}")
    out = home / "bench" / "hf-onnx" / key.replace("+", "_")
    report = out / "attempts.json"
    if report.is_file():
        return json.loads(report.read_text())
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", __spec__.name, str(checkpoint), str(out), str(report)],
                              capture_output=True, text=True, timeout=HF_ONNX_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"file": None, "with_cache": False, "attempts": [
            {"exporter": "torch.onnx.export", "graph": "all", "ok": False, "seconds": HF_ONNX_TIMEOUT_S,
             "error": f"gave up after {HF_ONNX_TIMEOUT_S} s"}]}
    if proc.returncode != 0 or not report.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"file": None, "with_cache": False, "attempts": [
            {"exporter": "torch.onnx.export", "graph": "all", "ok": False,
             "seconds": round(time.perf_counter() - start, 1), "error": f"exporter process failed: {tail[:300]}"}]}
    return json.loads(report.read_text())


class HFOnnxSystem(System):
    """transformers' exported graph in ONNX Runtime (decode needs the graph exported with its cache).

    Sizes the exporter fixed in the graph (torch.export specializes a dimension the example input
    has as 1) are respected: a measurement the graph cannot take returns None and is listed in
    `unmeasured`."""

    name = "hf-onnx"

    def __init__(self, path: Path, args: ModelArgs, with_cache: bool, threads: int, cache_shapes: list[int]):
        self.session = hf_onnx_session(path, threads)
        self.args, self.with_cache, self.cache_shapes = args, with_cache, cache_shapes
        ids = next(i for i in self.session.get_inputs() if i.name == "input_ids")
        self.fixed_batch, self.fixed_tokens = (d if isinstance(d, int) else None for d in ids.shape)
        self.unmeasured: list[str] = []

    def _runner(self, what: str, batch: int, tokens: int, past: int) -> Callable[[], Any] | None:
        """A timed call of the graph on these sizes, or None (noted in `unmeasured`) where the graph
        declares other fixed sizes or refuses them when run (sizes fixed inside: Reshape constants)."""
        if self.fixed_batch not in (None, batch) or self.fixed_tokens not in (None, tokens):
            self.unmeasured.append(f"{what} (the graph's inputs fix batch {self.fixed_batch or 'B'} x "
                                   f"{self.fixed_tokens or 'S'} new tokens)")
            return None
        import onnxruntime as ort

        feeds = self._feeds(batch, tokens, past)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a refusal is expected here and reported below, not logged
        try:
            self.session.run(None, feeds, quiet)
        except Exception as err:  # onnxruntime's own error types: a size the graph cannot run is a finding
            node = re.search(r"Name:'([^']*)'", str(err))
            self.unmeasured.append(f"{what} (fails in ONNX Runtime{' at node ' + node[1] if node else ''}: "
                                   "the exporter fixed these sizes inside the graph)")
            return None
        return lambda: self.session.run(None, feeds)

    def _feeds(self, batch: int, tokens: int, past: int) -> dict[str, Any]:
        ids, pos, mask = random_step_inputs(self.args.vocab_size, batch, tokens, past, 1)
        if not self.with_cache:
            return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
        names = _hf_cache_names("past", len(self.cache_shapes) // 2)
        for name, dim in zip(names, self.cache_shapes):  # [key dim, value dim] per layer, interleaved
            feeds[name] = torch.randn(batch, 1, past, dim).numpy()
        return feeds

    def prefill(self, batch: int, tokens: int) -> Callable[[], Any] | None:
        return self._runner(f"prefill of {tokens} tokens", batch, tokens, 0)

    def decode(self, batch: int, context: int) -> Callable[[], Any] | None:
        return self._runner(f"decode B={batch}", batch, 1, context) if self.with_cache else None

    def close(self) -> None:
        self.session = None


if __name__ == "__main__":  # the child of hf_onnx_export: CHECKPOINT OUT REPORT
    Path(sys.argv[3]).write_text(json.dumps(_hf_onnx_attempts(Path(sys.argv[1]), Path(sys.argv[2]))))
