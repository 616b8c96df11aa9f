"""`dscompile bench` (bench/; bench/hf_systems.py for the systems that wrap
transformers): the floor arithmetic, the report's structure on a tiny checkpoint (1 repeat, tiny
contexts), bad options through the CLI's entry point (in this process: `run_here`; `bench --json` runs as
the real process in test_cli_json_reports_load), and the product without transformers' code.

Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dscompile.bench.run import BenchOptions, parse_engines, parse_ints, plot, run_bench, table_lines, to_json
from dscompile.bench.floors import decode_floor, experts_read, step_weight_params
from dscompile.bench.memory import LoadMeasureError, measure_load
from dscompile.bench.report import _load_lines
from dscompile.bench.systems import OURS_DECODE_STEPS, against_for_llama, llama_bench_rows
from dscompile.bench.timing import MachineProbe, compare_alternately, context_scaling, time_ms
from dscompile.model.checkpoint import build_model
from dscompile.model.synthetic import make_checkpoint, tiny_args
from dscompile.errors import OptionError
from dscompile.runtime.contract import random_step_inputs
from helpers import run_here

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_decode_floor_by_hand():
    """tiny v2-lite, 2 layers (the first dense): every parameter a decode token reads, counted by hand."""
    a = tiny_args("v2-lite", layers=2)  # D 64, H 4, C 32, R 8, N 16, V 16, E 8, K 2, 2 shared of I 32, dense I 128
    attention = (64 * 4 * (16 + 8)      # q_proj (q_lora_rank None)
                 + 64 * (32 + 8) + 32   # kv_a_proj_with_mqa, kv_a_layernorm
                 + 32 * 4 * (16 + 16)   # kv_b_proj
                 + 4 * 16 * 64          # o_proj
                 + 2 * 64)              # the block's two RMSNorms
    assert attention == 17056
    expert = 3 * 64 * 32
    parts = step_weight_params(a, 1)
    assert parts == {"attention": 2 * 17056, "dense_mlp": 3 * 64 * 128, "router": 8 * 64,
                     "shared_experts": 2 * expert, "routed_experts": 2 * expert, "lm_head": 256 * 64 + 64,
                     "embeddings": 64}
    params = 34112 + 24576 + 512 + 12288 + 12288 + 16448 + 64
    floor = decode_floor(a, batch=1, context=10, elt=4, bandwidth=1e9)
    assert floor["weight_bytes"] == params * 4 == 401152
    assert floor["cache_bytes"] == 10 * 2 * (32 + 8) * 4 == 3200
    assert floor["ms"] == pytest.approx(1e3 * (401152 + 3200) / 1e9)
    # batch 2: the expected distinct experts of two uniform top-2-of-8 choices, cache twice
    assert experts_read(a, 2) == pytest.approx(8 * (1 - (6 / 8) ** 2)) == 3.5
    assert decode_floor(a, 2, 10, 4, 1e9)["cache_bytes"] == 6400


def test_quantized_decode_floor_by_hand():
    """A quantized engine's floor: quantized parts at its bits per weight (scales included), the router
    and the embedding row in float32, kv_b_proj read as float32 absorbed W_UK/W_UV, the cache at 4 bytes."""
    a = tiny_args("v2-lite", layers=2)
    parts = step_weight_params(a, 1)
    bpw = 5.0  # int4, block 32
    absorbed = 2 * 32 * 4 * (16 + 16)  # layers x kv_lora_rank x heads x (nope + v)
    quantized = sum(parts.values()) - parts["router"] - parts["embeddings"] - absorbed
    want = quantized * bpw / 8 + (parts["router"] + parts["embeddings"] + absorbed) * 4
    floor = decode_floor(a, batch=1, context=10, elt=4, bandwidth=1e9, bits_per_weight=bpw)
    assert floor["weight_bytes"] == pytest.approx(want)
    assert floor["cache_bytes"] == 10 * 2 * (32 + 8) * 4
    assert floor["weight_bytes"] < 0.25 * decode_floor(a, 1, 10, 4, 1e9)["weight_bytes"] + absorbed * 4


def test_llama_bench_rows_from_its_json(tmp_path):
    """How llama-bench's JSON becomes bench rows: a prefill and a decode call per round (one sample of each
    test), decode per token, prefill per prompt; with `against`, ours after each round (warmed by one
    untimed step, decode averaged over OURS_DECODE_STEPS) and the ratio per round. (The process is replaced by a function returning JSON in llama-bench's format;
    llama.cpp itself is measured by the opt-in test below.)"""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    calls, order = [], []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        order.append("llama")
        depths = [int(d) for d in cmd[cmd.index("-d") + 1].split(",")] if "-d" in cmd else [0]
        n_gen, n_prompt = int(cmd[cmd.index("-n") + 1]), int(cmd[cmd.index("-p") + 1])
        tokens = n_gen or n_prompt
        i = sum(1 for c in calls if c[-1] == cmd[-1]) - 1  # this call's round
        out = [{"n_prompt": n_prompt, "n_gen": n_gen, "n_depth": d,
                "samples_ns": [tokens * (20e6 + d * 1e3) + i * 1e6]} for d in depths]
        return subprocess.CompletedProcess(cmd, 0, json.dumps(out), "")

    class Ours:
        name = "int4"

        def prefill(self, batch, tokens):
            return lambda: order.append(("ours", "prefill"))

        def decode(self, batch, context):
            return lambda: order.append(("ours", context))

    opts = BenchOptions(contexts=[128, 1024], repeats=3, warmup=0, threads=2)
    rows, pairs, why = llama_bench_rows("q4_0", Path("/bin/llama-bench"), gguf, opts, lambda: 2.5e10, run=fake_run,
                                        against=Ours())
    assert why is None and [(r["phase"], r["context"]) for r in rows] == [("prefill", 0), ("decode", 128), ("decode", 1024)]
    assert rows[1]["ms"] == pytest.approx(20.128 + 1 / 32, rel=1e-6)  # median sample over 32 tokens, in ms
    assert rows[0]["ms"] == pytest.approx(128 * 20.0 + 1)
    assert all("-t" in c and c[c.index("-t") + 1] == "2" and c[c.index("-r") + 1] == "1" for c in calls)
    assert len(calls) == 6  # 3 rounds x (prefill, decode at both depths)
    # taken in turns; ours: one untimed step, then one prefill or the mean of OURS_DECODE_STEPS decode steps
    n = OURS_DECODE_STEPS
    one_round = ["llama", "llama", *[("ours", "prefill")] * 2, *[("ours", 128)] * (n + 1), *[("ours", 1024)] * (n + 1)]
    assert order == one_round * 3
    assert [(p["reference"], p["system"], p["phase"], p["context"]) for p in pairs] == [
        ("q4_0", "int4", "prefill", 0), ("q4_0", "int4", "decode", 128), ("q4_0", "int4", "decode", 1024)]
    assert all(len(p["runs_ms"]) == 3 and p["time_ratio"] > 0 for p in pairs)

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "error: unknown model architecture")

    rows, pairs, why = llama_bench_rows("q4_0", Path("/bin/llama-bench"), gguf, opts, lambda: 2.5e10, run=failing)
    assert rows == [] and pairs == [] and "unknown model architecture" in why


def test_llama_gguf_runs_against_our_engine_nearest_in_bits(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 4700)  # 4.7 bits per parameter over 8000 parameters, as q4_0
    bits = {"ours": 32.0, "int8": 9.0, "int4": 5.0}
    assert against_for_llama("q4_0", gguf, bits, 8000, None) == "int4"
    gguf.write_bytes(b"\0" * 8500)
    assert against_for_llama("q8_0", gguf, bits, 8000, None) == "int8"
    gguf.write_bytes(b"\0" * 32000)
    assert against_for_llama("f32", gguf, bits, 8000, None) == "ours"
    assert against_for_llama("f32", gguf, {}, 8000, None) is None


def test_llama_gguf_runs_against_the_system_its_item_names(tmp_path):
    # NAME=LLAMA_BENCH:GGUF@SYSTEM: one GGUF beside two engines of equal bits (e.g. with and without
    # --native-kernels); a name that is not one of our measured systems is refused before anything runs
    from dscompile.bench.run import llama_cpp_against, parse_llama_cpp
    from dscompile.errors import OptionError

    binary, gguf = tmp_path / "llama-bench", tmp_path / "m.gguf"
    binary.write_text(""), gguf.write_bytes(b"\0" * 4700)
    items = [f"q4_0={binary}:{gguf}@int4n", f"q4_0b={binary}:{gguf}"]
    assert parse_llama_cpp(items) == {"q4_0": (binary, gguf), "q4_0b": (binary, gguf)}
    assert llama_cpp_against(items) == {"q4_0": "int4n"}
    assert against_for_llama("q4_0", gguf, {"int4": 5.0, "int4n": 5.0}, 8000, "int4n") == "int4n"
    opts = dict(systems=["ours"], extra_engines={"int4n": tmp_path}, llama_cpp=parse_llama_cpp(items))
    BenchOptions(llama_against={"q4_0": "int4n"}, **opts).check()
    with pytest.raises(OptionError, match=r"--llama-cpp q4_0=\.\.\.@int5: int5 is not one of our systems measured "
                                          r"here \(ours, int4n\)"):
        BenchOptions(llama_against={"q4_0": "int5"}, **opts).check()


LLAMA_BENCH, LLAMA_GGUF = os.environ.get("DSCOMPILE_LLAMA_BENCH"), os.environ.get("DSCOMPILE_LLAMA_GGUF")


@pytest.mark.skipif(not (LLAMA_BENCH and LLAMA_GGUF),
                    reason="opt-in: set DSCOMPILE_LLAMA_BENCH (a llama-bench binary) and DSCOMPILE_LLAMA_GGUF "
                    "(a GGUF of the bench model, benchmarks/llamacpp_convert.py)")
def test_llama_bench_for_real_beside_ours(report):
    """The real llama-bench on a real GGUF, taken in turns with an engine of ours (the tiny one of `report`: the
    bench config's export takes minutes); ~1 min for a q4_0 bench GGUF on 2 cores."""
    from dscompile.bench.systems import EngineSystem
    from dscompile.model.args import ModelArgs
    from dscompile.runtime.ort_engine import OrtEngine

    result, root = report
    ours = EngineSystem("ours", OrtEngine.load(result["engines"]["ours"]["dir"], provider="cpu", threads=2),
                        ModelArgs.from_json(root / "ckpt" / "config.json"))
    opts = BenchOptions(contexts=[16], repeats=2, warmup=0, prefill_tokens=16, threads=2)
    rows, pairs, why = llama_bench_rows("llama", Path(LLAMA_BENCH), Path(LLAMA_GGUF), opts, lambda: 2.5e10,
                                        against=ours)
    assert why is None, why
    assert [(r["phase"], r["context"]) for r in rows] == [("prefill", 0), ("decode", 16)]
    assert all(len(r["runs_ms"]) == 2 and min(r["runs_ms"]) > 0 for r in rows)
    assert [(p["phase"], p["context"]) for p in pairs] == [("prefill", 0), ("decode", 16)]
    assert all(p["time_ratio"] > 0 for p in pairs)


def test_floor_matches_the_model_parameters():
    """Batch 1 reads every parameter except the embedding table (one row) and the E-K idle experts."""
    a = tiny_args("v2-lite", layers=3)
    model = build_model(a, torch.float32, "meta")
    total = sum(p.numel() for p in model.parameters())
    idle = a.num_moe_layers * (a.n_routed_experts - a.num_experts_per_tok) * 3 * a.hidden_size * a.moe_intermediate_size
    want = total - (a.vocab_size - 1) * a.hidden_size - idle
    assert sum(step_weight_params(a, 1).values()) == want


def test_time_ms_reads_the_machine_before_each_timed_run():
    events = []
    readings = iter([30e9, 50e9, 40e9])
    times, bandwidths = time_ms(lambda: events.append("run"), repeats=3, warmup=2,
                                probe=lambda: events.append("probe") or next(readings))
    assert events == ["run", "run"] + ["probe", "run"] * 3  # warm-up runs are not probed
    assert bandwidths == [30e9, 50e9, 40e9] and len(times) == 3 and min(times) >= 0
    assert time_ms(lambda: None, repeats=2, warmup=0)[1] == []


def test_context_scaling_alternates_the_two_contexts():
    calls = []

    class Fake:
        def decode(self, batch, context):
            return None if context == 99 else lambda: calls.append((batch, context))

    scaling = context_scaling(Fake(), 8, 64, repeats=3, warmup=1)
    assert calls == [(1, 8), (1, 64)] * 4  # one warm-up pair, then three timed pairs
    assert scaling["contexts"] == [8, 64] and len(scaling["runs_ms"]) == 3 and scaling["ratio"] > 0
    assert context_scaling(Fake(), 8, 99, 3, 1) is None and context_scaling(Fake(), 8, 8, 3, 1) is None


def test_compare_alternately_takes_turns_and_skips_what_cannot_run():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def prefill(self, batch, tokens):
            return lambda: calls.append((self.name, "prefill"))

        def decode(self, batch, context):
            if self.name == "ref" and batch > 1:
                return None
            return lambda: calls.append((self.name, context))

    rows = compare_alternately(Fake("ours"), Fake("ref"), [("prefill", 1, 0), ("decode", 1, 5), ("decode", 2, 5)],
                               prefill_tokens=4, repeats=2, warmup=1)
    assert [(r["phase"], r["batch"]) for r in rows] == [("prefill", 1), ("decode", 1)]
    assert calls == [("ours", "prefill"), ("ref", "prefill")] * 3 + [("ours", 5), ("ref", 5)] * 3
    assert rows[0]["system"] == "ours" and rows[0]["reference"] == "ref" and len(rows[0]["runs_ms"]) == 2


def test_machine_probe_reads_its_buffers():
    probe = MachineProbe(1 << 22, gemm_size=64)
    assert probe.buffer.numel() * 4 == 1 << 22 and probe.a.shape == (64, 64)
    assert 1e8 < probe.bandwidth() < 1e13 and 1e8 < probe.median(probe.bandwidth, 3) < 1e13  # 0.1 GB/s .. 10 TB/s
    assert 1e6 < probe.gemm() < 1e14 and 1e6 < probe.median(probe.gemm, 3) < 1e14


def test_parse_ints():
    assert parse_ints("4096,128, 1024", "--contexts") == [128, 1024, 4096]
    with pytest.raises(OptionError, match="--contexts"):
        parse_ints("128,x", "--contexts")
    with pytest.raises(OptionError, match="--batch"):
        parse_ints("0", "--batch")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint(root / "ckpt", "v2-lite", layers=2)
    options = BenchOptions(contexts=[3, 6], batches=[1, 2], repeats=1, warmup=0, prefill_tokens=4,
                           systems=["eager", "hf", "ours"], bandwidth_bytes=1 << 22, gemm_size=128)
    return run_bench(ckpt, root / "home", options), root


def test_report_structure(report):
    result, root = report
    assert json.loads(to_json(result))["systems"] == ["eager", "hf", "ours"]
    rows = result["results"]
    for system in ("eager", "hf", "ours"):
        mine = [(r["phase"], r["batch"], r["context"]) for r in rows if r["system"] == system]
        assert mine == [("prefill", 1, 0), ("decode", 1, 3), ("decode", 1, 6), ("decode", 2, 3), ("decode", 2, 6)]
    for r in rows:
        assert r["ms"] > 0 and len(r["runs_ms"]) == 1 and r["floor_ms"] > 0
        # one bandwidth reading per timed run (and a GEMM reading per prefill run); each run is held
        # against its own readings
        assert len(r["runs_bandwidth"]) == 1 and r["bandwidth"] == r["runs_bandwidth"][0] > 0
        assert len(r["runs_gemm_flops"]) == (r["phase"] == "prefill")
        assert r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["runs_ms"][0], rel=1e-3)
        assert r["speedup_vs_hf"] is not None and r["speedup_vs_hf_onnx"] is None
    for system in ("eager", "hf", "ours"):
        scaling = result["context_scaling"][system]
        assert scaling["contexts"] == [3, 6] and len(scaling["runs_ms"]) == 1
        assert scaling["ratio"] == pytest.approx(scaling["runs_ms"][0][1] / scaling["runs_ms"][0][0], rel=1e-2)
    # ours and transformers run alternately for every ratio a target compares
    alternating = [(r["reference"], r["phase"], r["batch"], r["context"]) for r in result["alternating"]]
    assert alternating == [("hf", "prefill", 1, 0), ("hf", "decode", 1, 3), ("hf", "decode", 1, 6),
                           ("hf", "decode", 2, 3)]
    for r in result["alternating"]:
        assert len(r["runs_ms"]) == 1 and r["time_ratio"] == pytest.approx(r["runs_ms"][0][0] / r["runs_ms"][0][1],
                                                                           rel=1e-2)
    prefill = next(t for t in result["targets"] if t["target"].startswith("prefill"))
    assert prefill["value"] == result["alternating"][0]["time_ratio"] and prefill["table"] > 0
    cache = result["cache"]
    assert cache["ours_bytes_per_token"] == 2 * (32 + 8) * 4
    assert cache["mha_equivalent_bytes_per_token"] == 2 * 4 * (16 + 8 + 16) * 4
    assert cache["transformers_bytes_per_token"] > 0
    assert result["bandwidth"]["bytes_per_s"] > 0 and result["engines"]["ours"]["options"]["fuse_moe"] is True
    names = {t["target"] for t in result["targets"]}
    assert any(n.startswith("prefill") for n in names)  # the only target a tiny context set can evaluate


