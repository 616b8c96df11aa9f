"""Text in, text out: an engine with the tokenizer and chat template exported beside it.

`TextEngine.open(OUT)` opens the engine of an OUT folder on a backend and, when the checkpoint
shipped one, its tokenizer (runtime/text.py). Then:

- `generate(prompt)`: text in, text out (a list of prompts runs as one left-padded batch);
  token ids in, token ids out (an OUT without a tokenizer still runs ids);
- `stream(prompt)`: an iterator of text pieces as they are decoded;
- `chat(messages)`: the chat template applied, the reply as text (or streamed). The cache of the
  last conversation is kept: a next call whose rendered tokens start with the same tokens runs
  only the new ones (the longest common prefix is kept, the rest of the cache dropped);
- `complete(...)`: the full record behind these (ids, text, finish reason, timings per phase).

Sampling defaults come from the checkpoint's generation_config.json (greedy unless it sets
`do_sample`); arguments override them. Generation stops on the eos ids of generation_config,
tokenizer_config and config.json, on stop strings (not included in the text), or at
`max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from dscompile.runtime.contract import KVCache
from dscompile.runtime.engine import Engine
from dscompile.errors import EngineError, OptionError, TextError
from dscompile.runtime.generate import Decoding, Timings
from dscompile.runtime.manifest import load_manifest
from dscompile.runtime.sampling import SamplingParams
from dscompile.runtime.text import DetokenizeStream, StopStrings, Tokenizer

BACKENDS = ("onnxruntime", "torch", "tensorrt")
DEFAULT_MAX_NEW_TOKENS = 64


def open_engine(out: str | Path, backend: str = "onnxruntime", provider: str = "auto",
                threads: int | None = None, tf32: bool = False) -> Engine:
    """The engine of OUT on a backend: onnxruntime (provider auto, cpu, cuda or tensorrt),
    torch (the exported programs; provider picks the device) or tensorrt (the built engines).
    `tf32` lets ONNX Runtime's CUDA provider compute float32 GEMMs in TF32 (a TensorRT engine took
    that choice when it was built; the torch backend computes float32 in IEEE float32)."""
    if threads is not None and threads < 1:
        raise OptionError(f"threads must be >= 1, got {threads}")
    if tf32 and backend != "onnxruntime":
        raise OptionError(f"--tf32 is an option of --backend onnxruntime (its CUDA provider), not of {backend}"
                          + (" (TensorRT engines take it when built: export --target tensorrt --tf32)"
                             if backend == "tensorrt" else ""))
    device = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}.get(provider, "auto")  # the torch backends'
    sharding = load_manifest(Path(out)).get("sharding") if backend in BACKENDS else None
    if sharding is not None:
        if backend != "torch":
            raise EngineError(f"{out}: a sharded engine (tp {sharding.get('tp')} x ep {sharding.get('ep')}) runs on "
                              f"--backend torch only; onnxruntime and tensorrt run single-device exports")
        from dscompile.runtime.sharded import ShardedEngine

        if threads is not None:
            torch.set_num_threads(threads)
        return ShardedEngine.load(out, device=device)
    if backend == "onnxruntime":
        from dscompile.runtime.ort_engine import OrtEngine

        return OrtEngine.load(out, provider=provider, threads=threads, tf32=tf32)
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == "torch":
        from dscompile.runtime.torch_engine import TorchEngine

        return TorchEngine.load(out, device=device)
    if backend == "tensorrt":
        from dscompile.runtime.trt_engine import TrtEngine

        return TrtEngine.load(out)
    raise OptionError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")


@dataclass
class Completion:
    """One prompt's result: the new tokens, their text (None without a tokenizer) and why it stopped."""

    prompt_ids: list[int]
    ids: list[int]
    text: str | None
    finish_reason: str
    prompt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "text": self.text, "ids": self.ids,
                "finish_reason": self.finish_reason}


@dataclass
class Result:
    """A generation's completions (one per prompt) and where its time went."""

    completions: list[Completion]
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": [c.to_dict() for c in self.completions], "timings": self.timings.to_dict()}


