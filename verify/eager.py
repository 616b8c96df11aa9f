"""The eager PyTorch references behind the Engine interface, so they generate and compare like engines:
our model (`EagerEngine`) and transformers' own (`TransformersEagerEngine`, for engines exported
with `--frontend transformers`)."""

from __future__ import annotations

import torch
from torch import nn

from dscompile.model.args import ModelArgs
from dscompile.model.transformer import Transformer
from dscompile.runtime.contract import EngineInfo, KVCache
from dscompile.runtime.engine import Engine


def _info(args: ModelArgs, cache_dtype: torch.dtype, max_positions: int | None) -> EngineInfo:
    return EngineInfo(num_layers=args.num_hidden_layers, kv_lora_rank=args.kv_lora_rank,
                      qk_rope_head_dim=args.qk_rope_head_dim, vocab_size=args.vocab_size,
                      max_positions=max_positions or args.max_position_embeddings, cache_dtype=cache_dtype)


class EagerEngine(Engine):
    """Runs `model.transformer.Transformer` directly (no capture, no passes)."""

    def __init__(self, model: Transformer, max_positions: int | None = None):
        self.model = model
        self.args = model.args
        self.info = _info(model.args, model.embed_tokens.weight.dtype, max_positions)

    def _step(self, input_ids, position_ids, attention_mask, cache):
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


class TransformersEagerEngine(EagerEngine):
    """transformers' DeepseekV2/V3ForCausalLM run as transformers runs it (its own code, no export
    patches), fed and read through the contract (capture/frontends/transformers.py)."""

    def __init__(self, model: nn.Module, args: ModelArgs, max_positions: int | None = None):
        from dscompile.capture.frontends.transformers import TransformersContract

        self.model, self.args = model, args
        self.contract = TransformersContract(model, args)
        self.info = _info(args, model.model.embed_tokens.weight.dtype, max_positions)

    def _past(self, batch: int, cache) -> list:
        if cache is not None:
            return cache.layers
        return KVCache.empty(self.info, batch, self.model.model.embed_tokens.weight.device).layers

    def _step(self, input_ids, position_ids, attention_mask, cache):
        with torch.no_grad():
            logits, present = self.contract(input_ids, position_ids, attention_mask,
                                            self._past(input_ids.shape[0], cache))
        return logits, KVCache(present)

    def hidden_states(self, input_ids, position_ids, attention_mask, cache) -> list[torch.Tensor]:
        hidden: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, out: hidden.append(out[0] if isinstance(out, tuple) else out))
                 for layer in self.model.model.layers]
        try:
            with torch.no_grad():
                self.contract(input_ids, position_ids, attention_mask, self._past(input_ids.shape[0], cache))
        finally:
            for h in hooks:
                h.remove()
        return hidden
