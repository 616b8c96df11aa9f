"""The engine contract, written once: what every graph of OUT takes and returns, and how a step's
inputs are built. The capture, the lowering, the engines, the verification and the tests import
it; it imports nothing of the package but the base.

Both graphs ("prefill", "decode") take and return the same tensors (the names are a public
interface: README, DESIGN.md "The engine contract (OUT/)"):

    input_ids              int64        [B, S]
    position_ids           int64        [B, S]
    attention_mask         int64        [B, P+S]   1 attend, 0 padding
    past.{i}.kv_latent     cache dtype  [B, P, C]
    past.{i}.k_rope        cache dtype  [B, P, R]
    logits (output)        float32      [B, S, V]
    present.{i}.kv_latent  cache dtype  [B, P+S, C]   (outputs; k_rope likewise)

The in-place decode graph (ONNX Runtime on CPU) takes one more input, `write_index` [B]: the
cache row its step writes. ONNX Runtime exports for CPU also take an optional `logits_from` int64 [1]
(default 0, lowering/logits.py): logits are then returned for new tokens [logits_from, S) only.

Batches are left-padded: a row's real tokens end at the right, its padding (mask 0) comes first,
and its first real token has position P (the cache before it is all real).

Shape legend: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from dscompile.errors import EngineError
from dscompile.dtypes import DTYPES

PREFILL, DECODE = "prefill", "decode"
PHASES = (PREFILL, DECODE)  # the contract's graphs, in the order a generation runs them
DECODE_IN_PLACE = "decode_inplace"  # the decode step writing its cache into capacity buffers (ONNX Runtime, CPU)

INPUT_IDS, POSITION_IDS, ATTENTION_MASK = "input_ids", "position_ids", "attention_mask"
STEP_INPUTS = (INPUT_IDS, POSITION_IDS, ATTENTION_MASK)  # before the cache, in this order
LOGITS = "logits"
WRITE_INDEX = "write_index"  # the in-place decode graph's extra input: the cache row to write, [B]
LOGITS_FROM = "logits_from"  # optional input of ONNX Runtime graphs: logits for new tokens [logits_from, S) only
PAST, PRESENT = "past", "present"
CACHE_KINDS = ("kv_latent", "k_rope")  # per layer, in this order


def cache_name(direction: str, layer: int, kind: str) -> str:
    """`past.{layer}.{kind}` or `present.{layer}.{kind}`."""
    return f"{direction}.{layer}.{kind}"


def cache_names(direction: str, num_layers: int) -> list[str]:
    """Every cache tensor's name in contract order: kv_latent.0, k_rope.0, kv_latent.1, ..."""
    return [cache_name(direction, i, kind) for i in range(num_layers) for kind in CACHE_KINDS]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of both graphs, in order."""
    return [*STEP_INPUTS, *cache_names(PAST, num_layers)], [LOGITS, *cache_names(PRESENT, num_layers)]


def choose_graph(new_tokens: int, past_len: int, in_place: bool = False) -> str:
    """The graph a step runs: decode serves exactly one new token against a non-empty cache (through
    the in-place graph where the engine has it); prefill does the rest."""
    if new_tokens == 1 and past_len > 0:
        return DECODE_IN_PLACE if in_place else DECODE
    return PREFILL


@dataclass(frozen=True)
class EngineInfo:
    """What the generation loop and the input checks need to know about an engine."""

    num_layers: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    vocab_size: int
    max_positions: int  # largest P + S the engine accepts
    cache_dtype: torch.dtype

    @property
    def cache_widths(self) -> tuple[int, int]:
        """Last dims of a layer's cache tensors, in CACHE_KINDS order: (C, R)."""
        return self.kv_lora_rank, self.qk_rope_head_dim

    @staticmethod
    def from_manifest(manifest: dict, where: str = "manifest.json") -> "EngineInfo":
        """Sizes from an OUT folder's manifest (its model config, limits and cache dtype)."""
        cfg = manifest["model"]
        name = manifest.get("cache", {}).get("dtype", manifest["dtype"])
        if name not in DTYPES:
            raise EngineError(f"{where}: cache dtype {name!r} is not one of {', '.join(DTYPES)}")
        return EngineInfo(
            num_layers=int(cfg["num_hidden_layers"]),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            vocab_size=int(cfg["vocab_size"]),
            max_positions=min(int(manifest["limits"]["max_context"]), int(cfg["max_position_embeddings"])),
            cache_dtype=DTYPES[name],
        )


@dataclass
class KVCache:
    """Latent cache: per layer (kv_latent [B, P, C], k_rope [B, P, R]). Engines may subclass it."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.layers else int(self.layers[0][0].shape[1])

    @staticmethod
    def empty(info: EngineInfo, batch: int, device: torch.device | str = "cpu") -> "KVCache":
        return KVCache([
            tuple(torch.zeros(batch, 0, width, dtype=info.cache_dtype, device=device) for width in info.cache_widths)
            for _ in range(info.num_layers)
        ])


class StepInputs(NamedTuple):
    """The contract's inputs of one step (unpack as `ids, pos, mask`)."""

    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, P+S]


def position_ids(attention_mask: torch.Tensor, new_tokens: int | None = None) -> torch.Tensor:
    """Positions of the last `new_tokens` columns of a left-padded mask [B, P+S] (all by default):
    the number of attended tokens before each one. A padding column (never attended) gets its
    predecessor's, or 0 at the start of the row."""
    positions = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
    return positions if new_tokens is None else positions[:, attention_mask.shape[1] - new_tokens:].contiguous()


def step_inputs(tokens: torch.Tensor | Sequence[Sequence[int]], past: int = 0, padding: Sequence[int] | None = None,
                pad_token_id: int = 0) -> StepInputs:
    """The inputs of a step of new tokens after `past` cached ones (all attended).

    `tokens` is ids [B, S] whose row b starts with `padding[b]` tokens of left padding (none by
    default; the ids there are kept as given), or prompts of any lengths, left-padded to the
    longest with `pad_token_id`.
    """
    if not isinstance(tokens, torch.Tensor):
        longest = max(len(p) for p in tokens)
        padding = [longest - len(p) for p in tokens]
        tokens = torch.tensor([[pad_token_id] * n + [int(t) for t in p] for p, n in zip(tokens, padding)],
                              dtype=torch.int64)
    batch, new = int(tokens.shape[0]), int(tokens.shape[1])
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    for row, n in enumerate(padding or ()):
        mask[row, past: past + n] = 0
    return StepInputs(tokens.to(torch.int64), position_ids(mask, new), mask)


def next_step_inputs(tokens: torch.Tensor, previous: StepInputs) -> StepInputs:
    """The inputs of the decode step after `previous`: one new token per row ([B] or [B, 1]), at
    the position after the row's last, attended."""
    batch = int(previous.attention_mask.shape[0])
    return StepInputs(tokens.reshape(batch, 1).to(torch.int64), previous.position_ids[:, -1:] + 1,
                      torch.cat([previous.attention_mask, torch.ones(batch, 1, dtype=torch.int64)], dim=1))


def random_step_inputs(vocab: int, batch: int, tokens: int, past: int = 0, seed: int = 0,
                       padding: Sequence[int] | None = None) -> StepInputs:
    """`step_inputs` of seeded random ids [B, S] (benchmarks, comparisons, tests)."""
    gen = torch.Generator().manual_seed(seed)
    return step_inputs(torch.randint(0, vocab, (batch, tokens), generator=gen), past, padding)
