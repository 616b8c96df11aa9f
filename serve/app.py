"""The FastAPI application: routes, the API key, the body limit, OpenAI-shaped errors.

`build_app(served, api_key)` wires the endpoints of serve/completions.py and the plain ones:
GET /v1/models, GET /health (503 until the scheduler's warm-up step ran, and after the engine
failed), GET /metrics (Prometheus text), POST /tokenize and POST /detokenize. Every error,
FastAPI's own included (unknown route, wrong method, a body that is not JSON), answers
`{"error": {"message", "type", "param", "code"}}`; an exception a handler did not expect answers
500 in that shape and the server keeps serving. Bodies over `MAX_BODY_BYTES` are refused with 413
before they are read whole.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from dscompile.errors import DscompileError, first_line
from dscompile.serve import completions as endpoints
from dscompile.serve.generation import Served
from dscompile.serve.metrics import CONTENT_TYPE
from dscompile.serve.protocol import APIError, bad, parse_chat

MAX_BODY_BYTES = 4 << 20
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key (probes, scrapers)
log = logging.getLogger("dscompile.serve")


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _Guard:
    """ASGI middleware: the API key, then the body limit (Content-Length, and the bytes as they come)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "no API key given" if not token else "the API key is not valid"
                err = APIError(401, f"{why}: send it as 'Authorization: Bearer KEY'", type="authentication_error",
                               code="invalid_api_key")
                return await _error(err)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _error(self._too_large(int(length)))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"the request body is over {self.max_body} bytes", code="body_too_large")
            return message

        await self.app(scope, counted, send)

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body has {size} bytes, more than the limit of {self.max_body}",
                        code="body_too_large")


async def _json(http: HTTPRequest) -> Any:
    raw = await http.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(None, f"the request body is not valid JSON ({e})") from None


def build_app(served: Served, api_key: str | None = None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="dscompile", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(bad(param, first.get("msg", "invalid request")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HTTPRequest, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(APIError(err.status_code, f"{http.method} {http.url.path}: {err.detail}", type=kind))

    @app.exception_handler(Exception)
    async def unexpected(_, err: Exception):
        log.exception("request failed")
        return _error(APIError(500, f"internal error: {type(err).__name__}: {first_line(err)}", type="server_error"))

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        return await endpoints.chat_completions(served, http, await _json(http))

    @app.post("/v1/completions")
    async def complete(http: HTTPRequest):
        return await endpoints.completions(served, http, await _json(http))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "dscompile", "max_model_len": served.max_model_len}]}

    @app.get("/health")
    async def health():
        scheduler = served.scheduler
        if scheduler.failure is not None:
            return _error(APIError(503, scheduler.failure, type="server_error",
                                   code="engine_failed"))
        if not scheduler.ready:
            return _error(APIError(503, "the engine is warming up", type="server_error", code="not_ready"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        body = await _json(http)
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object")
        unknown = sorted(set(body) - {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"})
        if unknown:
            raise bad(unknown[0], f"unknown field {unknown[0]!r}")
        if body.get("model") is not None:
            endpoints.check_model(served, body["model"])
        if ("prompt" in body) == ("messages" in body):
            raise bad("prompt", "give either prompt (text) or messages (a chat)")
        tokenizer = served.tokenizer("tokenize")
        try:
            if "messages" in body:
                turns = parse_chat({"model": served.name, "messages": body["messages"]}).messages
                text = tokenizer.render_chat(turns, add_generation_prompt=body.get("add_generation_prompt", True))
                ids = tokenizer.encode(text, add_special_tokens=False)
            else:
                if not isinstance(body["prompt"], str):
                    raise bad("prompt", "prompt must be a string")
                ids = tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        except DscompileError as err:
            raise bad(None, first_line(err)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len}

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest):
        body = await _json(http)
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object")
        unknown = sorted(set(body) - {"model", "tokens"})
        if unknown:
            raise bad(unknown[0], f"unknown field {unknown[0]!r}")
        if body.get("model") is not None:
            endpoints.check_model(served, body["model"])
        ids = body.get("tokens")
        vocab = served.text.engine.info.vocab_size
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise bad("tokens", "tokens must be a list of token ids")
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            raise bad("tokens", f"token id {outside[0]} is outside the vocabulary [0, {vocab})")
        return {"prompt": served.tokenizer("detokenize").decode(ids)}

    return _Guard(app, api_key, max_body)
