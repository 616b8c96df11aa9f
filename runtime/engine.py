"""The engine interface every backend implements, and the generation loop built on it.

An engine runs one forward step of the IO contract:

    step(input_ids [B, S], position_ids [B, S], attention_mask [B, P+S], cache) -> logits [B, S, V], cache

`cache` holds, per layer, the latent `kv_latent [B, P, C]` and the rotated `k_rope [B, P, R]`.
Backends subclass `Engine` and implement `step`; `generate` (runtime/generate.py: left padding,
greedy or sampled decoding, streaming, end of sequence) is shared by all of them.

Shape legend: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from dscompile.errors import EngineError
from dscompile.tolerance import DTYPES



@dataclass(frozen=True)
class EngineInfo:
    """What the generation loop and the input checks need to know about an engine."""

    num_layers: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    vocab_size: int
    max_positions: int  # largest P + S the engine accepts
    cache_dtype: torch.dtype

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
        return KVCache(
            [
                (
                    torch.zeros(batch, 0, info.kv_lora_rank, dtype=info.cache_dtype, device=device),
                    torch.zeros(batch, 0, info.qk_rope_head_dim, dtype=info.cache_dtype, device=device),
                )
                for _ in range(info.num_layers)
            ]
        )


class Engine(ABC):
    """A runnable model: one `step` of the IO contract plus the shared `generate` loop."""

    info: EngineInfo

    @abstractmethod
    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run S new tokens against the cache; return float32 logits [B, S, V] and the new cache."""

    def own_cache(self, cache: KVCache) -> KVCache:
        """`cache` in the form this engine steps from fastest (ONNX Runtime: in-place buffers);
        by default as it is. Stepping from the result gives the same logits as from `cache`."""
        return cache

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        past_len: int,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Refuse token ids out of vocabulary, sequences longer than the engine allows, and
        position_ids / attention_mask that do not have the contract's [B, S] / [B, P+S] shapes."""
        B, S = int(input_ids.shape[0]), int(input_ids.shape[1])
        if position_ids is not None and tuple(position_ids.shape) != (B, S):
            raise EngineError(f"position_ids has shape {list(position_ids.shape)}, expected [B, S] = {[B, S]}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past_len + S):
            raise EngineError(f"attention_mask has shape {list(attention_mask.shape)}, expected [B, P+S] = "
                              f"{[B, past_len + S]}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.info.vocab_size):
            bad = int(input_ids.max()) if int(input_ids.max()) >= self.info.vocab_size else int(input_ids.min())
            raise EngineError(f"input id {bad} is outside the vocabulary [0, {self.info.vocab_size})")
        total = past_len + int(input_ids.shape[1])
        if total > self.info.max_positions:
            raise EngineError(
                f"{total} tokens (past {past_len} + new {input_ids.shape[1]}) exceed the engine's maximum "
                f"of {self.info.max_positions}"
            )

    def truncated_cache(self, cache: KVCache, length: int) -> KVCache:
        """The first `length` positions of `cache` (how a chat drops what it no longer shares)."""
        return KVCache([(k[:, :length], r[:, :length]) for k, r in cache.layers])

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int = 0,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """Continue each prompt by up to `max_new_tokens` tokens; return the new tokens per prompt.

        Prompts of different lengths are left-padded. `temperature == 0` is greedy decoding;
        otherwise tokens are sampled (runtime/sampling.py) with a seeded generator. A prompt stops
        at `eos_token_id` (one id or several; kept as its last token). `on_token(row, token)` is called as each token is produced (streaming).
        """
        from dscompile.runtime.generate import Decoding
        from dscompile.runtime.sampling import SamplingParams

        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed)
        decoding = Decoding(self, prompts, max_new_tokens, params, eos_ids=eos, pad_token_id=pad_token_id)
        for row, token in decoding:
            if on_token is not None:
                on_token(row, token)
        return decoding.tokens


def choose_graph(new_tokens: int, past_len: int) -> str:
    """The decode graph serves exactly one new token against a non-empty cache; prefill does the rest."""
    return "decode" if new_tokens == 1 and past_len > 0 else "prefill"

