"""The eager PyTorch reference behind the Engine interface, so it generates and compares like an engine."""

from __future__ import annotations

import torch

from dscompile.model.transformer import Transformer
from dscompile.runtime.engine import Engine, EngineInfo, KVCache


class EagerEngine(Engine):
    """Runs `model.transformer.Transformer` directly (no capture, no passes)."""

    def __init__(self, model: Transformer, max_positions: int | None = None):
        self.model = model
        a = model.args
        self.info = EngineInfo(
            num_layers=a.num_hidden_layers,
            kv_lora_rank=a.kv_lora_rank,
            qk_rope_head_dim=a.qk_rope_head_dim,
            vocab_size=a.vocab_size,
            max_positions=max_positions or a.max_position_embeddings,
            cache_dtype=model.embed_tokens.weight.dtype,
        )

    def step(self, input_ids, position_ids, attention_mask, cache):
        past = cache.length if cache is not None else 0
        self.check_inputs(input_ids, past, position_ids, attention_mask)
        with torch.no_grad():
            logits, present = self.model(input_ids, position_ids, attention_mask, cache.layers if cache else None)
        return logits, KVCache(present)

    def hidden_states(self, input_ids, position_ids, attention_mask, cache) -> list[torch.Tensor]:
        """Hidden state after each block (for locating the first diverging layer)."""
        with torch.no_grad():
            _, _, hidden = self.model(
                input_ids, position_ids, attention_mask, cache.layers if cache else None, output_hidden_states=True
            )
        return hidden