def test_report_has_each_systems_load_time_and_memory(report):
    result, root = report
    load = json.loads(to_json(result))["load"]
    assert list(load) == ["eager", "hf", "ours"]
    for name, e in load.items():
        assert e["load_s"] > 0 and e["rss_growth"] == e["rss_after"] - e["rss_before"] > 0, name
        assert e["rss_peak"] >= e["rss_after"], name
    assert "OrtEngine.load" in load["ours"]["loader"] and "from_pretrained" in load["hf"]["loader"]
    manifest = json.loads((Path(result["engines"]["ours"]["dir"]) / "manifest.json").read_text())
    ours = load["ours"]
    assert ours["weights_bytes"] == manifest["weights"]["bytes"] > 0
    assert ours["parameter_bytes"] == manifest["weights"]["parameter_bytes"] > 0
    assert ours["resident_growth"] == ours["pss_after_step"] - ours["pss_before"] > 0
    assert ours["growth_over_weights"] == pytest.approx(ours["resident_growth"] / ours["weights_bytes"])
    assert "weights_bytes" not in load["hf"] and "weights_bytes" not in load["eager"]


def test_measure_load_runs_the_loader_in_a_fresh_interpreter(report):
    """Our tiny engine loaded in a child process: it starts from a bare interpreter (not this
    process's pages, as a fork would), and the load adds memory and takes time."""
    result, root = report
    m = measure_load(("ours", result["engines"]["ours"]["dir"], 1))
    assert m["load_s"] > 0 and m["import_s"] > 0
    assert 0 < m["rss_start"] < 100e6 < m["rss_before"]  # onnxruntime and torch imported before the load
    assert m["rss_after"] > m["rss_before"] and m["rss_peak"] >= m["rss_after"]
    assert 0 < m["rss_anon_after"] + m["rss_file_after"] <= m["rss_after"]
    # the first step reads the mapped weights: they count then, once (PSS), not at load
    assert m["pss_after_step"] >= m["pss_after"] > m["pss_before"] > 0 and m["rss_after_step"] >= m["rss_after"]
    with pytest.raises(LoadMeasureError, match="manifest") as err:
        measure_load(("ours", str(root), 1))  # not an engine folder: the child's EngineError, one line
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="loader"):
        measure_load(("vllm", str(root)))


