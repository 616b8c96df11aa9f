"""`dscompile serve` as clients see it: a real server process on 127.0.0.1, driven by the official
`openai` client (and raw HTTP where the point is the wire), over the tiny v3 engine of the session.

One server runs for the whole module (started once, ~10 s). What it checks: greedy text equals
`dscompile run --json`; streamed pieces equal the whole answer; seeded sampling is reproducible
and does not depend on the other requests in the batch; 16 concurrent streams of different
lengths, joining at different times, each get their solo tokens and finish reason; a prompt
sharing two blocks with an earlier one reports cached tokens and the same tokens; clients that
drop mid-stream cancel their request without costing anyone else a token, and the server ends
with nothing running and its memory back near where it was; a full queue answers 503 with
Retry-After; every bad request gets its status and OpenAI's error JSON.

The soak (2,000 requests, 10% dropped) is opt-in: DSCOMPILE_SERVE_SOAK=1 pytest tests/serve -k soak.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import run_here

openai = pytest.importorskip("openai", reason="the serve tests need the test extra (openai, httpx)")
httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra (openai, httpx)")
pytest.importorskip("fastapi", reason="dscompile serve needs the serve extra (fastapi, uvicorn, prometheus-client)")

KEY = "test-key"
MODEL = "tiny-v3"
MAX_NUM_SEQS, MAX_QUEUE = 8, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def aclient(self) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.http.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
        return out

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def engine_dir(exported):
    return exported("v3")


@pytest.fixture(scope="module")
def server(engine_dir):
    port = _free_port()
    argv = [sys.executable, "-m", "dscompile", "serve", str(engine_dir), "--port", str(port), "--api-key", KEY,
            "--served-model-name", MODEL, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
            "--threads", "1", "--json"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line, f"the server did not start: {process.stderr.read()}"
        info = json.loads(line)
        assert info["model"] == MODEL and info["url"] == f"http://127.0.0.1:{port}"
        srv = Server(process, info["url"])
        deadline = time.monotonic() + 120
        while srv.http.get("/health").status_code != 200:
            assert process.poll() is None and time.monotonic() < deadline, "the server never turned healthy"
            time.sleep(0.1)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def llm(engine_dir):
    """The same engine in this process, one request at a time: the solo reference."""
    from dscompile.runtime.session import TextEngine

    return TextEngine.open(engine_dir, threads=1)


def _solo(llm, prompt, **options):
    return llm.complete([prompt], **options).completions[0]


def test_models_health_and_metrics_names(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.http.get("/health").json() == {"status": "ok"}
    names = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "cache_bytes_in_use",
                 "num_aborted_requests_total"):
        assert f"dscompile:{name}" in names, name


def test_greedy_text_equals_dscompile_run(server, engine_dir):
    prompt = "The compiler turns a checkpoint into"
    run = run_here("run", engine_dir, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0,
                   "--threads", 1, "--json")
    assert run.returncode == 0, run.stderr
    ref = json.loads(run.stdout)["outputs"][0]
    got = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                             logprobs=0)
    choice = got.choices[0]
    assert choice.text == ref["text"]
    assert choice.finish_reason == {"eos": "stop"}.get(ref["finish_reason"], ref["finish_reason"])
    assert got.usage.completion_tokens == len(ref["ids"]) == len(choice.logprobs.tokens)
    assert got.usage.prompt_tokens == len(ref["prompt_ids"])
    # the same prompt as token ids
    ids = server.client().completions.create(model=MODEL, prompt=ref["prompt_ids"], max_tokens=12, temperature=0)
    assert ids.choices[0].text == ref["text"]


def test_streamed_pieces_equal_the_whole_answer(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0

    done = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0, logprobs=2)
    stream = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0,
                                            logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in stream) == done.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens) for c in stream if c.choices[0].logprobs) == 10
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-5 for top, chosen in zip(lp.top_logprobs,
                                                                                            lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)


def test_stop_strings_end_the_text(server, llm):
    ref = _solo(llm, "The compiler", max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert len(ref.text) > 4
    stop = ref.text[len(ref.text) // 2:][:2]
    aborted = server.metrics()["dscompile:num_aborted_requests_total"]
    got = server.client().completions.create(model=MODEL, prompt="The compiler", max_tokens=24, temperature=0,
                                             stop=[stop], extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == ref.text[: ref.text.find(stop)]
    assert server.metrics()["dscompile:num_aborted_requests_total"] == aborted  # a stop string finishes, not aborts


def test_seeded_sampling_is_reproducible_under_load(server, llm):
    client = server.client()
    options = dict(model=MODEL, prompt="Sampling with a seed", max_tokens=16, temperature=1.0, top_p=0.95, seed=7,
                   extra_body={"ignore_eos": True})
    alone = client.completions.create(**options).choices[0].text
    ref = _solo(llm, "Sampling with a seed", max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7,
                ignore_eos=True)
    assert alone == ref.text

    async def under_load():
        aclient = server.aclient()
        noise = [aclient.completions.create(model=MODEL, prompt="noise " * (i + 1), max_tokens=20, temperature=1.0,
                                            seed=i, extra_body={"ignore_eos": True}) for i in range(6)]
        tasks = [asyncio.create_task(n) for n in noise]
        await asyncio.sleep(0.05)
        mine = await aclient.completions.create(**options)
        await asyncio.gather(*tasks)
        return mine.choices[0].text

    assert asyncio.run(under_load()) == alone
    other = client.completions.create(**{**options, "seed": 8}).choices[0].text
    assert other != alone


def test_sixteen_concurrent_streams_get_their_solo_tokens(server, llm):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    cases = []
    for i in range(16):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        cases.append((prompt, rng.randint(1, 24), rng.random() < 0.5, rng.uniform(0, 0.4)))
    refs = [_solo(llm, p, max_new_tokens=n, temperature=0.0, ignore_eos=ignore) for p, n, ignore, _ in cases]

    async def one(aclient, prompt, n, ignore, delay):
        await asyncio.sleep(delay)
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": ignore})
        text, reason, used = [], None, None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                used = chunk.usage
        return "".join(text), reason, used

    async def all_of_them():
        aclient = server.aclient()
        return await asyncio.gather(*(one(aclient, *case) for case in cases))

    for (text, reason, used), ref, case in zip(asyncio.run(all_of_them()), refs, cases):
        assert text == ref.text, case
        assert reason == {"eos": "stop"}.get(ref.finish_reason, ref.finish_reason), case
        assert used.completion_tokens == len(ref.ids)


def test_a_shared_prefix_is_cached_and_gives_the_same_tokens(server, llm):
    rng = random.Random(1)
    vocab = llm.engine.info.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(70)]
    first = prefix + [rng.randrange(3, vocab) for _ in range(5)]
    second = prefix + [rng.randrange(3, vocab) for _ in range(7)]
    client = server.client()
    client.completions.create(model=MODEL, prompt=first, max_tokens=4, temperature=0)
    got = client.completions.create(model=MODEL, prompt=second, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    ref = llm.complete([second], max_new_tokens=12, temperature=0.0, ignore_eos=True).completions[0]
    assert got.usage.prompt_tokens_details.cached_tokens > 0
    assert got.usage.prompt_tokens_details.cached_tokens <= 70
    assert got.choices[0].text == ref.text


def _drop_after(url: str, body: dict, chunks: int) -> None:
    """A raw client: send a streamed request, read a few chunks, close the socket."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        got = b""
        while got.count(b"data: ") < chunks:
            part = s.recv(4096)
            if not part:
                break
            got += part


