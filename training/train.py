"""Trains the shipped DeepSeek-V3-architecture model (model/pretrained/) on the corpus of corpus.py.

The model is the project's own (model/transformer.py, model/args.py): MLA with a query LoRA,
sigmoid routing with the correction bias and group-limited top-k, one shared expert, no YaRN.
Hidden 256, 4 layers (the first dense, then 3 MoE layers of 8 routed experts, top-2, 4 groups of
which 2 are kept), 4 heads, kv_lora 128, q_lora 128, vocab 4096: every weight's input dimension is
a multiple of 128, so every quantization block size from 16 to 128 applies. About 9.0M parameters.

Training: AdamW with a linear warm-up and a cosine decay, float32 on the CPU, the routed experts
dispatched to their tokens (model/dispatch.py). Measured on the 2-core machine while it was shared
(load average 6-17), `--time-only`, batch 8 x 256 tokens: float32 with 2 threads 22 s/step, bf16
autocast (router kept in float32) 119 s/step; float32 with 1 thread 5.3 s/step against 44 s/step
with 2 threads in back-to-back runs (two threads wait on each other when the cores are
oversubscribed), so the shipped model was trained on 1 thread. Experts are balanced as DeepSeek-V3 does, without an auxiliary loss: after
each step every gate's `e_score_correction_bias` moves by `--bias-rate` towards the experts that
got fewer than their share of tokens. Every `--eval-every` steps the loss on the held-out text
(the start of *Persuasion*, never trained on) is logged. Seed, threads, token count, the curves,
the expert loads and the time are written to OUT/training.json.

    python training/corpus.py
    python training/train.py --steps 1500 [--data ~/.cache/dscompile/corpus/text] [--out model/pretrained]

The tokenizer (byte-level BPE, 4096 tokens, DeepSeek's special tokens and the demo chat template;
model/demo_tokenizer.py) is trained first on the same text. The weights are written as bfloat16
safetensors in the published DeepSeek layout with config.json, the tokenizer files and
generation_config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dscompile.model.args import ModelArgs
from dscompile.model.demo_tokenizer import BOS_ID, EOS_ID, write_tokenizer
from dscompile.model.dispatch import dispatch_experts
from dscompile.model.synthetic import write_checkpoint
from dscompile.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 4096
# Sampling defaults for the shipped generation_config.json: greedy decoding of a small model loops.
GENERATION = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}


def model_args() -> ModelArgs:
    return ModelArgs(
        model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=256, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024,
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=256,
        first_k_dense_replace=1, topk_method="noaux_tc", n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", rope_type="default",
    )


def init_weights(model: Transformer, seed: int) -> None:
    """Normal(0, 0.02) weights, output projections scaled by 1/sqrt(2 * layers), norms 1, bias 0."""
    gen = torch.Generator().manual_seed(seed)
    depth_scale = 1 / math.sqrt(2 * model.args.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
                continue
            std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 1)
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


def tokenize(tokenizer_file: Path, text: str) -> torch.Tensor:
    """The text's token ids (no bos), paragraph by paragraph, as one int32 stream."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    paras = text.split("\n\n")
    ids: list[int] = []
    for enc in tok.encode_batch([p + "\n\n" for p in paras], add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int32)


