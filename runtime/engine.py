"""The engine interface every backend implements, and the generation loop built on it.

An engine runs one forward step of the IO contract:

    step(input_ids [B, S], position_ids [B, S], attention_mask [B, P+S], cache) -> logits [B, S, V], cache

`cache` holds, per layer, the latent `kv_latent [B, P, C]` and the rotated `k_rope [B, P, R]`
(the contract and its types: runtime/contract.py). Backends subclass `Engine` and implement
`_step`, the backend's part: `step` itself is the base's, which first refuses inputs that break the
contract and, for an engine reading a weights file, a file changed on disk since it was loaded, so
no backend can skip either. `generate` (runtime/generate.py: left padding, greedy or sampled
decoding, streaming, end of sequence) is shared by all of them.

Shape legend: B batch, S new tokens, P past tokens, V vocab, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from dscompile.errors import EngineError
from dscompile.runtime.contract import EngineInfo, KVCache

if TYPE_CHECKING:
    from dscompile.runtime.weights import WeightsFile


class Engine(ABC):
    """A runnable model: one `step` of the IO contract plus the shared `generate` loop."""

    info: EngineInfo
    weights: WeightsFile | None = None  # the weights file the engine maps, checked before every step
    device: str = "cpu"  # where it computes: "cpu" or "cuda"
    notes: tuple[str, ...] = ()  # where "auto" chose less than the caller could hope for, and why (the CLI prints them)

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run S new tokens against the cache; return float32 logits [B, S, V] and the new cache.

        Refuses (EngineError) inputs `check_inputs` refuses and a weights file written since load."""
        self.check_inputs(input_ids, cache.length if cache is not None else 0, position_ids, attention_mask)
        if self.weights is not None:
            self.weights.check()
        return self._step(input_ids, position_ids, attention_mask, cache)

    @abstractmethod
    def _step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        """The backend's step, on inputs `step` has checked."""

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
        if input_ids.dim() != 2:
            raise EngineError(f"input_ids has shape {list(input_ids.shape)}, expected [B, S]")
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