@pytest.mark.parametrize("requests", [
    200,
    pytest.param(2000, marks=pytest.mark.skipif(not os.environ.get("DSCOMPILE_SERVE_SOAK"),
                                                reason="opt-in soak: DSCOMPILE_SERVE_SOAK=1"), id="soak"),
])
def test_dropped_clients_cost_nobody_else_and_leave_nothing_running(server, requests):
    """Streamed requests, 16 at a time; every tenth client drops mid-stream (openai's stream.close()
    or a raw socket close). The others get every token; the end state is clean (200 requests, or
    2,000 in the opt-in soak)."""
    rss_slack_mb = 60
    run = _run_with_drops(server, requests)
    kept = [r for r in run["results"] if r[0] != "dropped"]
    assert len(kept) == requests - requests // 10 * 2
    assert all(reason == "length" and got == want for reason, (got, want) in kept), kept[:5]
    assert not run["still_running"], f"still running after the clients left: {run['metrics']}"
    # a dropped stream is cancelled, unless its 120 tokens were all made before the server saw the client
    # go (a race the 2-core machine's scheduling decides: 38 of 40 aborted in one CI run); none may run on
    aborted, dropped = run["metrics"]["dscompile:num_aborted_requests_total"] - run["aborted_before"], requests // 10 * 2
    assert dropped * 3 // 4 <= aborted <= dropped, (aborted, dropped)
    assert run["rss_after"] < run["rss_before"] + rss_slack_mb, (run["rss_before"], run["rss_after"])
    assert run["health"] == 200


