"""POST /v1/chat/completions and POST /v1/completions: OpenAI's response and chunk shapes.

Both endpoints run the same way (serve/generation.py): the body is checked, the prompt encoded
(the chat template for chat), the request submitted, and the generation answered whole or
streamed as server-sent events (`data: {chunk}` ... `data: [DONE]`; the first chat delta carries
the role, `stream_options.include_usage` adds a last chunk with the usage, `: ping` comments keep
the connection alive while the request waits or prefills). They differ only in their shapes:
chat's `delta`/`message` and its logprobs (`content: [{token, logprob, bytes, top_logprobs}]`),
completions' `text` and its logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

An error after a stream began goes out as one chunk `{"error": ...}` followed by `[DONE]`. A
client that goes away cancels its request: the stream's generator is closed or cancelled when
the connection drops, and a request answered whole watches for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from dscompile.serve.generation import Delta, Generation, Outcome, Ping, Served
from dscompile.serve.protocol import APIError, parse_chat, parse_completion

DISCONNECT_POLL_SECONDS = 0.5


async def chat_completions(served: Served, http: HTTPRequest, body: Any) -> Response:
    req = parse_chat(body)
    check_model(served, req.model)
    ids = served.chat_ids(req.messages)
    gen = served.start(served.request(ids, req.sampling, "messages"), req.sampling.stop)
    shape = _ChatShape(served, req.model, req.sampling.logprobs)
    return await _answer(gen, shape, req.sampling, http)


async def completions(served: Served, http: HTTPRequest, body: Any) -> Response:
    req = parse_completion(body)
    check_model(served, req.model)
    ids = served.prompt_ids(req.prompt)
    gen = served.start(served.request(ids, req.sampling), req.sampling.stop)
    shape = _CompletionShape(served, req.model, req.sampling.logprobs)
    return await _answer(gen, shape, req.sampling, http)


def check_model(served: Served, model: str) -> None:
    """404 unless `model` is the served name."""
    if model != served.name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served.name!r}",
                       param="model", code="model_not_found")


async def _answer(gen: Generation, shape: "_Shape", sampling, http: HTTPRequest) -> Response:
    if sampling.stream:
        return StreamingResponse(_stream(gen, shape, sampling.include_usage, http), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_watch_disconnect(gen, http))
    try:
        deltas, outcome = [], None
        async for event in gen.events():
            if isinstance(event, Delta):
                deltas.append(event)
            elif isinstance(event, Outcome):
                outcome = event
    finally:
        watcher.cancel()
        gen.cancel()  # no-op once finished; frees the slot when this handler was cancelled
    return JSONResponse(shape.whole(deltas, outcome))


async def _watch_disconnect(gen: Generation, http: HTTPRequest) -> None:
    while not gen.finished:
        if await http.is_disconnected():
            gen.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _stream(gen: Generation, shape: "_Shape", include_usage: bool, http: HTTPRequest) -> AsyncIterator[str]:
    try:
        first = shape.first_chunk()
        if first is not None:
            yield _sse(first)
        async for event in gen.events(pings=True):
            if isinstance(event, Ping):
                if await http.is_disconnected():
                    return
                yield ": ping\n\n"
            elif isinstance(event, Delta):
                chunk = shape.delta_chunk(event)
                if chunk is not None:
                    yield _sse(chunk)
            else:
                yield _sse(shape.last_chunk(event))
                if include_usage:
                    yield _sse(shape.usage_chunk(event))
        yield "data: [DONE]\n\n"
    except APIError as err:
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()  # the client went away (the generator was closed or cancelled) before the end


def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}}


class _Shape:
    """One endpoint's response and chunk shapes."""

    object_whole = object_chunk = ""
    id_prefix = ""

    def __init__(self, served: Served, model: str, logprobs: int | None):
        self.served, self.model, self.logprobs = served, model, logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def token_text(self, token_id: int) -> str:
        tokenizer = self.served.text.tokenizer
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def first_chunk(self) -> dict | None:
        return None

    def wanted(self, delta: Delta) -> bool:
        """Whether a delta makes a chunk: it has text, or a token whose logprobs were asked for, or
        a token of an engine without a tokenizer (no text ever: a chunk per token still shows progress)."""
        if delta.text:
            return True
        return delta.token is not None and (self.logprobs is not None or self.served.text.tokenizer is None)

    def usage_chunk(self, outcome: Outcome) -> dict:
        return self._envelope(self.object_chunk, [], usage=usage(outcome))


class _ChatShape(_Shape):
    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def _logprobs(self, deltas: list[Delta]) -> dict | None:
        if self.logprobs is None:
            return None
        content = []
        for d in deltas:
            if d.token is None:
                continue
            text = self.token_text(d.token.id)
            content.append({"token": text, "logprob": d.token.logprob, "bytes": list(text.encode("utf-8")),
                            "top_logprobs": [{"token": (t := self.token_text(i)), "logprob": lp,
                                              "bytes": list(t.encode("utf-8"))} for i, lp in d.token.top_logprobs]})
        return {"content": content}

    def whole(self, deltas: list[Delta], outcome: Outcome) -> dict:
        message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(deltas),
                  "finish_reason": outcome.finish_reason}
        return self._envelope(self.object_whole, [choice], usage=usage(outcome))

    def first_chunk(self) -> dict:
        return self._envelope(self.object_chunk, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])

    def delta_chunk(self, delta: Delta) -> dict | None:
        if not self.wanted(delta):
            return None
        return self._envelope(self.object_chunk, [{"index": 0, "delta": {"content": delta.text},
                                                   "logprobs": self._logprobs([delta]), "finish_reason": None}])

    def last_chunk(self, outcome: Outcome) -> dict:
        return self._envelope(self.object_chunk, [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": outcome.finish_reason}])


class _CompletionShape(_Shape):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, *args):
        super().__init__(*args)
        self.offset = 0  # text_offset of the next token, over the whole completion

    def _logprobs(self, deltas: list[Delta]) -> dict | None:
        if self.logprobs is None:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for d in deltas:
            if d.token is not None:
                out["tokens"].append(self.token_text(d.token.id))
                out["token_logprobs"].append(d.token.logprob)
                out["top_logprobs"].append({self.token_text(i): lp for i, lp in d.token.top_logprobs}
                                           if self.logprobs else None)
                out["text_offset"].append(self.offset)
            self.offset += len(d.text)
        return out

    def whole(self, deltas: list[Delta], outcome: Outcome) -> dict:
        choice = {"index": 0, "text": "".join(d.text for d in deltas), "logprobs": self._logprobs(deltas),
                  "finish_reason": outcome.finish_reason}
        return self._envelope(self.object_whole, [choice], usage=usage(outcome))

    def delta_chunk(self, delta: Delta) -> dict | None:
        if not self.wanted(delta):
            return None
        return self._envelope(self.object_chunk, [{"index": 0, "text": delta.text,
                                                   "logprobs": self._logprobs([delta]), "finish_reason": None}])

    def last_chunk(self, outcome: Outcome) -> dict:
        return self._envelope(self.object_chunk, [{"index": 0, "text": "", "logprobs": None,
                                                   "finish_reason": outcome.finish_reason}])
