"""The eager reference against transformers' DeepseekV2/V3ForCausalLM (the external oracle).

Each case builds the Hugging Face model from a tiny config with random weights (routers and the
V3 correction bias randomized: transformers zero-inits them), saves it with `save_pretrained`,
loads the folder with our `load_checkpoint`, and compares logits: prefill, then decode steps
with the cache, batch 2 with left padding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import assert_close
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.synthetic import tiny_args
from dscompile.runtime.contract import position_ids

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install '.[test]')")


def _hf_model(args, seed: int = 0):
    """A transformers model of `args` with every weight random (seeded)."""
    cls = transformers.DeepseekV3ForCausalLM if args.model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    cfg_cls = transformers.DeepseekV3Config if args.model_type == "deepseek_v3" else transformers.DeepseekV2Config
    torch.manual_seed(seed)
    config = cfg_cls.from_dict(args.to_config())
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # transformers zero-inits routers and uses std 0.02: with hidden 64 that is a model whose
            # routing ties everywhere. Scale like a trained net so routing and attention are exercised.
            std = 1.0 if "norm" in name else p.shape[-1] ** -0.5
            p.copy_(torch.randn_like(p) * std + (1.0 if "norm" in name else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


CASES = {
    "v2-group-limited": tiny_args("v2", layers=3, experts=8),
    "v2-lite-greedy": tiny_args("v2-lite", layers=3),
    "v3-noaux-interleave": tiny_args("v3", layers=3, experts=8),
    "v3-rotate-half": dataclasses.replace(tiny_args("v3", layers=2, experts=8), rope_interleave=False),
    "v3-no-yarn": tiny_args("v3", layers=2, experts=8, yarn=False),
    "v2-tied-embeddings": dataclasses.replace(tiny_args("v2", layers=2, experts=8), tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    args = CASES[request.param]
    hf = _hf_model(args)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_checkpoint(path)


def _left_padded(vocab: int, lengths: list[int], seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), S), generator=gen)
    mask = torch.zeros(len(lengths), S, dtype=torch.int64)
    for row, n in enumerate(lengths):
        mask[row, S - n :] = 1
    pos = position_ids(mask)
    return ids, mask, pos


def test_prefill_logits_match_transformers(pair):
    name, hf, ours = pair
    ids, mask, pos = _left_padded(ours.args.vocab_size, [7, 7])
    with torch.no_grad():
        ref = hf(ids).logits
        got, cache = ours(ids)
    assert_close(got, ref, what=f"{name} prefill")
    assert cache[0][0].shape[-1] == ours.args.kv_lora_rank and cache[0][1].shape[-1] == ours.args.qk_rope_head_dim


def test_decode_with_cache_and_left_padding_matches_transformers(pair):
    name, hf, ours = pair
    ids, mask, pos = _left_padded(ours.args.vocab_size, [6, 3])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        got, cache = ours(ids, pos, mask)
        real = mask.bool()
        assert_close(got[real], ref.logits[real], what=f"{name} padded prefill")
        past = ref.past_key_values
        gen = torch.Generator().manual_seed(2)
        for step in range(8):
            nxt = torch.randint(0, ours.args.vocab_size, (2, 1), generator=gen)
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
            ref = hf(nxt, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = ref.past_key_values
            got, cache = ours(nxt, pos, mask, cache)
            assert_close(got, ref.logits, what=f"{name} decode step {step}")
    assert cache[0][0].shape[1] == ids.shape[1] + 8


def test_our_generated_checkpoint_loads_in_transformers(make_ckpt):
    """The reverse direction: what make-checkpoint writes is a checkpoint transformers reads."""
    path = make_ckpt("v3", layers=2, experts=8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_checkpoint(path)
    ids = torch.randint(0, ours.args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(ids)[0], hf(ids).logits, what="make-checkpoint v3 in transformers")


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_onnx_runtime_engine_matches_transformers(exported, exported_ckpt, variant):
    """The compiled engine against the external oracle directly: prefill then decode steps, left padding.
    (The session's export of the two-layer checkpoint: tests/conftest.py `exported`.)"""
    from dscompile.runtime.ort_engine import OrtEngine

    path = exported_ckpt(variant)
    engine = OrtEngine.load(exported(variant))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, pos = _left_padded(engine.info.vocab_size, [6, 4])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        got, cache = engine.step(ids, pos, mask, None)
        real = mask.bool()
        assert_close(got[real], ref.logits[real], what=f"{variant} engine prefill vs transformers")
        past = ref.past_key_values
        for step in range(4):
            nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
            ref = hf(nxt, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = ref.past_key_values
            got, cache = engine.step(nxt, pos, mask, cache)
            assert_close(got, ref.logits, what=f"{variant} engine decode step {step} vs transformers")