def test_cli_json_reports_load(report):
    """`dscompile bench --json` carries the load measurement (our engine from the fixture's cache)."""
    result, root = report
    env = {**os.environ, "DSCOMPILE_HOME": str(root / "home")}
    proc = subprocess.run([sys.executable, "-m", "dscompile", "bench", result["checkpoint"], "--systems", "ours",
                           "--contexts", "2", "--batch", "1", "--repeats", "1", "--warmup", "0",
                           "--prefill-tokens", "2", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["engines"]["ours"]["dir"] == result["engines"]["ours"]["dir"]  # reused, not exported again
    assert list(out["load"]) == ["ours"] and out["load"]["ours"]["rss_growth"] > 0


def test_table_and_plot(report):
    result, root = report
    lines = table_lines(result)
    assert lines[2].split()[:4] == ["system", "phase", "B", "P"]
    assert sum(1 for ln in lines if ln.startswith(("eager ", "hf ", "ours "))) == len(result["results"])
    assert any(ln.startswith("cache bytes/token: ours 320") for ln in lines)
    load = {ln.split()[1]: ln for ln in lines if ln.startswith("load    ") and ln.split()[1] in result["load"]}
    assert list(load) == ["eager", "hf", "ours"]
    ours = result["load"]["ours"]
    assert f"RSS +{ours['rss_growth'] / 1e6:.0f} MB -> {ours['rss_after'] / 1e6:.0f} MB" in load["ours"]
    assert f"growth/weights {ours['growth_over_weights']:.2f}x" in load["ours"]
    assert "weights file" not in load["hf"]
    failed = _load_lines({"ours": {"loader": "OrtEngine.load", "error": "ours: the loading process failed: boom",
                                   "weights_bytes": 10, "growth_over_weights": None}})
    assert failed[1] == f"load    {'ours':18s} failed: ours: the loading process failed: boom"
    png = root / "decode.png"
    plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_export_is_cached(report, tmp_path):
    """A second run reuses the exported engine folder (same checkpoint, options, sources); an engine
    folder given by name is measured beside it."""
    result, root = report
    engine = Path(result["engines"]["ours"]["dir"])
    stamp = (engine / "manifest.json").stat().st_mtime_ns
    again = run_bench(Path(result["checkpoint"]), root / "home",
                      BenchOptions(contexts=[2], batches=[1], repeats=1, warmup=0, prefill_tokens=2,
                                   systems=["ours"], bandwidth_bytes=1 << 20, gemm_size=64,
                                   extra_engines=parse_engines([f"mine={engine}"])))
    assert again["engines"]["ours"]["dir"] == str(engine)
    assert (engine / "manifest.json").stat().st_mtime_ns == stamp
    assert again["systems"] == ["ours", "mine"]
    assert [r["system"] for r in again["results"]] == ["ours", "ours", "mine", "mine"]
    # ...and run alternately against ours for the ratio (here the same engine: a ratio near 1)
    rows = [(a["system"], a["reference"]) for a in again["alternating"]]
    assert rows and set(rows) == {("mine", "ours")}, again["alternating"]
    with pytest.raises(OptionError, match="--engine"):
        parse_engines([f"ours={engine}"])  # a built-in system's name
    with pytest.raises(OptionError, match="--engine"):
        parse_engines([f"x={tmp_path}"])  # no manifest.json


def test_without_transformers_ours_is_measured_and_hf_skipped(report, monkeypatch):
    result, root = report
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    again = run_bench(Path(result["checkpoint"]), root / "home",
                      BenchOptions(contexts=[2, 4], batches=[1], repeats=1, warmup=0, prefill_tokens=2,
                                   systems=["hf", "ours"], bandwidth_bytes=1 << 20, gemm_size=64))
    assert "transformers is not installed" in again["skipped"]["hf"]
    assert list(again["load"]) == ["ours"]
    assert {r["system"] for r in again["results"]} == {"ours"} and again["alternating"] == []
    assert list(again["context_scaling"]) == ["ours"]


@pytest.mark.parametrize("argv, option", [
    (["--contexts", "128,abc"], "--contexts"),
    (["--batch", "0"], "--batch"),
    (["--systems", "ours,vllm"], "--systems"),
])
def test_bad_options_exit_2_with_one_line(argv, option, tmp_path):
    proc = run_here("bench", *argv, env={"DSCOMPILE_HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())  # refused before generating or exporting anything


def test_real_valued_rope_gives_transformers_logits_and_restores_it(tmp_path):
    """The rewrite the hf-onnx attempts need (the exporters reject complex tensors; the transformers
    frontend's) computes what transformers' complex RoPE computes, and leaves the model as it was."""
    pytest.importorskip("transformers", reason="transformers is the external reference (test dependency)")
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as v2

    from dscompile.bench import hf_systems
    from dscompile.capture.frontends.transformers_patches import real_valued_rope
    from dscompile.model.args import ModelArgs

    ckpt = make_checkpoint(tmp_path / "ckpt", "v2-lite", layers=2)
    hf = hf_systems.HFSystem(ckpt, ModelArgs.from_json(ckpt / "config.json"))
    ids, pos, mask = random_step_inputs(hf.args.vocab_size, 2, 5, 0, 3)
    pos = pos + 11  # not position 0, where every rotation is the identity
    run = lambda: hf.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits  # noqa: E731
    original = v2.apply_rotary_emb
    with torch.no_grad():
        want = run()
        with real_valued_rope(hf.model) as rewritten:
            assert rewritten and v2.apply_rotary_emb is not original
            assert not hf.model.model.rotary_emb(want, pos).is_complex()
            got = run()
        assert v2.apply_rotary_emb is original and hf.model.model.rotary_emb(want, pos).is_complex()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - want).abs().max() < (want - run().roll(1, dims=1)).abs().max()  # the check can fail


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DSCOMPILE_SLOW"),
                    reason="exports transformers' own model to ONNX (~75 s): set DSCOMPILE_SLOW=1 to run it")
def test_hf_onnx_exports_and_is_measured_where_its_graph_allows(tmp_path):
    """transformers' own export of a V2 checkpoint: after the complex-RoPE attempts fail, the
    rewritten model exports with its cache, matches transformers in ONNX Runtime, and is timed
    for the decode rows its graph takes (batch fixed to 1 by the exporter); the rest is listed."""
    pytest.importorskip("transformers", reason="transformers is the external reference (test dependency)")
    ckpt = make_checkpoint(tmp_path / "ckpt", "v2-lite", layers=2)
    options = BenchOptions(contexts=[3], batches=[1, 2], repeats=1, warmup=0, prefill_tokens=4,
                           systems=["hf", "hf-onnx"], bandwidth_bytes=1 << 20, gemm_size=64)
    result = run_bench(ckpt, tmp_path / "home", options)
    export = result["hf_onnx_export"]
    assert [a["ok"] for a in export["attempts"]][:2] == [False, False]  # complex RoPE: both exporters refuse
    assert "complex" in export["attempts"][0]["error"] and export["attempts"][-1]["ok"]
    assert export["with_cache"] and export["rope_rewrite_max_abs_diff"] < 1e-4
    assert export["ort_max_abs_diff"] < 1e-4
    assert export["implementations"] == {"attention": "eager", "experts": "batched_mm"}
    mine = [(r["phase"], r["batch"], r["context"]) for r in result["results"] if r["system"] == "hf-onnx"]
    assert mine == [("decode", 1, 3)]
    assert "prefill of 4 tokens" in result["skipped"]["hf-onnx"] and "decode B=2" in result["skipped"]["hf-onnx"]
    row = next(r for r in result["results"] if r["system"] == "hf" and r["phase"] == "decode" and r["batch"] == 1)
    assert row["speedup_vs_hf_onnx"] > 0
    assert any(ln.startswith("hf-onnx graph: RoPE rewritten") for ln in table_lines(result))
    assert result["load"]["hf-onnx"]["load_s"] > 0 and "not included" in result["load"]["hf-onnx"]["loader"]


# ---------------------------------------------------------------- transformers stays an optional dependency


def test_hf_systems_and_their_loaders_are_the_packages():
    """The systems that wrap transformers are installed with the package (bench/), their loaders beside ours."""
    from dscompile.bench import hf_loaders, hf_systems
    from dscompile.bench.memory import LOADERS

    assert Path(hf_systems.__file__).resolve() == ROOT / "bench" / "hf_systems.py"
    assert hf_systems.HFSystem.name == "hf" and hf_systems.HFOnnxSystem.name == "hf-onnx"
    assert {"hf", "hf-onnx"} <= set(LOADERS) and LOADERS["hf"] == hf_loaders.LOADERS["hf"]


def test_without_transformers_hf_systems_are_skipped_with_one_line_and_ours_measured(report, monkeypatch):
    """Where transformers is not installed, hf and hf-onnx are skipped with one line naming the extra, ours still runs."""
    result, root = report
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    again = run_bench(Path(result["checkpoint"]), root / "home",
                      BenchOptions(contexts=[2, 4], batches=[1], repeats=1, warmup=0, prefill_tokens=2,
                                   systems=["hf", "hf-onnx", "ours"], bandwidth_bytes=1 << 20, gemm_size=64))
    why = again["skipped"]["hf"]
    assert 'pip install "dscompile[transformers]"' in why and "\n" not in why
    assert again["skipped"] == {"hf": why, "hf-onnx": why}
    assert [(r["system"], r["phase"]) for r in again["results"]] == [("ours", "prefill"), ("ours", "decode"),
                                                                     ("ours", "decode")]
    assert list(again["load"]) == ["ours"] and again["alternating"] == [] and "hf_onnx_export" not in again
    assert list(again["context_scaling"]) == ["ours"] and again["cache"]["transformers_bytes_per_token"] is None
    lines = table_lines(again)
    assert f"skipped hf: {why}" in lines and f"skipped hf-onnx: {why}" in lines


PRODUCT = ("dscompile", "model", "capture", "passes", "lowering", "exporter", "verify", "runtime", "cli", "bench")  # the folders the package installs


def transformers_uses(source: str) -> list[int]:
    """Lines of `source` that import transformers or use a name `transformers` (lazy imports in functions count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [] if node.level else [node.module or ""]
        elif isinstance(node, ast.Name):
            names = [node.id]
        else:
            continue
        if any(n == "transformers" or n.startswith("transformers.") for n in names):
            found.append(node.lineno)
    return sorted(set(found))


# The places the product drives transformers, each behind the optional `transformers` extra (pip install
# "dscompile[transformers]") and importing it inside its functions only: the frontend that captures
# transformers' own model, and the bench's systems that run transformers' model and its ONNX export
# (with their loaders for the fresh-process memory measurement), which the bench reports skipped without it.
TRANSFORMERS_FRONTEND = Path("capture") / "frontends"
TRANSFORMERS_BENCH = (Path("bench") / "hf_systems.py", Path("bench") / "hf_loaders.py")


def test_the_product_does_not_import_transformers():
    """transformers is optional: no module the package installs imports or drives it, except the
    transformers frontend and the bench's transformers systems."""
    found = [f"{path.relative_to(ROOT)}:{line}" for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))
             if TRANSFORMERS_FRONTEND not in path.relative_to(ROOT).parents
             and path.relative_to(ROOT) not in TRANSFORMERS_BENCH
             for line in transformers_uses(path.read_text())]
    assert not found, "the product imports transformers:\n" + "\n".join(found)


