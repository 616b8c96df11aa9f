"""`dscompile serve`: an OpenAI-compatible HTTP server over one engine (the `serve` extra).

    protocol.py     the request bodies, checked field by field; refused fields; the error shape
    generation.py   a request through the scheduler (runtime/batching.py): ids in, text out, stop strings
    completions.py  POST /v1/chat/completions and /v1/completions, whole or streamed (SSE)
    metrics.py      Prometheus metrics under vLLM's names, prefixed `dscompile:`
    app.py          the FastAPI app: routes, API key, body limit, OpenAI-shaped errors
    server.py       the engine, the scheduler and uvicorn, started and stopped together

The HTTP layer imports only the runtime and the base; the engine thread the scheduler owns is
the only one that touches the engine.
"""
