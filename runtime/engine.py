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
from dscompile.runtime.contract import EngineInfo, KVCache, choose_graph

if TYPE_CHECKING:
    from dscompile.runtime.weights import WeightsFile


def step_plan(new_tokens: int, past_len: int, step_tokens: int) -> list[tuple[str, int, int]]:
    """(graph, start, end) per run of one step of `new_tokens` against `past_len` cached tokens: the
    new tokens [start, end) in consecutive chunks of at most `step_tokens`, each on the decode graph
    (or profile) where it is one token against a non-empty cache (choose_graph), else on prefill."""
    if new_tokens < 1 or step_tokens < 1:
        raise EngineError(f"a step needs new tokens and a chunk size >= 1, got {new_tokens} and {step_tokens}")
    return [(choose_graph(min(a + step_tokens, new_tokens) - a, past_len + a), a, min(a + step_tokens, new_tokens))
            for a in range(0, new_tokens, step_tokens)]


class Engine(ABC):
    """A runnable model: one `step` of the IO contract plus the shared `generate` loop."""

    info: EngineInfo
    weights: WeightsFile | None = None  # the weights file the engine maps, checked before every step
    device: str = "cpu"  # where it computes: "cpu" or "cuda"
    notes: tuple[str, ...] = ()  # where "auto" chose less than the caller could hope for, and why (the CLI prints them)
    # Where the engine's programs bound a step's shape (torch.export's dynamic ranges, TensorRT's
    # profiles: the export's limits), the most rows and new tokens one step takes; None: any.
    max_batch: int | None = None
    max_step_tokens: int | None = None

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run S new tokens against the cache; return float32 logits [B, S, V] and the new cache.
        `last_only`: logits [B, 1, V] of the last new token, all a generation step reads (a backend
        whose graphs can skip the others' final norm and lm_head does: `_step_last`).

        Refuses (EngineError) inputs `check_inputs` refuses and a weights file written since load."""
        self.check_inputs(input_ids, cache.length if cache is not None else 0, position_ids, attention_mask)
        if self.weights is not None:
            self.weights.check()
        if last_only:
            return self._step_last(input_ids, position_ids, attention_mask, cache)
        return self._step(input_ids, position_ids, attention_mask, cache)

    def _step_last(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """`_step` with the last new token's logits only; by default all are computed, the last kept."""
        logits, cache = self._step(input_ids, position_ids, attention_mask, cache)
        return logits[:, -1:], cache

    @abstractmethod
    def _step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        """The backend's step, on inputs `step` has checked."""

    def _step_planned(self, run: Callable[..., tuple[torch.Tensor, KVCache]], input_ids: torch.Tensor,
                      position_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache | None, chunk: int,
                      last_only: bool) -> tuple[torch.Tensor, KVCache]:
        """A step of S new tokens as `step_plan` cuts it into chunks of at most `chunk`, each run as
        `run(graph, ids, positions, mask, cache)` on the cache the one before returned: causal attention
        makes it the same computation (each chunk attends to the cache and to itself), with bounded
        transient memory. Logits of every new token, or of the last one only (`last_only`)."""
        P = cache.length if cache is not None else 0
        logits = []
        for graph, a, b in step_plan(int(input_ids.shape[1]), P, chunk):
            out, cache = run(graph, input_ids[:, a:b], position_ids[:, a:b], attention_mask[:, : P + b], cache)
            logits = [out[:, -1:]] if last_only else logits + [out]
        return (logits[0] if last_only else torch.cat(logits, dim=1)), cache

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
        if input_ids.numel():
            # the ids as Python ints (a long prompt's list costs milliseconds beside its prefill): torch
            # reductions are slow on the caches a decode step leaves cold (ort_cache.InPlaceBindings); with the
            # write index bound as an int instead of a torch.full, the int4 bench step's time outside ONNX
            # Runtime fell from 0.52-0.59 to 0.40-0.55 ms (4 rounds)
            ids = input_ids.flatten().tolist()
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= self.info.vocab_size:
                bad = int(hi if hi >= self.info.vocab_size else lo)
                raise EngineError(f"input id {bad} is outside the vocabulary [0, {self.info.vocab_size})")
        total = past_len + int(input_ids.shape[1])
        if total > self.info.max_positions:
            raise EngineError(
                f"{total} tokens (past {past_len} + new {input_ids.shape[1]}) exceed the engine's maximum "
                f"of {self.info.max_positions}"
            )

    def new_slots(self, slots: int, capacity: int) -> "SlotCache":
        """Slot buffers for `slots` sequences of up to `capacity` cached tokens each (continuous batching)."""
        return SlotCache(self.info, slots, capacity, self.device)

    def prefill_slot(self, tokens: Sequence[int], slots: "SlotCache", slot: int, length: int) -> torch.Tensor:
        """Run `tokens` (one sequence, batch 1) after the `length` tokens cached in slot `slot`;
        their cache rows are written at [length, length + S) of the slot. Returns the last
        token's float32 logits [V]."""
        S = len(tokens)
        ids = torch.tensor([list(tokens)], dtype=torch.int64)
        positions = torch.arange(length, length + S, dtype=torch.int64).unsqueeze(0)
        mask = torch.ones(1, length + S, dtype=torch.int64)
        logits, present = self.step(ids, positions, mask, slots.view(slot, 1, length), last_only=True)
        slots.write(slot, length, [t[0, length:] for pair in present.layers for t in pair])
        return logits[0, -1].float()

    def step_ragged(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: "SlotCache", first: int = 0
                    ) -> torch.Tensor:
        """One decode step for slots [first, first + B), each at its own length: `tokens` [B] is
        each row's new token, `lengths` [B] (int64) how many tokens its slot caches; the new
        token's rows are written at row `lengths[b]` of each slot. Returns float32 logits [B, V].

        This generic form runs the contract's decode step through `step` (any backend): the
        past is the slots' first P rows (P their capacity, or the longest row where P + 1 would
        pass the engine's maximum), a row shorter than P attends its own tokens, then a hole
        of mask 0, then the new token, at position lengths[b]."""
        B = int(tokens.shape[0])
        longest = int(lengths.max())
        P = slots.capacity if slots.capacity + 1 <= self.info.max_positions else longest
        mask = torch.ones(B, P + 1, dtype=torch.int64)
        mask[:, :P] = torch.arange(P).unsqueeze(0) < lengths.unsqueeze(1)
        logits, present = self.step(tokens.reshape(B, 1).to(torch.int64), lengths.reshape(B, 1).to(torch.int64),
                                    mask, slots.view(first, B, P))
        rows = torch.arange(first, first + B)
        for buffer, t in zip(slots.tensors, (t for pair in present.layers for t in pair)):
            buffer[rows, lengths] = t[:, P].to(buffer.dtype)
        return logits[:, -1].float()

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


class SlotCache:
    """The latent cache of up to `slots` sequences, one buffer [N, T, dim] per cache tensor (contract
    order: kv_latent.0, k_rope.0, ...), T the capacity in tokens of every slot.

    Continuous batching keeps its running sequences here (runtime/batching.py): a sequence owns a
    slot, the decoding ones the first B slots, so one step binds rows [0, B) of every buffer as
    they are (contiguous). Rows past a sequence's length are zero or stale cache (finite): they are
    masked, never NaN."""

    def __init__(self, info: EngineInfo, slots: int, capacity: int, device: str = "cpu"):
        self.info, self.slots, self.device = info, slots, device
        self.tensors = [torch.zeros(slots, capacity, width, dtype=info.cache_dtype, device=device)
                        for _ in range(info.num_layers) for width in info.cache_widths]

    @property
    def capacity(self) -> int:
        return int(self.tensors[0].shape[1])

    @property
    def bytes_per_token(self) -> int:
        return sum(int(t.shape[-1]) * t.element_size() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def resize(self, capacity: int) -> None:
        """New buffers of `capacity` tokens holding the first min(T, capacity) rows of every slot."""
        keep = min(capacity, self.capacity)
        for i, old in enumerate(self.tensors):
            new = torch.zeros(self.slots, capacity, int(old.shape[-1]), dtype=old.dtype, device=old.device)
            new[:, :keep].copy_(old[:, :keep])
            self.tensors[i] = new

    def view(self, first: int, count: int, length: int) -> KVCache:
        """Slots [first, first + count), rows [0, length), as a contract cache (views, no copy)."""
        t = [buffer[first:first + count, :length] for buffer in self.tensors]
        return KVCache([(t[i], t[i + 1]) for i in range(0, len(t), 2)])

    def write(self, slot: int, start: int, rows: Sequence[torch.Tensor]) -> None:
        """Rows [start, start + n) of `slot` from one [n, dim] tensor per cache tensor."""
        for buffer, t in zip(self.tensors, rows):
            buffer[slot, start:start + int(t.shape[0])].copy_(t)

    def read(self, slot: int, start: int, end: int) -> list[torch.Tensor]:
        """Copies of rows [start, end) of `slot`, one [n, dim] tensor per cache tensor."""
        return [buffer[slot, start:end].clone() for buffer in self.tensors]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` rows of slot `source` into slot `target`."""
        if source != target and length > 0:
            for buffer in self.tensors:
                buffer[target, :length].copy_(buffer[source, :length])
