"""Start and stop the server: the engine, its scheduler (one engine thread) and uvicorn.

The engine opens first (a bad OUT fails in one line before any port is bound), then the
scheduler starts its engine thread, whose warm-up step runs while uvicorn already answers:
/health says 503 until it is done. Stopping the server (Ctrl-C, SIGTERM) closes the scheduler,
which ends the requests in flight.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dscompile.errors import OptionError
from dscompile.runtime.batching import Scheduler
from dscompile.runtime.session import TextEngine

from dscompile.serve.app import MAX_BODY_BYTES, build_app
from dscompile.serve.generation import Served
from dscompile.serve.metrics import Metrics


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # None: OUT's folder name
    max_num_seqs: int = 8
    max_queue: int = 64
    prefill_chunk: int = 128
    max_model_len: int | None = None
    backend: str = "onnxruntime"
    provider: str = "auto"
    threads: int | None = None
    max_body_bytes: int = MAX_BODY_BYTES

    def check(self) -> None:
        if not 0 <= self.port < 65536:
            raise OptionError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_num_seqs", "max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise OptionError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.api_key is not None and not self.api_key:
            raise OptionError("--api-key is empty")


def open_served(out: Path, options: ServeOptions) -> Served:
    """OUT's engine and tokenizer, a started scheduler over it, and the metrics."""
    options.check()
    text = TextEngine.open(out, backend=options.backend, provider=options.provider, threads=options.threads)
    scheduler = Scheduler(text.engine, max_num_seqs=options.max_num_seqs, max_queue=options.max_queue,
                          prefill_chunk=options.prefill_chunk, max_model_len=options.max_model_len)
    name = options.served_model_name or Path(out).resolve().name
    served = Served(text, scheduler, name)
    served.metrics = Metrics(scheduler.stats, name)
    scheduler.start()
    return served


def run(out: Path, options: ServeOptions, on_listening: Callable[[Served], None] | None = None) -> None:
    """Serve OUT until interrupted."""
    import uvicorn

    _check_address(options.host, options.port)  # before the engine opens: a taken port fails in one line
    served = open_served(out, options)
    app = build_app(served, options.api_key, options.max_body_bytes)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, lifespan="off")
    server = uvicorn.Server(config)
    if on_listening is not None:
        startup = server.startup

        async def announce(sockets=None):
            await startup(sockets=sockets)
            on_listening(served)

        server.startup = announce
    try:
        server.run()
    finally:
        served.scheduler.close()


def _check_address(host: str, port: int) -> None:
    """OptionError unless `host:port` can be bound now (as uvicorn will bind it, SO_REUSEADDR set)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OptionError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise OptionError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
