"""The tokenizer of the built-in demo checkpoint: a small byte-level BPE laid out like DeepSeek's.

`write_demo_tokenizer` trains a byte-level BPE on `CORPUS` (a few paragraphs kept here) and writes
the three files a published DeepSeek checkpoint ships: tokenizer.json (DeepSeek's special token
names, bos prepended by the post-processor), tokenizer_config.json (with a DeepSeek-V2-Chat-style
chat template) and generation_config.json. Every byte has a token, so any text encodes; training
is deterministic, so two calls write byte-identical files. `write_tokenizer` is the same on any
text (the shipped model's tokenizer is trained by training/train.py on its corpus, 4096 tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dscompile.errors import OptionError

BOS, BOS_ID = "<｜begin▁of▁sentence｜>", 0
EOS, EOS_ID = "<｜end▁of▁sentence｜>", 1
MIN_VOCAB = 300  # 2 special tokens + 256 bytes + some merges
MODEL_MAX_LENGTH = 16384

# bos, then per message: system text + blank line, "User: " turns, "Assistant: " turns closed by eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CORPUS = """\
A compiler for language models reads a checkpoint, rebuilds the network as a graph of tensor
operations, and rewrites that graph until it runs well on the machine at hand. The rewrites are
small and local: two matrix products that share an input become one, a softmax that only feeds a
top-k selection is folded into the router, and the attention of a latent cache is reordered so the
large projections happen once per weight instead of once per token.

Inference is a loop. The prompt goes through the model in one step, which fills the key and value
cache; after that every step takes a single new token, looks back at the cache, and produces the
logits of the next one. Greedy decoding picks the largest logit. Sampling divides the logits by a
temperature, keeps the top k or the smallest set whose probability passes top p, and draws from
what is left. Either way the loop stops at the end of sentence token, at a stop string, or when
the budget of new tokens is spent.

A tokenizer turns text into the integers the model was trained on. Byte-level tokenizers start
from the 256 possible bytes and learn merges of frequent pairs, so every string has an encoding,
even one the training text never showed: a naïve café order, a résumé, the façade of a building,
or a line of Chinese such as 编译器把模型变成引擎, 推理很快, 中文字符也可以. An emoji like 🙂 or 🚀
takes four bytes, and a token boundary may fall in the middle of it; a careful streamer waits for
the rest of the character before it prints anything.

Verification compares the compiled engine with the eager model on the same inputs. Each operator
has a tolerance that depends on its data type, and the whole model has a looser one, because small
rounding differences grow as they pass through many layers. When a comparison fails, the report
names the operator, the largest error and the mean error, so the engineer can tell a real bug from
ordinary float noise. Deterministic tests matter: the same seed, the same weights, the same text.

Quantized weights are stored in blocks, each with its own scale. The loader multiplies them back
into full precision only when a kernel needs them, and the exporter keeps the scales next to the
weights so the engine can do the same at run time. Memory is the limit that shapes everything: a
mixture of experts holds many more parameters than one token ever touches, and the cache grows
with every token of context. Compressing the cache into a small latent vector is what lets long
conversations fit.
"""


def write_demo_tokenizer(folder: Path, vocab_size: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json; return their names."""
    return write_tokenizer(folder, vocab_size, CORPUS.splitlines(keepends=True))


def write_tokenizer(
    folder: Path,
    vocab_size: int,
    texts: Iterable[str],
    generation: dict[str, Any] | None = None,
) -> list[str]:
    """The demo tokenizer's three files, its BPE trained on `texts` (an iterable of lines or
    documents); `generation` adds sampling defaults to generation_config.json (greedy otherwise)."""
    if vocab_size < MIN_VOCAB:
        raise OptionError(f"--vocab {vocab_size} is too small for the demo tokenizer: it needs at least {MIN_VOCAB}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": train_bpe(vocab_size, texts).to_str(pretty=True) + "\n",
        "tokenizer_config.json": _dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": MODEL_MAX_LENGTH,
                "chat_template": CHAT_TEMPLATE,
            }
        ),
        "generation_config.json": _dump(
            {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **(generation or {"do_sample": False})}
        ),
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return list(files)


def train_bpe(vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    """Byte-level BPE over `texts`: bos and eos first (BOS_ID, EOS_ID), then the 256 bytes, then merges."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return tokenizer


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
