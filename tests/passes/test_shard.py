"""Sharded engines: passes/shard.py, export --tp/--ep, and runtime/sharded.py on gloo (CPU processes).

One v2 checkpoint (a dense layer and an MoE layer; group-limited routing, shared experts) is
exported for tp 2 x ep 2 (4 ranks: heads, dense MLP, shared experts and each expert's
intermediate size split, routed experts over 2 EP indices) and checked against eager. The other
variants and plans, against the single-process engine, run in the opt-in matrix (DSCOMPILE_SLOW=1).
Also: a rank per GPU or the CPU (GPU counts faked), and a 2-rank engine left idle past a short
collective timeout (DSCOMPILE_COLLECTIVE_TIMEOUT_S) steps again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest
import torch

from helpers import assert_close, run_here
from dscompile.errors import EngineError
from dscompile.capture import Limits
from dscompile.runtime.contract import position_ids

LIMITS = Limits(max_batch=2, max_prompt_tokens=16, max_context=32)
FLAGS = ["--max-batch", "2", "--max-prompt-tokens", "16", "--max-context", "32"]


@pytest.fixture(scope="module")
def v2_ckpt(make_ckpt):
    return make_ckpt("v2", layers=2)


@pytest.fixture(scope="module")
def sharded_out(tmp_path_factory, v2_ckpt):
    """The v2 checkpoint exported for tp 2 x ep 2."""
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions

    out = tmp_path_factory.mktemp("sharded") / "tp2ep2"
    export_checkpoint(v2_ckpt, out, ExportOptions.within(LIMITS, tp=2, ep=2))
    return out


def _prompt():
    """Batch 2, the first row left-padded by one token."""
    ids = torch.tensor([[0, 5, 6, 7, 8], [1, 2, 3, 4, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = position_ids(mask)
    return ids, pos, mask


def _steps(engine, ids, pos, mask, tokens: list[torch.Tensor] | None = None, steps: int = 8):
    """Prefill + `steps` greedy decode steps (or the given tokens): logits of each step, tokens, cache."""
    logits, cache = engine.step(ids, pos, mask, None)
    out, chosen = [logits], []
    for i in range(steps):
        tok = tokens[i] if tokens is not None else logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(tok)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
        logits, cache = engine.step(tok, pos, mask, cache)
        out.append(logits)
    return out, chosen, cache


def test_sharded_engine_gives_eager_s_tokens_and_logits(sharded_out, v2_ckpt):
    """tp 2 x ep 2 over gloo against single-process eager: the same greedy tokens, logits within the fp32 bound
    at every step (prefill with left padding + 8 decode steps), the same latent cache, the same generations
    (the `run` loop); a killed rank then ends the run with one line. (`dscompile run` on a sharded OUT opens it
    through the same open_engine; against the single-process engine: the DSCOMPILE_SLOW matrix.)"""
    from dscompile.verify.compare import eager_for
    from dscompile.runtime.session import open_engine
    from dscompile.runtime.sharded import ShardedEngine

    single = eager_for(v2_ckpt)
    sharded = open_engine(sharded_out, backend="torch")
    assert isinstance(sharded, ShardedEngine) and len(sharded._workers) == 3
    try:
        want, tokens, want_cache = _steps(single, *_prompt())
        got, got_tokens, got_cache = _steps(sharded, *_prompt())
        assert [t.tolist() for t in got_tokens] == [t.tolist() for t in tokens]
        real = _prompt()[2].bool()  # the logits of padding mean nothing
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g[real] if i == 0 else g, w[real] if i == 0 else w, what=f"step {i}")
        seen = torch.ones(2, want_cache.length, dtype=torch.bool)
        seen[0, 0] = False
        for (gk, gr), (wk, wr) in zip(got_cache.layers, want_cache.layers):
            assert_close(gk[seen], wk[seen], what="kv_latent")
            assert_close(gr[seen], wr[seen], what="k_rope")
        # Rank 0 generates (greedy, and sampled: only rank 0 samples) as the single-process engine does.
        prompts = [[1, 2, 3, 4], [7, 8]]
        assert sharded.generate(prompts, 6) == single.generate(prompts, 6)
        assert sharded.generate(prompts, 6, temperature=0.8, seed=3) == single.generate(prompts, 6, temperature=0.8,
                                                                                      seed=3)
        # A rank killed between steps: the next step fails at once, naming it.
        sharded._workers[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineError) as err:
            for _ in range(3):
                sharded.step(*_prompt(), None)
        assert time.monotonic() - start < 30
        assert str(err.value) == "rank 2 was killed (signal 9)"
    finally:
        sharded.close()
    assert all(p.poll() is not None for p in sharded._workers)


def test_each_rank_holds_its_share_of_the_weights(sharded_out, v2_ckpt):
    """Each rank's file holds 1/N of every split weight plus the replicated ones (within 5%); a rank's slice
    is the checkpoint's rows of that rank."""
    from safetensors.torch import load_file

    from dscompile.runtime.sharded import rank_manifest
    from dscompile.runtime.weights import WeightsFile

    out = sharded_out
    manifest = json.loads((out / "manifest.json").read_text())
    sharding = manifest["sharding"]
    assert (sharding["tp"], sharding["ep"], sharding["world_size"]) == (2, 2, 4)
    assert sharding["groups"] == {"dscompile.tp": [[0, 1], [2, 3]], "dscompile.world": [[0, 1, 2, 3]]}
    assert not any(p.suffix == ".onnx" for p in out.iterdir())  # torch programs only
    want = sharding["weight_bytes"]["per_rank"]
    ckpt = {k: v for f in sorted(v2_ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    single = sum(t.numel() * 4 for t in ckpt.values())  # float32, as exported
    assert sharding["weight_bytes"]["replicated"] + sharding["weight_bytes"]["split"] >= single
    assert want < single
    for rank in range(4):
        mine = rank_manifest(manifest, rank)
        places = mine["graphs"]["prefill"]["program_weights"]
        regions = {(p["offset"], p["bytes"]) for g in mine["graphs"].values() for p in g["program_weights"].values()}
        held = sum(b for _, b in regions)
        assert abs(held - want) <= 0.05 * want, (rank, held, want)
        weights = WeightsFile.open(out, mine)
        name = "model.layers.0.mlp.down_proj.weight"  # dense MLP: row-parallel over the 4 ranks
        full = ckpt[name]
        part = weights.tensor(places[name], torch.float32, (full.shape[0], full.shape[1] // 4), name)
        torch.testing.assert_close(part, full[:, rank * full.shape[1] // 4:(rank + 1) * full.shape[1] // 4],
                                   rtol=0, atol=0)
    assert len({(out / f"weights-rank{r}.bin").read_bytes() for r in range(4)}) == 4
    # inspect --plan sizes the plan from the manifest: 2 attentions over tp, the dense MLP and the MoE over all
    result = run_here("inspect", out, "--plan", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["weight_bytes_per_rank"]["float32"] == want and plan["weight_bytes_per_rank"]["fp8"] * 4 == want
    for phase in ("prefill", "decode"):
        assert plan["traffic"][phase]["all_reduces"] == {"dscompile.tp": 2, "dscompile.world": 2}
        assert plan["traffic"][phase]["bytes_per_token"] == 4 * 64 * 4  # 4 all-reduces of hidden 64 in float32


@pytest.mark.parametrize("variant", ["v2", "v2-lite", "v3"])
def test_moe_shard_summed_over_ranks_is_moe(variant):
    """dsc::moe_shard of every rank's slices (tp 2 x ep 2), summed, is dsc::moe, for each routing method."""
    from dscompile.model.synthetic import tiny_args

    args = tiny_args(variant, experts=8)
    g = torch.Generator().manual_seed(0)
    E, I, D = args.n_routed_experts, args.moe_intermediate_size, args.hidden_size
    Is = args.n_shared_experts * I
    x = torch.randn(2, 5, D, generator=g)
    gate = torch.randn(E, D, generator=g)
    bias = torch.randn(E, generator=g) * 0.1 if args.topk_method == "noaux_tc" else None
    w1, w3 = torch.randn(E, I, D, generator=g) * 0.2, torch.randn(E, I, D, generator=g) * 0.2
    w2 = torch.randn(E, D, I, generator=g) * 0.2
    s1, s3, s2 = torch.randn(Is, D, generator=g) * 0.2, torch.randn(Is, D, generator=g) * 0.2, torch.randn(D, Is, generator=g) * 0.2
    attrs = (args.num_experts_per_tok, args.n_group, args.topk_group, args.topk_method, args.norm_topk_prob,
             args.routed_scaling_factor)
    want = torch.ops.dsc.moe(x, gate, bias, w1, w2, w3, s1, s2, s3, *attrs)
    total = torch.zeros_like(want)
    for rank in range(4):
        e, t = rank // 2, rank % 2
        ex, it, sh = slice(e * E // 2, (e + 1) * E // 2), slice(t * I // 2, (t + 1) * I // 2), slice(rank * Is // 4, (rank + 1) * Is // 4)
        total += torch.ops.dsc.moe_shard(x, gate, bias, w1[ex, it], w2[ex, :, it], w3[ex, it], s1[sh], s2[:, sh],
                                         s3[sh], *attrs, torch.tensor(e * E // 2))
    assert_close(total, want, what=f"{variant} moe_shard summed")
    assert (total - want).abs().max() < (want - torch.ops.dsc.moe(x, gate, bias, w1, w2, w3, None, None, None, *attrs)).abs().max()


def test_bad_sharding_input_is_one_line(tmp_path, sharded_out, v2_ckpt, monkeypatch):
    """Sizes that do not divide, options sharding does not combine with, a sharded OUT on another backend, a
    missing rank file, the wrong number of processes: one line, non-zero exit, nothing written."""
    cases = [
        (["export", v2_ckpt, "-o", tmp_path / "a", "--tp", "3", *FLAGS], "--tp 3 does not divide the 4 attention heads"),
        (["export", v2_ckpt, "-o", tmp_path / "a", "--ep", "3", *FLAGS], "--ep 3 does not divide the 8 routed experts"),
        (["export", v2_ckpt, "-o", tmp_path / "a", "--tp", "2", "--weights", "int8", *FLAGS], "--weights int8"),
        (["run", sharded_out, "--input-ids", "1,2"], "runs on --backend torch only"),
    ]
    broken = tmp_path / "broken"
    shutil.copytree(sharded_out, broken)
    (broken / "weights-rank3.bin").unlink()
    cases.append((["run", broken, "--backend", "torch", "--input-ids", "1,2"], "weights-rank3.bin"))
    for argv, message in cases:
        result = run_here(*argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and "Traceback" not in result.stderr, (argv, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, result.stderr)
    assert not (tmp_path / "a").exists()
    from dscompile.runtime.sharded import ShardedEngine

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(EngineError, match="for 4 ranks .* cannot run with 2 processes"):
        ShardedEngine.load(sharded_out)


def test_ranks_get_a_gpu_each_or_the_cpu(monkeypatch):
    """One rank per GPU (NCCL refuses two ranks on one GPU): 4 ranks on a 1-GPU machine are refused for
    "cuda" naming both numbers, and run on CPU for "auto" with a note; torchrun's LOCAL_WORLD_SIZE counts
    the ranks on this machine. (GPUs faked: torch.cuda's answers.)"""
    from dscompile.runtime.sharded import choose_rank_device

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EngineError) as err:
        choose_rank_device("cuda", 4)
    assert "\n" not in str(err.value) and "4 ranks" in str(err.value) and "1 GPU(s)" in str(err.value), err.value
    device, note = choose_rank_device("auto", 4)
    assert device == "cpu" and "4 ranks and 1 GPU(s)" in note and "CPU (gloo)" in note
    assert choose_rank_device("cpu", 4) == ("cpu", None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun, one rank per machine
    assert choose_rank_device("cuda", 4) == ("cuda", None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert choose_rank_device("auto", 4) == ("cuda", None) == choose_rank_device("cuda", 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_rank_device("auto", 4) == ("cpu", None)


def test_idle_engine_outlives_the_collective_timeout(tmp_path, v2_ckpt, monkeypatch):
    """A step's collectives time out after DSCOMPILE_COLLECTIVE_TIMEOUT_S (6 s here: a loaded 2-core machine
    took over 3 s for a rank's first step), the wait for the next step does not: a 2-rank engine left idle
    for 11 s steps again with the same result. A rank that hangs during a step (stopped, so it neither
    answers nor exits) still ends that step within the timeout."""
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions
    from dscompile.runtime.session import open_engine

    timeout = 6
    export_checkpoint(v2_ckpt, tmp_path / "tp2", ExportOptions.within(LIMITS, tp=2))
    monkeypatch.setenv("DSCOMPILE_COLLECTIVE_TIMEOUT_S", str(timeout))  # read by every rank at load
    engine = open_engine(tmp_path / "tp2", backend="torch")
    try:
        ids, pos, mask = _prompt()
        logits, cache = engine.step(ids, pos, mask, None)
        token = logits[:, -1].argmax(-1, keepdim=True)
        step = (token, pos[:, -1:] + 1, torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1), cache)
        want, _ = engine.step(*step)
        time.sleep(timeout + 5)  # idle: the worker waits in the control group's broadcast
        got, _ = engine.step(*step)
        assert all(p.poll() is None for p in engine._workers)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        engine._workers[0].send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineError, match="a rank failed during the step"):
            engine.step(*step)
        assert time.monotonic() - start < timeout + 15  # the timeout, then 5 s waiting for an exit
    finally:
        engine.close()
    assert all(p.poll() is not None for p in engine._workers)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DSCOMPILE_SLOW"),
                    reason="9 sharded exports and engine launches (~9 min on 2 cores): set DSCOMPILE_SLOW=1 to run it")
@pytest.mark.parametrize("variant", ["v2", "v2-lite", "v3"])
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2)])
def test_matrix_of_variants_and_plans(tmp_path, make_ckpt, variant, tp, ep):
    from dscompile.exporter.export import export_checkpoint
    from dscompile.exporter.options import ExportOptions
    from dscompile.runtime.session import open_engine

    ckpt = make_ckpt(variant, layers=2)
    export_checkpoint(ckpt, tmp_path / "single", ExportOptions.within(LIMITS))
    export_checkpoint(ckpt, tmp_path / "sharded", ExportOptions.within(LIMITS, tp=tp, ep=ep))
    single = open_engine(tmp_path / "single", backend="torch")
    sharded = open_engine(tmp_path / "sharded", backend="torch")
    try:
        want, tokens, _ = _steps(single, *_prompt())
        got, got_tokens, _ = _steps(sharded, *_prompt())
    finally:
        sharded.close()
    assert [t.tolist() for t in got_tokens] == [t.tolist() for t in tokens]
    real = _prompt()[2].bool()
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g[real] if i == 0 else g, w[real] if i == 0 else w, what=f"{variant} tp{tp} ep{ep} step {i}")