def test_the_transformers_check_sees_each_form():
    source = ("import transformers\n"
              "from transformers import DynamicCache\n"
              "def f():\n    import transformers.models.deepseek_v2 as v2\n"
              "x = sys.modules['transformers'] and transformers.__version__\n"
              "import transformers_stream_generator, dscompile.transformers\n"
              "from .transformers import y\n"
              "why = 'transformers is not installed'\n")
    assert transformers_uses(source) == [1, 2, 4, 5]


def test_profile_per_op_type_of_a_tiny_engine(report):
    """--profile: ONNX Runtime's profiler summed per op type over the profiled steps, beside the bytes of the
    weights each op type reads (a MatMul over a weight: its whole initializer; the embedding Gather: one row)."""
    from dscompile.bench.profile import profile_engine, profile_lines, weight_bytes_per_op_type
    from dscompile.bench.systems import EngineSystem
    from dscompile.model.args import ModelArgs

    result, root = report
    args = ModelArgs.from_json(root / "ckpt" / "config.json")
    folder = Path(result["engines"]["ours"]["dir"])
    manifest = json.loads((folder / "manifest.json").read_text())
    graph = folder / manifest["graphs"]["decode"]["in_place"]["file"]
    prof = profile_engine(folder, 2, lambda e: EngineSystem("ours", e, args).decode(1, 5), graph, 1, 2.0,
                          args.n_routed_experts, lambda: 1e10, steps=3, warmup=1)
    ops = {o["op"]: o for o in prof["ops"]}
    assert prof["step_ms"] > 0 and 0 < prof["kernels_ms"] and prof["steps"] == 3
    assert "MatMul" in ops and ops["MatMul"]["ms"] > 0 and ops["MatMul"]["nodes"] >= 1
    reads = weight_bytes_per_op_type(graph, 1, 2.0, args.n_routed_experts)
    assert ops["MatMul"]["bytes"] == reads["MatMul"] > 0
    assert ops["MatMul"]["floor_ms"] == pytest.approx(1e3 * reads["MatMul"] / 1e10)
    assert reads.get("Gather", 0) < args.vocab_size * args.hidden_size * 4  # one embedding row, not the table
    assert prof["bytes"] == pytest.approx(sum(reads.values()))
    lines = profile_lines("ours", "decode P=5", prof)
    assert lines[0].startswith("profile ours decode P=5") and any("MatMul" in line for line in lines[1:])
