"""The prefix cache of continuous batching (runtime/batching.py): cache rows of prompt blocks, reused.

A prompt is cut into blocks of PREFIX_BLOCK tokens; block i's key is the hash of (block i-1's key,
its tokens), so a key names the whole prefix up to that block, and equal keys are checked against
the stored tokens and parent (a collision is a miss, never wrong rows). After a prompt is
prefilled, the cache rows of its whole blocks are copied out of its slot and kept; a later prompt
that starts with kept blocks copies their rows into its own slot and prefills only the rest. The
blocks are evicted least recently used first within a byte budget; a lookup or insert touches a
prefix from its last block to its first, so a block's descendants are evicted before it (a
parent gone would make them unreachable).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from dscompile.runtime.engine import SlotCache

PREFIX_BLOCK = 16  # tokens per block


@dataclass
class _Block:
    tokens: tuple[int, ...]
    parent: int | None
    rows: list[torch.Tensor]  # [PREFIX_BLOCK, dim] per cache tensor
    nbytes: int


class PrefixCache:
    """Cache rows of prompt blocks, keyed by chained block hashes, evicted least recently used
    first within `max_bytes` (a block's descendants go before it)."""

    def __init__(self, max_bytes: int, block: int = PREFIX_BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()
        self.nbytes = 0

    def _keys(self, prompt: list[int], count: int) -> list[tuple[int, tuple[int, ...], int | None]]:
        keys, parent = [], None
        for i in range(count):
            tokens = tuple(prompt[i * self.block:(i + 1) * self.block])
            key = hash((parent, tokens))
            keys.append((key, tokens, parent))
            parent = key
        return keys

    def lookup(self, prompt: list[int]) -> list[_Block]:
        """The kept blocks the prompt starts with, in order (touched as just used)."""
        found = []
        for key, tokens, parent in self._keys(prompt, len(prompt) // self.block):
            entry = self.blocks.get(key)
            if entry is None or entry.tokens != tokens or entry.parent != parent:
                break
            found.append(key)
        for key in reversed(found):  # parents end up more recent than their children
            self.blocks.move_to_end(key)
        return [self.blocks[k] for k in found]

    def insert(self, prompt: list[int], slots: SlotCache, slot: int) -> None:
        """Keep the whole blocks of `prompt`, whose rows are the first ones of `slot`."""
        if self.max_bytes <= 0:
            return
        keys = self._keys(prompt, len(prompt) // self.block)
        for i in reversed(range(len(keys))):
            key, tokens, parent = keys[i]
            if key in self.blocks and self.blocks[key].tokens == tokens and self.blocks[key].parent == parent:
                self.blocks.move_to_end(key)
                continue
            rows = slots.read(slot, i * self.block, (i + 1) * self.block)
            nbytes = sum(t.numel() * t.element_size() for t in rows)
            if key in self.blocks:  # a hash collision: the newer block wins
                self.nbytes -= self.blocks.pop(key).nbytes
            self.blocks[key] = _Block(tokens, parent, rows, nbytes)
            self.nbytes += nbytes
        while self.nbytes > self.max_bytes and self.blocks:
            self.nbytes -= self.blocks.popitem(last=False)[1].nbytes
