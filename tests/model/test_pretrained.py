"""The trained checkpoint shipped in the package (model/pretrained/, written by training/train.py).

It loads with our loader, its config is the documented DeepSeek-V3 architecture, its weights are
bfloat16 in the published per-expert layout, it has learned English (its eager loss on a slice of
the held-out text is far below what any random model reaches), and its tokenizer round-trips the
held-out text exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer

from dscompile.model.args import ModelArgs
from dscompile.model.checkpoint import PRETRAINED, load_checkpoint
from dscompile.model.demo_tokenizer import BOS, BOS_ID, EOS, EOS_ID
from dscompile.model.synthetic import random_state
from dscompile.model.transformer import Transformer

SLICE_TOKENS = 512  # of the held-out text: two 256-token windows
# ln(4096) = 8.32 nats is uniform guessing; random weights score about that or worse. The shipped
# model scores ~5 on the whole held-out text (model/pretrained/training.json): 6.0 leaves room
# for the slice's own difficulty and fails for anything untrained.
LOSS_BOUND = 6.0


@pytest.fixture(scope="module")
def model() -> Transformer:
    return load_checkpoint(PRETRAINED)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(PRETRAINED / "tokenizer.json"))


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> torch.Tensor:
    text = (PRETRAINED / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text).ids  # bos first
    assert ids[0] == BOS_ID and len(ids) > 2 * SLICE_TOKENS
    return torch.tensor(ids[1: SLICE_TOKENS + 1])


def windowed_loss(model: Transformer, ids: torch.Tensor, seq: int = 256) -> float:
    batch = torch.cat([torch.full((len(ids) // seq, 1), BOS_ID), ids.view(-1, seq)], dim=1)  # bos + window
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


def test_config_is_the_documented_v3_architecture(model):
    a = ModelArgs.from_json(PRETRAINED / "config.json")
    assert (a.model_type, a.topk_method, a.scoring_func, a.rope_type) == ("deepseek_v3", "noaux_tc", "sigmoid", "default")
    assert (a.hidden_size, a.num_hidden_layers, a.first_k_dense_replace, a.n_routed_experts, a.num_experts_per_tok,
            a.n_shared_experts, a.q_lora_rank, a.kv_lora_rank, a.vocab_size) == (256, 4, 1, 8, 2, 1, 128, 128, 4096)
    assert a.n_group > a.topk_group >= 1  # group-limited
    # every weight's input dimension is a multiple of 128: each quantization block size 16-128 applies
    assert model.args == a
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed_tokens" not in name and not name.endswith("gate.weight"):
            assert p.shape[-1] % 128 == 0, f"{name}: input dim {p.shape[-1]}"
    assert 8e6 < sum(p.numel() for p in model.parameters()) < 10e6


def test_weights_are_bf16_in_the_published_layout():
    with safe_open(str(PRETRAINED / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in names
    assert not any(n.endswith("gate_up_proj") for n in names)


def test_loss_on_heldout_text_is_far_below_random(model, heldout_ids):
    args = ModelArgs.from_json(PRETRAINED / "config.json")
    trained = windowed_loss(model, heldout_ids)
    random_model = Transformer(args)
    random_model.load_state_dict(random_state(args, seed=0), strict=False)
    untrained = windowed_loss(random_model, heldout_ids)
    assert untrained > math.log(args.vocab_size) - 0.5, f"random weights scored {untrained:.3f}"
    assert trained < LOSS_BOUND, f"held-out loss {trained:.3f} >= {LOSS_BOUND}"
    record = json.loads((PRETRAINED / "training.json").read_text())
    assert abs(trained - record["heldout_loss"]) < 0.75, (trained, record["heldout_loss"])  # bf16 vs fp32, slice vs whole


def test_tokenizer_round_trips_the_heldout_text(tokenizer):
    text = (PRETRAINED / "heldout.txt").read_text(encoding="utf-8")
    enc = tokenizer.encode(text)
    assert tokenizer.decode(enc.ids, skip_special_tokens=True) == text
    assert tokenizer.get_vocab_size() == 4096
    assert tokenizer.token_to_id(BOS) == BOS_ID and tokenizer.token_to_id(EOS) == EOS_ID
    assert len(text.encode()) / len(enc.ids) > 3  # BPE merges learned from English text, not bytes
    chat = json.loads((PRETRAINED / "tokenizer_config.json").read_text())
    assert "Assistant:" in chat["chat_template"] and chat["bos_token"] == BOS


def test_transformers_reads_it_and_agrees(model, heldout_ids):
    transformers = pytest.importorskip("transformers", reason="transformers is the test oracle (pip install '.[test]')")
    hf = transformers.AutoModelForCausalLM.from_pretrained(PRETRAINED, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.cat([torch.tensor([BOS_ID]), heldout_ids[:63]])[None]
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    err = (ours - ref).abs()
    assert err.max() < 1e-3 * ref.abs().max(), f"max |Δ| {err.max():.3g}, mean {err.mean():.3g}"