def windows(stream: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    """[B, seq + 1]: bos, then seq tokens of the stream from each start."""
    body = torch.stack([stream[s: s + seq] for s in starts.tolist()]).long()
    return torch.cat([torch.full((len(starts), 1), BOS_ID), body], dim=1)


def lm_loss(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    logits, _ = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: Transformer, heldout: torch.Tensor, seq: int, batch: int) -> float:
    """Mean loss per token over consecutive windows of the held-out stream."""
    n = (len(heldout) - 1) // seq
    starts = torch.arange(n) * seq
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n, batch):
        b = windows(heldout, starts[i: i + batch], seq)
        total += lm_loss(model, b).item() * b[:, 1:].numel()
        count += b[:, 1:].numel()
    model.train()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path.home() / ".cache" / "dscompile" / "corpus" / "text")
    p.add_argument("--out", type=Path, default=REPO / "model" / "pretrained")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bias-rate", type=float, default=1e-3, help="correction-bias step per update (V3: 0.001)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows scored during training (all at the end)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="minutes: the schedule runs on max(step/steps, elapsed/limit) and training stops at the "
                        "limit (on a shared machine); 0: steps only, fully deterministic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast (measure first: see the docstring)")
    p.add_argument("--time-only", type=int, default=0, help="time this many steps, write nothing")
    a = p.parse_args()

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    start_time = time.time()
    work = Path(tempfile.mkdtemp(prefix="dsc-train-"))
    train_text = (a.data / "train.txt").read_text(encoding="utf-8")
    heldout_text = (a.data / "heldout.txt").read_text(encoding="utf-8")
    write_tokenizer(work, VOCAB, (p + "\n\n" for p in train_text.split("\n\n")), generation=GENERATION)
    stream = tokenize(work / "tokenizer.json", train_text)
    heldout = tokenize(work / "tokenizer.json", heldout_text)
    print(f"tokenizer {time.time() - start_time:.0f}s; train {len(stream):,} tokens, held-out {len(heldout):,}", flush=True)

    args = model_args()
    model = Transformer(args)
    init_weights(model, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    steps = a.time_only or a.steps

    def progress(step: int) -> float:
        done = step / steps
        if a.time_limit:
            done = max(done, (time.time() - t0) / (a.time_limit * 60))
        return min(done, 1.0)

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        w = a.warmup / steps
        t = min(1.0, max(0.0, (progress(step) - w) / (1 - w)))
        return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(a.seed)
    gates = {name: m for name, m in model.named_modules() if name.endswith("mlp.gate")}
    train_curve, heldout_curve, load_totals = [], [], {}
    tokens_seen = 0
    t0 = time.time()
    with dispatch_experts(model) as loads:
        for step in range(steps):
            if step and progress(step) >= 1.0:
                print(f"time limit: stopping after {step} of {steps} steps", flush=True)
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            starts = torch.randint(0, len(stream) - a.seq, (a.batch,), generator=gen)
            batch = windows(stream, starts, a.seq)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast):
                loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens_seen += a.batch * a.seq
            with torch.no_grad():  # DeepSeek-V3's balancing: raise the bias of under-loaded experts
                for name, counts in loads.items():
                    gate = gates[name + ".gate"]
                    c = counts.float()
                    gate.e_score_correction_bias += a.bias_rate * torch.sign(c.mean() - c)
                    load_totals[name] = load_totals.get(name, 0) + counts
            train_curve.append((step + 1, tokens_seen, round(loss.item(), 4)))
            if a.time_only:
                print(f"step {step + 1}: {time.time() - t0:.2f}s loss {loss.item():.3f}", flush=True)
                continue
            if (step + 1) % a.eval_every == 0:
                h = heldout_loss(model, heldout[: a.eval_windows * a.seq + 1], a.seq, a.batch)
                heldout_curve.append((step + 1, tokens_seen, round(h, 4)))
                el = time.time() - t0
                print(f"step {step + 1}/{steps} tokens {tokens_seen:,} train {loss.item():.3f} held-out {h:.3f} "
                      f"lr {lr_at(step):.2e} {el:.0f}s ({el / (step + 1):.2f}s/step)", flush=True)
    train_time = time.time() - t0
    steps_done = len(train_curve)
    if a.time_only:
        print(f"{train_time / steps:.2f}s/step over {steps} steps")
        return

    final = heldout_loss(model, heldout, a.seq, a.batch)
    print(f"held-out loss (all {len(heldout):,} tokens): {final:.4f}", flush=True)
    with torch.no_grad():
        final_loads = {}
        last_batch = windows(heldout, torch.arange(8) * a.seq, a.seq)
        with dispatch_experts(model) as loads:
            model(last_batch[:, :-1])
        for name, counts in load_totals.items():
            share = (counts.float() / counts.sum()).tolist()
            held = (loads[name].float() / loads[name].sum()).tolist()
            final_loads[name] = {"train_share": [round(s, 4) for s in share], "heldout_share": [round(s, 4) for s in held],
                                 "bias": [round(b, 4) for b in gates[name + ".gate"].e_score_correction_bias.tolist()]}
            print(f"{name} load (train) " + " ".join(f"{s:.3f}" for s in share)
                  + " | held-out " + " ".join(f"{s:.3f}" for s in held))

    state = {k: v.detach().float() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    ckpt = work / "ckpt"
    write_checkpoint(ckpt, args, state, layout="published", dtype=torch.bfloat16)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, torch_dtype="bfloat16")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    a.out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(ckpt / name, a.out / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(work / name, a.out / name)
    record = {
        "seed": a.seed, "threads": a.threads, "steps": steps, "steps_done": steps_done,
        "time_limit_min": a.time_limit, "batch": a.batch, "seq": a.seq,
        "lr": a.lr, "min_lr": a.min_lr, "warmup": a.warmup, "weight_decay": a.weight_decay, "bias_rate": a.bias_rate,
        "autocast_bf16": a.autocast, "parameters": n_params, "train_corpus_tokens": len(stream),
        "heldout_tokens": len(heldout), "tokens_trained": tokens_seen, "train_seconds": round(train_time),
        "total_seconds": round(time.time() - start_time), "torch": torch.__version__,
        "heldout_loss": round(final, 4), "heldout_curve_windows": a.eval_windows, "heldout_curve": heldout_curve,
        "train_curve": train_curve[:: max(1, len(train_curve) // 200)] + [train_curve[-1]],
        "expert_loads": final_loads,
    }
    (a.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(work)
    print(f"wrote {a.out}: held-out loss {final:.3f} after {tokens_seen:,} tokens, {train_time / 60:.1f} min")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
