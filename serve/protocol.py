"""The OpenAI request bodies the server takes, checked field by field, and its error shape.

A body is a JSON object; every field is read here, and a field the server does not implement
(`n > 1`, `tools`, `logit_bias`, `echo`, an unknown name, ...) is refused with the field named,
never dropped: a client that relies on it must learn at once that it had no effect. Errors are
`APIError`s, rendered as OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Fields OpenAI defines that this server refuses, with what it accepts instead.
REFUSED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix (insertion) is not supported",
    "echo": "echo is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}
# Fields refused only for values other than these (the value that changes nothing).
NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": (None, ""), "logit_bias": (None, {}),
           "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none")}
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
            "stop", "ignore_eos", "user", "n", "stream", "stream_options", "model", "max_tokens")
CHAT_FIELDS = frozenset({*SAMPLING, "messages", "max_completion_tokens", "logprobs", "top_logprobs",
                         "response_format", *REFUSED})
COMPLETION_FIELDS = frozenset({*SAMPLING, "prompt", "logprobs", "best_of", *REFUSED})
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI error type, the field at fault."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Sampling:
    """The generation fields both endpoints share, checked; None where the client gave none."""

    max_tokens: int | None = None
    max_field: str = "max_tokens"  # the field max_tokens came from (chat also takes max_completion_tokens)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k best
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    sampling: Sampling


def parse_chat(body: Any) -> ChatRequest:
    """A /v1/chat/completions body, or APIError(400) naming the first bad field."""
    body = _object(body)
    _refuse(body, CHAT_FIELDS)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text" and set(fmt) == {"type"}):
        raise bad("response_format", "response_format: only {\"type\": \"text\"} is supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\", \"content\"}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with a string role")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"messages[{i}].{extra[0]}", f"messages[{i}].{extra[0]} is not supported")
        turns.append({"role": m["role"], "content": _content(m.get("content"), f"messages[{i}].content")})
    sampling = _sampling(body, max_field="max_completion_tokens")
    logprobs = _bool(body, "logprobs", False)
    top = body.get("top_logprobs")
    if top is not None:
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if not logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    sampling.logprobs = (top or 0) if logprobs else None
    return ChatRequest(_model(body), turns, sampling)


def parse_completion(body: Any) -> CompletionRequest:
    """A /v1/completions body, or APIError(400) naming the first bad field."""
    body = _object(body)
    _refuse(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [int(t) for t in prompt]
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", f"prompt: a batch of {len(prompt)} prompts is not supported; send one per request")
    else:
        raise bad("prompt", "prompt must be a non-empty string or a non-empty list of token ids")
    sampling = _sampling(body, max_field=None)
    if body.get("logprobs") is not None:
        sampling.logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    return CompletionRequest(_model(body), prompt, sampling)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


def _refuse(body: dict, known: frozenset[str]) -> None:
    for name in body:
        if name not in known:
            raise bad(name, f"unknown field {name!r}", code="unsupported_field")
        if name in NEUTRAL and body[name] in NEUTRAL[name]:
            continue
        if name in REFUSED and body[name] is not None:
            raise bad(name, f"{name}: {REFUSED[name]}", code="unsupported_field")
        if name in ("n", "best_of") and body[name] is not None:
            raise bad(name, f"{name}: only 1 is supported, got {body[name]!r}", code="unsupported_field")


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model must be given, as the served model's name (GET /v1/models)")
    return model


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}[{j}]", f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                          "are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"{where} must be a string or a list of text parts")


def _sampling(body: dict, max_field: str | None) -> Sampling:
    s = Sampling()
    if max_field and body.get(max_field) is not None:
        s.max_tokens, s.max_field = _int(body, max_field, 1, None), max_field
    elif body.get("max_tokens") is not None:
        s.max_tokens = _int(body, "max_tokens", 1, None)
    s.temperature = _float(body, "temperature", 0.0, 2.0)
    s.top_p = _float(body, "top_p", 0.0, 1.0)
    if s.top_p is not None and s.top_p <= 0:
        raise bad("top_p", f"top_p must be in (0, 1], got {s.top_p}")
    if body.get("top_k") is not None:
        k = _int(body, "top_k", -1, None)
        s.top_k = 0 if k == -1 else k  # -1 is vLLM's "off"
    s.repetition_penalty = _float(body, "repetition_penalty", 0.0, None)
    if s.repetition_penalty is not None and s.repetition_penalty <= 0:
        raise bad("repetition_penalty", f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    s.presence_penalty = _float(body, "presence_penalty", -2.0, 2.0) or 0.0
    s.frequency_penalty = _float(body, "frequency_penalty", -2.0, 2.0) or 0.0
    if body.get("seed") is not None:
        s.seed = _int(body, "seed", 0, 2**63 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not (isinstance(stop, list) and all(isinstance(x, str) and x for x in stop)):
            raise bad("stop", "stop must be a non-empty string or a list of them")
        if len(stop) > 16:
            raise bad("stop", f"stop: at most 16 strings, got {len(stop)}")
        s.stop = list(stop)
    s.ignore_eos = _bool(body, "ignore_eos", False)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "user must be a string")
    s.stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not s.stream:
            raise bad("stream_options", "stream_options needs stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", "stream_options takes only include_usage")
        if options.get("continuous_usage_stats"):
            raise bad("stream_options.continuous_usage_stats", "continuous_usage_stats is not supported")
        s.include_usage = _bool(options, "include_usage", False, where="stream_options.include_usage")
    return s


def _bool(body: dict, name: str, default: bool, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(where or name, f"{where or name} must be true or false, got {value!r}")
    return value


def _int(body: dict, name: str, low: int | None, high: int | None) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"{name} must be {span}, got {value}")
    return value


def _float(body: dict, name: str, low: float | None, high: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"{name} must be {span}, got {value}")
    return float(value)
