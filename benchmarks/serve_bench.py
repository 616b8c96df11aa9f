"""`dscompile serve` under load, against the engine's own step times measured in the same run.

    python benchmarks/serve_bench.py [--engines float32,int4] [--clients 1,4,8,16] [--prompt-len 128]
        [--output-len 32] [--rounds 2] [--llama-server /work/shared/llamacpp/bin] [--gguf-dir /work/gguf]

For each engine of the bench config (bench/cache.py: exported once under $DSCOMPILE_HOME, or
`--engine NAME=OUT`):

1. the engine alone, in this process: a prefill of `--prompt-len` tokens into a slot and a ragged
   decode step at each batch size, median of a few runs (the scheduler's own primitives, no HTTP);
2. a `dscompile serve` process over it, driven closed-loop by 1, 4, 8 and 16 clients, each sending
   `--rounds` requests one after the other: random token-id prompts of a fixed length,
   `ignore_eos`, `max_tokens` = `--output-len`, streamed. The serving benchmarks' definitions:
   TTFT = request sent -> first streamed token; ITL = the gaps between a request's chunks;
   TPOT = (E2EL - TTFT) / (tokens - 1); p50/p90/p99 over every request of a level; output tokens/s
   = all tokens / the level's wall time;
3. one more run at 8 clients where one 512-token prompt arrives mid-run: the p99 of the other
   streams' ITL against their p50 (chunked prefill keeps it low);
4. the ratios: tokens/s at 8 clients vs 1 (target >= 2.0x), TPOT at 1 client vs the engine's
   decode step at batch 1 (<= 1.10x), TTFT at 1 client vs its prefill (<= 1.15x), the p99/p50 ITL
   of step 3 (<= 2x).

With a GGUF of the bench model in `--gguf-dir` (q4_0 beside our int4, f32 beside our float32) and
llama.cpp's binaries, `llama-server --parallel 8` runs on the same prompts with the same client
(its binaries are copied to a writable folder first) and the table gets its row and our ratio; a
llama-server that does not start (the ready-built binaries stop with SIGILL on a CPU without
AVX-512) is reported and skipped.
The client, server and engine share the machine: on 2 cores the client's own time is part of the
numbers (it is small next to a step of the bench model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LONG_PROMPT = 512
ENGINES = {"float32": {}, "int4": {"weights": "int4"}}
GGUF_FOR = {"float32": "bench-f32.gguf", "int4": "bench-q4_0.gguf"}


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the client -----------------------------------------------------------------------------------

async def one_request(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    first = last = None
    gaps, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if not chunk.get("choices") or chunk["choices"][0].get("finish_reason"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            tokens += 1
    end = time.perf_counter()
    return Sample(ttft=(first or end) - start, e2e=end - start, tokens=tokens, gaps=gaps)


async def closed_loop(url: str, model: str, clients: int, rounds: int, prompt_len: int, output_len: int,
                      vocab: int, seed: int, long_prompt_at: float | None = None, long_prompt_len: int = LONG_PROMPT) -> tuple[list[Sample], float, list]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(clients * rounds)]
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client(c: int) -> list[Sample]:
            return [await one_request(http, model, prompts[c * rounds + r], output_len) for r in range(rounds)]

        async def long_one() -> list[Sample]:
            await asyncio.sleep(long_prompt_at)
            prompt = [rng.randrange(vocab) for _ in range(long_prompt_len)]
            return [await one_request(http, model, prompt, 4)]

        start = time.perf_counter()
        tasks = [client(c) for c in range(clients)]
        extra = [long_one()] if long_prompt_at is not None else []
        done = await asyncio.gather(*tasks, *extra)
        wall = time.perf_counter() - start
    samples = [s for group in done[:clients] for s in group]
    return samples, wall, [s for group in done[clients:] for s in group]


def summarize(samples: list[Sample], wall: float) -> dict:
    ttft = [s.ttft for s in samples]
    itl = [g for s in samples for g in s.gaps]
    tpot = [s.tpot for s in samples if s.tpot is not None]
    tokens = sum(s.tokens for s in samples)
    return {"requests": len(samples), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            **{f"ttft_p{p}": pct(ttft, p) for p in (50, 90, 99)}, **{f"itl_p{p}": pct(itl, p) for p in (50, 90, 99)},
            **{f"tpot_p{p}": pct(tpot, p) for p in (50, 90, 99)}}


# -- the engine alone -----------------------------------------------------------------------------

def engine_steps(out: Path, batches: list[int], prompt_len: int, output_len: int, threads: int,
                 repeats: int = 5) -> dict:
    """Median time of a slot prefill of `prompt_len` tokens and of a ragged decode step per batch size,
    with the rows at the context a request has half-way through its output."""
    import torch

    from dscompile.runtime.session import open_engine

    engine = open_engine(out, threads=threads)
    rng = random.Random(0)
    vocab = engine.info.vocab_size
    capacity = ((prompt_len + output_len) // 128 + 1) * 128
    slots = engine.new_slots(max(batches), capacity)
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    engine.prefill_slot(prompt, slots, 0, 0)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.prefill_slot(prompt, slots, 0, 0)
        times.append(time.perf_counter() - t)
    result = {"prefill_s": statistics.median(times), "decode_s": {}}
    for t in slots.tensors:  # every slot holds the prompt's rows: each row attends a real context
        t[1:].copy_(t[:1].expand_as(t[1:]))
    context = prompt_len + output_len // 2
    for b in batches:
        tokens = torch.tensor([rng.randrange(vocab) for _ in range(b)])
        lengths = torch.full((b,), context, dtype=torch.int64)
        engine.step_ragged(tokens, lengths, slots)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.step_ragged(tokens, lengths, slots)
            times.append(time.perf_counter() - t)
        result["decode_s"][b] = statistics.median(times)
    result["vocab"] = vocab
    del engine, slots
    return result


# -- servers --------------------------------------------------------------------------------------

class Running:
    def __init__(self, argv: list[str], url: str, model: str, env: dict | None = None, log: Path | None = None):
        self.url, self.model = url, model
        self.log = open(log or os.devnull, "w")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server never turned healthy")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def ours(out: Path, max_num_seqs: int, threads: int, prefill_chunk: int, logs: Path) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "dscompile", "serve", str(out), "--port", str(port), "--served-model-name", "bench",
            "--max-num-seqs", str(max_num_seqs), "--threads", str(threads), "--prefill-chunk", str(prefill_chunk)]
    return Running(argv, f"http://127.0.0.1:{port}", "bench", log=logs / f"serve-{out.name}.log")


def llama(bin_dir: Path, gguf: Path, threads: int, context: int, logs: Path) -> Running:
    port = free_port()
    local = Path(tempfile.mkdtemp(prefix="llamacpp-bin-"))
    for f in bin_dir.iterdir():  # the library links are stored as small files naming their target: relink them
        text = f.read_bytes()[:256] if f.stat().st_size < 256 else b""
        if text and (bin_dir / text.decode(errors="replace").strip()).is_file():
            (local / f.name).symlink_to(text.decode().strip())
        else:
            shutil.copy(f, local / f.name)
            (local / f.name).chmod(0o755)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{local}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    argv = [str(local / "llama-server"), "-m", str(gguf), "--parallel", "8", "-c", str(context), "-t", str(threads),
            "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    return Running(argv, f"http://127.0.0.1:{port}", "bench", env=env, log=logs / f"llama-{gguf.stem}.log")


# -- the run --------------------------------------------------------------------------------------

def measure(server: Running, args, vocab: int) -> dict:
    levels = {}
    for c in args.clients:
        samples, wall = asyncio.run(closed_loop(server.url, server.model, c, args.rounds, args.prompt_len,
                                                args.output_len, vocab, seed=c))[:2]
        levels[c] = summarize(samples, wall)
        print(f"  {c:>2} clients: {levels[c]['tokens_per_s']:7.1f} tok/s  TTFT p50 {levels[c]['ttft_p50'] * 1e3:7.1f} ms"
              f"  TPOT p50 {levels[c]['tpot_p50'] * 1e3:6.1f} ms  ITL p99 {levels[c]['itl_p99'] * 1e3:7.1f} ms",
              flush=True)
    return levels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="float32,int4")
    p.add_argument("--engine", action="append", default=[], help="NAME=OUT: an engine folder instead of the cache's")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=128, help="the server's --prefill-chunk")
    p.add_argument("--long-prompt", type=int, default=LONG_PROMPT, help="the prompt that arrives mid-run")
    p.add_argument("--llama-server", type=Path, default=Path("/work/shared/llamacpp/bin"))
    p.add_argument("--gguf-dir", type=Path, default=Path("/work/gguf"))
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    given = dict(e.split("=", 1) for e in args.engine)
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    results = {}
    for name in args.engines.split(","):
        if name in given:
            out = Path(given[name])
        else:
            from dscompile.bench.cache import bench_checkpoint, cached_export
            from dscompile.bench.systems import OUR_ENGINES
            from dscompile.cli import cache_home

            home = cache_home()
            out = cached_export(bench_checkpoint(home), home, {**OUR_ENGINES["ours"], **ENGINES[name]})
        print(f"{name}: {out}", flush=True)
        steps = engine_steps(out, sorted({1, *args.clients, max(args.clients)}), args.prompt_len, args.output_len,
                             args.threads)
        print(f"  engine alone: prefill {args.prompt_len} tokens {steps['prefill_s'] * 1e3:.1f} ms; decode step "
              + ", ".join(f"batch {b} {t * 1e3:.1f} ms" for b, t in steps["decode_s"].items()), flush=True)
        server = ours(out, max(args.clients), args.threads, args.prefill_chunk, logs)
        try:
            server.wait_healthy()
            levels = measure(server, args, steps["vocab"])
            half_way = levels[8 if 8 in levels else max(levels)]["wall_s"] / 2  # the long prompt arrives mid-run
            samples, wall, long = asyncio.run(closed_loop(server.url, server.model, 8, args.rounds, args.prompt_len,
                                                          args.output_len, steps["vocab"], seed=99,
                                                          long_prompt_at=half_way, long_prompt_len=args.long_prompt))
            mixed = {**summarize(samples, wall), "long_prompt_ttft": long[0].ttft}
        finally:
            server.stop()
        entry = {"engine": str(out), "steps": steps, "levels": levels, "long_prompt_mid_run": mixed}
        ratios = {
            "tokens_per_s_8_vs_1": levels[8]["tokens_per_s"] / levels[1]["tokens_per_s"] if 8 in levels else None,
            "tpot_1_vs_decode_step": levels[1]["tpot_p50"] / steps["decode_s"][1],
            "ttft_1_vs_prefill": levels[1]["ttft_p50"] / steps["prefill_s"],
            "itl_p99_vs_p50_with_a_long_prompt": mixed["itl_p99"] / mixed["itl_p50"],
        }
        entry["ratios"] = ratios
        gguf = args.gguf_dir / GGUF_FOR[name]
        if gguf.is_file() and (args.llama_server / "llama-server").is_file():
            print(f"  llama-server --parallel 8 on {gguf.name}", flush=True)
            context = 8 * (args.prompt_len + args.output_len + args.long_prompt)
            peer = llama(args.llama_server, gguf, args.threads, context, logs)
            try:
                peer.wait_healthy()
                peer_levels = measure(peer, args, steps["vocab"])
            except RuntimeError as err:  # e.g. SIGILL: binaries built for AVX-512 on a CPU without it
                print(f"  llama-server not measured: {err}", flush=True)
                peer_levels = None
            finally:
                peer.stop()
            if peer_levels is not None:
                entry["llama_server"] = {"gguf": str(gguf), "levels": peer_levels}
                for c in args.clients:
                    ratios[f"tokens_per_s_vs_llama_server_{c}"] = (levels[c]["tokens_per_s"]
                                                                  / peer_levels[c]["tokens_per_s"])
        elif not gguf.is_file():
            print(f"  (no {gguf} : llama-server not run for {name})", flush=True)
        results[name] = entry
        print_table(name, entry, args)
        if args.json:  # after each engine, so a later failure keeps what was measured
            args.json.write_text(json.dumps(results, indent=2, default=str))


def print_table(name: str, entry: dict, args) -> None:
    steps, levels, r = entry["steps"], entry["levels"], entry["ratios"]
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    print(f"\n{name}: prompt {args.prompt_len} tokens, {args.output_len} out, {args.rounds} requests per client, "
          f"prefill chunk {args.prefill_chunk}")
    print("| clients | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | engine step at "
          "that batch ms |" + (" llama-server tok/s |" if "llama_server" in entry else ""))
    print("|---|---|---|---|---|---|" + ("---|" if "llama_server" in entry else ""))
    for c, v in levels.items():
        row = (f"| {c} | {v['tokens_per_s']:.1f} | {ms(v['ttft_p50'])} / {ms(v['ttft_p90'])} / {ms(v['ttft_p99'])} | "
               f"{ms(v['tpot_p50'])} / {ms(v['tpot_p90'])} / {ms(v['tpot_p99'])} | {ms(v['itl_p50'])} / "
               f"{ms(v['itl_p90'])} / {ms(v['itl_p99'])} | {ms(steps['decode_s'][c])} |")
        if "llama_server" in entry:
            row += f" {entry['llama_server']['levels'][c]['tokens_per_s']:.1f} |"
        print(row)
    m = entry["long_prompt_mid_run"]
    print(f"engine alone: prefill {ms(steps['prefill_s'])} ms, decode step at batch 1 {ms(steps['decode_s'][1])} ms; "
          f"8 clients with a {args.long_prompt}-token prompt mid-run: ITL p50 {ms(m['itl_p50'])} ms, p99 {ms(m['itl_p99'])} ms "
          f"(the long prompt's TTFT {ms(m['long_prompt_ttft'])} ms)")
    targets = {"tokens_per_s_8_vs_1": ">= 2.0", "tpot_1_vs_decode_step": "<= 1.10", "ttft_1_vs_prefill": "<= 1.15",
               "itl_p99_vs_p50_with_a_long_prompt": "<= 2.0"}
    for k, v in r.items():
        print(f"  {k}: {v:.2f}x" + (f" (target {targets[k]})" if k in targets else "") if v is not None else f"  {k}: -")


if __name__ == "__main__":
    main()