def _run_with_drops(server, requests: int) -> dict:
    """Run the requests; what the test judges: each one's result, the metrics once nothing runs (or 10 s
    passed), RSS before and after, /health."""
    warm = server.client()
    for _ in range(3):
        warm.completions.create(model=MODEL, prompt="warm up " * 8, max_tokens=8, extra_body={"ignore_eos": True})
    rss_before = server.rss_mb()
    aborted_before = server.metrics()["dscompile:num_aborted_requests_total"]

    async def one(aclient, i):
        n = 6 + i % 7
        options = dict(model=MODEL, prompt=f"request {i} " * (1 + i % 9), temperature=0.0, stream=True,
                       extra_body={"ignore_eos": True})
        if i % 10 == 3:  # a raw socket closed after two chunks
            raw = {k: v for k, v in options.items() if k != "extra_body"}
            await asyncio.to_thread(_drop_after, server.url, {**raw, "ignore_eos": True, "max_tokens": 120}, 2)
            return "dropped", None
        if i % 10 == 7:  # the openai client's stream.close() after the first chunk
            stream = await aclient.completions.create(**options, max_tokens=120)
            async for _ in stream:
                break
            await stream.close()
            return "dropped", None
        stream = await aclient.completions.create(**options, max_tokens=n, stream_options={"include_usage": True})
        reason, tokens = None, None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return reason, (tokens, n)

    async def all_of_them():
        aclient = server.aclient()
        gate = asyncio.Semaphore(16)

        async def gated(i):
            async with gate:
                return await one(aclient, i)

        return await asyncio.gather(*(gated(i) for i in range(requests)))

    results = asyncio.run(all_of_them())
    deadline = time.monotonic() + 10
    while (still := (m := server.metrics())["dscompile:num_requests_running"]
           or m["dscompile:num_requests_waiting"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return dict(results=results, still_running=bool(still), metrics=m, aborted_before=aborted_before,
                rss_before=rss_before, rss_after=server.rss_mb(), health=server.http.get("/health").status_code)


def test_a_full_queue_answers_503_with_retry_after(server):
    body = dict(model=MODEL, prompt="hold the slot " * 4, max_tokens=200, ignore_eos=True)

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            async def send():
                return await http.send(http.build_request("POST", "/v1/completions", json={**body, "stream": True}),
                                       stream=True)

            responses = await asyncio.gather(*(send() for _ in range(MAX_NUM_SEQS + MAX_QUEUE + 8)))
            out = []
            for r in responses:  # all in flight at once; then closed, which cancels the accepted ones
                out.append((r.status_code, r.headers.get("retry-after"),
                            json.loads(await r.aread()) if r.status_code != 200 else None))
                await r.aclose()
            return out

    statuses = asyncio.run(flood())
    refused = [s for s in statuses if s[0] == 503]
    assert refused, [s[0] for s in statuses]
    assert all(r[1] is not None and r[2]["error"]["code"] == "queue_full" for r in refused)
    assert {s[0] for s in statuses} <= {200, 503}


BAD = [
    # (path, body, status, param)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(3, 300))}, 400, "prompt"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400,
     "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"},
     400, "tool_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 5},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10 ** 5}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_status_and_error_json(server, path, body, status, param):
    r = server.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_limits_keys_and_transport_errors(server):
    long = server.http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(3, 300))}).json()
    assert "297" in long["error"]["message"] and "256" in long["error"]["message"]
    over = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100000}).json()
    assert "100000" in over["error"]["message"] and "256" in over["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    big = server.http.post("/v1/completions", content=b"{" + b" " * (5 << 20) + b"}",
                           headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    r = server.http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body is not valid JSON")
    r = server.http.get("/v1/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError, match="n: only 1"):
        server.client().completions.create(model=MODEL, prompt="x", n=2)


def test_tokenize_and_detokenize(server, llm):
    r = server.http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    back = server.http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == llm.tokenizer.decode(r["tokens"])
    chat = server.http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2
    bad = server.http.post("/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


class _FailingEngine:
    """The engine, until `fail` is set: then its next decode step raises (a device lost mid-run)."""

    def __init__(self, engine):
        self._engine, self.fail = engine, threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step_ragged(self, *args, **kw):
        if self.fail.is_set():
            raise RuntimeError("device lost\nsecond line")
        time.sleep(0.01)  # slow enough that the requests are still in flight when the test fails it
        return self._engine.step_ragged(*args, **kw)


def test_health_follows_warm_up_and_an_engine_failure_fails_requests_in_flight(engine_dir):
    """In this process, through the ASGI app: /health is 503 before the warm-up step and after the
    engine failed; a stream that waits gets `: ping` comments; a request in flight when it fails gets an error (a stream: an error chunk, then
    [DONE]), and later requests a 503 saying why."""
    from dscompile.runtime.batching import Scheduler
    from dscompile.runtime.session import TextEngine
    from dscompile.serve.app import build_app
    from dscompile.serve.generation import Served
    from dscompile.serve.metrics import Metrics

    text = TextEngine.open(engine_dir, threads=1)
    engine = _FailingEngine(text.engine)
    scheduler = Scheduler(engine, max_num_seqs=2)
    served = Served(text, scheduler, "m")
    served.metrics = Metrics(scheduler.stats, "m")
    body = {"model": "m", "prompt": "x", "max_tokens": 200, "ignore_eos": True}

    async def scenario():
        transport = httpx.ASGITransport(app=build_app(served))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            early = await http.get("/health")
            assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
            waiting = asyncio.create_task(http.post("/v1/completions", json={**body, "max_tokens": 2, "stream": True}))
            await asyncio.sleep(2.3)  # queued before the engine thread runs: the stream keeps alive with a ping
            scheduler.start()
            while not scheduler.ready:
                await asyncio.sleep(0.05)
            assert (await http.get("/health")).status_code == 200
            waited = (await waiting).text
            assert waited.startswith(": ping\n\n") and waited.endswith("data: [DONE]\n\n")
            assert (await http.post("/v1/completions", json={**body, "max_tokens": 2})).status_code == 200
            whole = asyncio.create_task(http.post("/v1/completions", json=body))
            streamed = asyncio.create_task(http.post("/v1/completions", json={**body, "stream": True}))
            while scheduler.stats()["running"] < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            engine.fail.set()
            whole, streamed = await whole, await streamed
            assert whole.status_code == 500 and "device lost" in whole.json()["error"]["message"]
            events = [e for e in streamed.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and "device lost" in json.loads(events[-2][6:])["error"]["message"]
            later = await http.post("/v1/completions", json=body)
            assert later.status_code == 503 and "device lost" in later.json()["error"]["message"]
            health = await http.get("/health")
            assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
            metrics = (await http.get("/metrics")).text
            assert 'dscompile:request_failed_total{model_name="m"} 2.0' in metrics

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_serve_without_the_extra_says_how_to_add_it(engine_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    result = run_here("serve", engine_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ['error: dscompile serve needs fastapi: pip install "dscompile[serve]"']


def test_serve_option_errors_are_one_line(engine_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {("--port", port): f"--port {port}: cannot listen there",
                 ("--max-num-seqs", 0): "--max-num-seqs must be >= 1, got 0",
                 ("--max-model-len", 10 ** 6): "max_model_len must be an integer in [2, 256]"}
        for args, message in cases.items():
            result = run_here("serve", engine_dir, "--port" if args[0] != "--port" else args[0],
                              _free_port() if args[0] != "--port" else args[1], *(args if args[0] != "--port" else ()))
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
    result = run_here("serve", tmp_path / "missing")
    assert result.returncode == 2 and "engine folder not found" in result.stderr