class TextEngine:
    """An engine plus its tokenizer: generate, stream and chat with text or token ids."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, eos_ids: Sequence[int] = ()):
        self.engine, self.tokenizer = engine, tokenizer
        ids = set(int(i) for i in eos_ids) | set(tokenizer.eos_token_ids if tokenizer is not None else ())
        self.eos_ids = tuple(sorted(ids))
        self._chat_ids: list[int] = []  # tokens whose latent cache is `_chat_cache`
        self._chat_cache: KVCache | None = None
        self._tokenizer_problem: TextError | None = None  # why OUT's tokenizer files did not load

    @classmethod
    def open(cls, out: str | Path, backend: str = "onnxruntime", provider: str = "auto",
             threads: int | None = None, tf32: bool = False) -> "TextEngine":
        """OUT's engine on `backend` (open_engine), and its tokenizer when the export copied one."""
        out = Path(out)
        engine = open_engine(out, backend, provider, threads, tf32)
        manifest = getattr(engine, "manifest", None) or load_manifest(out)
        text = manifest.get("tokenizer") or {}
        tokenizer, problem = None, None
        if text.get("files"):
            try:
                tokenizer = Tokenizer.load(out)
            except TextError as err:  # token ids still run; text says why it cannot
                problem = err
        text_engine = cls(engine, tokenizer, text.get("eos_token_ids", ()))
        text_engine._tokenizer_problem = problem
        return text_engine

    # -- one-shot generation -------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], **options):
        """Text in, text out; token ids in, token ids out; a list of either runs as one batch.

        Options: max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop
        (strings), ignore_eos. See `complete` for the full record.
        """
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], int))
        prompts = [prompt] if single else list(prompt)
        result = self.complete(prompts, **options)
        as_text = isinstance(prompts[0], str)
        outs = [c.text if as_text else c.ids for c in result.completions]
        return outs[0] if single else outs

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[str]:
        """The text of one prompt's continuation, piece by piece as it is decoded."""
        self._need_tokenizer("stream text")
        return self._stream([prompt], options)

    def complete(self, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                 on_text: Callable[[int, str], None] | None = None, **options) -> Result:
        """Run a batch of prompts (all text or all token ids); `on_text(row, piece)` streams."""
        run = self._run(self._encode(prompts), options)
        for row, piece in run:
            if on_text is not None:
                on_text(row, piece)
        for c, p in zip(run.result.completions, prompts):
            c.prompt = p if isinstance(p, str) else None
        return run.result

    # -- chat ----------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict], *, stream: bool = False, **options) -> str | Iterator[str]:
        """The assistant's reply to `messages` (the chat template applied): its text, or an
        iterator of its pieces with `stream=True`. The next call reuses the cached tokens its
        conversation shares with this one."""
        run = self.chat_run(messages, options)
        if stream:
            return (piece for _, piece in run)
        for _ in run:
            pass
        return run.result.completions[0].text or ""

    def chat_run(self, messages: Sequence[dict], options: dict) -> "_Run":
        """The generation behind `chat`, to iterate for `(row, piece)`; `.result` once done."""
        tokenizer = self._need_tokenizer("chat")
        ids = tokenizer.encode(tokenizer.render_chat(list(messages), add_generation_prompt=True),
                               add_special_tokens=False)
        if not ids:
            raise TextError("the chat template rendered no tokens")
        keep = 0
        for a, b in zip(self._chat_ids, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # at least one token runs: its logits choose the reply's first
        cache = self.engine.truncated_cache(self._chat_cache, keep) if keep and self._chat_cache else None
        self._chat_ids, self._chat_cache = [], None  # released, so the engine may reuse its buffers
        run = self._run([ids[keep if cache else 0:]], options, cache=cache, seen=[ids[:keep] if cache else []])

        def remember() -> None:
            history = (ids + run.decoding.tokens[0])[: run.decoding.cache.length if run.decoding.cache else 0]
            self._chat_ids, self._chat_cache = history, run.decoding.cache

        run.on_finish = remember
        run.reused_tokens = keep if cache is not None else 0
        return run

    def reset(self) -> None:
        """Forget the cached conversation (the next chat runs its whole prompt)."""
        self._chat_ids, self._chat_cache = [], None

    # -- internals -----------------------------------------------------------------------------

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self._tokenizer_problem is not None:
            raise self._tokenizer_problem
        if self.tokenizer is None:
            raise TextError(f"cannot {what}: the engine has no tokenizer.json (the checkpoint shipped none); "
                            "token ids still work")
        return self.tokenizer

    def _encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if not prompts:
            raise OptionError("no prompt given")
        if all(isinstance(p, str) for p in prompts):
            tokenizer = self._need_tokenizer("encode text")
            ids = [tokenizer.encode(p) for p in prompts]
            empty = [i for i, p in enumerate(ids) if not p]
            if empty:
                raise TextError(f"prompt {empty[0]} encodes to no tokens")
            return ids
        if all(not isinstance(p, str) and all(isinstance(t, int) for t in p) for p in prompts):
            return [list(p) for p in prompts]
        raise OptionError("prompts must be all strings or all lists of token ids")

    def _stream(self, prompts, options) -> Iterator[str]:
        for _, piece in self._run(self._encode(prompts), options):
            yield piece

    def sampling(self, options: dict) -> tuple[SamplingParams, int]:
        """Sampling parameters and max_new_tokens: the checkpoint's defaults, then `options`."""
        known = {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"}
        unknown = sorted(set(options) - known - {"stop", "ignore_eos"})
        if unknown:
            raise OptionError(f"unknown generation option {unknown[0]!r}")
        defaults = dict(self.tokenizer.generation_defaults) if self.tokenizer is not None else {}
        sample = bool(defaults.get("do_sample", False))
        given = {k: v for k, v in options.items() if k in known and v is not None}
        params = SamplingParams(
            temperature=float(given.get("temperature", defaults.get("temperature", 1.0) if sample else 0.0)),
            top_p=float(given.get("top_p", defaults.get("top_p", 1.0) if sample else 1.0)),
            top_k=int(given.get("top_k", defaults.get("top_k", 0) if sample else 0)),
            repetition_penalty=float(given.get("repetition_penalty", defaults.get("repetition_penalty", 1.0))),
            seed=given.get("seed"),
        )
        params.check()
        max_new = int(given.get("max_new_tokens", defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)))
        if max_new < 1:
            raise OptionError(f"max_new_tokens must be >= 1, got {max_new}")
        return params, max_new

    def _run(self, prompts: list[list[int]], options: dict, cache: KVCache | None = None,
             seen: list[list[int]] | None = None) -> "_Run":
        params, max_new = self.sampling(options)
        stop = options.get("stop") or ()
        stops = [stop] if isinstance(stop, str) else list(stop)
        if stops:
            self._need_tokenizer("match stop strings")
        eos = () if options.get("ignore_eos") else self.eos_ids
        decoding = Decoding(self.engine, prompts, max_new, params, eos_ids=eos, cache=cache, seen=seen)
        return _Run(self.tokenizer, decoding, prompts, stops)


class _Run:
    """A generation and its text: iterate for `(row, piece)`; `result` holds the record at the end."""

    def __init__(self, tokenizer: Tokenizer | None, decoding: Decoding, prompts: list[list[int]],
                 stops: Sequence[str]):
        self.decoding, self.prompts, self.tokenizer = decoding, prompts, tokenizer
        rows = len(prompts)
        self._text: list[list[str]] = [[] for _ in range(rows)]
        self._streams: list[DetokenizeStream] | None = (
            [tokenizer.stream() for _ in range(rows)] if tokenizer is not None else None)
        self._stops = [StopStrings(stops) for _ in range(rows)] if stops else None
        self.on_finish: Callable[[], None] | None = None
        self.result: Result | None = None
        self.reused_tokens = 0  # prompt tokens a chat found in the cache of its previous turn

    def __iter__(self) -> Iterator[tuple[int, str]]:
        for row, token in self.decoding:
            if self._streams is None:
                continue
            piece = self._streams[row].push(token)
            if self._stops is not None:
                piece, stopped = self._stops[row].feed(piece)
                if stopped:
                    self.decoding.stop(row)
            if piece:
                self._text[row].append(piece)
                yield row, piece
        for row in range(len(self.prompts)):
            tail = self._tail(row)
            if tail:
                self._text[row].append(tail)
                yield row, tail
        d = self.decoding
        self.result = Result(
            [Completion(p, list(t), "".join(text) if self._streams is not None else None, reason or "length")
             for p, t, text, reason in zip(self.prompts, d.tokens, self._text, d.finish_reasons)],
            d.timings)
        if self.on_finish is not None:
            self.on_finish()

    def _tail(self, row: int) -> str:
        """What a finished row still holds back: an unfinished character, a possible stop string's start."""
        if self._streams is None:
            return ""
        rest = self._streams[row].flush()
        if self._stops is None:
            return rest
        if self.decoding.finish_reasons[row] == "stop":
            return ""
        piece, stopped = self._stops[row].feed(rest)
        if stopped:
            self.decoding.finish_reasons[row] = "stop"
            return piece
        return piece + self._stops[row].flush()

