"""fp16 engines: greedy continuations agree with the fp32 eager model (issue target: >= 95% of tokens)."""

from __future__ import annotations

import torch

from dscompile.exporter.verify.eager import EagerEngine
from dscompile.exporter.export import export_checkpoint
from dscompile.model.checkpoint import load_checkpoint
from dscompile.runtime.ort_engine import OrtEngine

AGREEMENT = 0.95


def test_fp16_greedy_continuations_agree_with_fp32_eager(make_ckpt, tmp_path):
    ckpt = make_ckpt("v3", layers=2, experts=8)
    export_checkpoint(ckpt, tmp_path / "fp16", dtype="float16")
    engine = OrtEngine.load(tmp_path / "fp16")
    eager = EagerEngine(load_checkpoint(ckpt, torch.float32))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, eager.info.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3, 7)]
    got, want = engine.generate(prompts, 32), eager.generate(prompts, 32)
    same = sum(a == b for row_g, row_w in zip(got, want) for a, b in zip(row_g, row_w))
    total = sum(len(row) for row in want)
    assert total == 4 * 32
    assert same / total >= AGREEMENT, f"fp16 engine agrees with fp32 eager on {same}/{total} greedy tokens"
