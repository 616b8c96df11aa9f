"""The "transformers" frontend: transformers' own DeepseekV2/V3ForCausalLM captured under our engine contract.

`load_transformers_model(checkpoint)` builds transformers' model class for the checkpoint's
model_type (never remote code) with the weights our loader finds: on the meta device every
parameter is a meta tensor whose `dsc_source` reads it from the checkpoint when the weight file is
written, exactly like our model's (model/checkpoint.py); the routed experts' fused gate_up_proj
[E, 2I, D] is derived from our stacked gate_proj and up_proj [E, I, D] (dscompile.lazy.derive),
so nothing is read before it is written.

`capture_transformers(model, args, limits)` exports it with the inputs, outputs and dynamic dims of
capture/__init__.py: transformers' DynamicCache is filled from the contract's past and read back
as its present. transformers 5 caches, per layer, what our contract holds: the normalized latent
[B, 1, T, C] and the rotated rope key [B, 1, T, R] (its rope key's pair layout may differ from our
model's; the cache is opaque to the runtime, only its shape is the contract).

transformers is an optional dependency: it is imported inside the functions only.

Shape legend: B batch, S new tokens, P past tokens, T = P + S, C kv_lora_rank, R rope dim,
V vocab, E routed experts, I expert intermediate, D hidden.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.export import ExportedProgram

from dscompile.errors import CheckpointError, ConfigError
from dscompile.capture import Limits, contract_dims, example_inputs
from dscompile.capture.frontends.transformers_patches import export_patches, prefilled_cache
from dscompile.model.args import ModelArgs
from dscompile.model.checkpoint import load_checkpoint
from dscompile.model.transformer import causal_mask
from dscompile.lazy import derive

MODEL_CLASSES = {"deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
                 "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}


def _fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' experts.gate_up_proj [E, 2I, D] from our gate_proj and up_proj [E, I, D]."""
    return torch.cat([gate, up], dim=1)


def _hf_config(checkpoint: Path):
    """transformers' config object of `checkpoint` (its config class's from_dict; no remote code)."""
    import transformers

    path = checkpoint / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON config ({err})") from None
    names = MODEL_CLASSES.get(cfg.get("model_type") if isinstance(cfg, dict) else None)
    if names is None:  # ModelArgs.from_json has refused it already; kept for direct callers
        raise ConfigError(f"{path}: model_type must be one of {', '.join(MODEL_CLASSES)}")
    cfg = {k: v for k, v in cfg.items() if k != "auto_map"}  # remote code is never imported
    try:
        config = getattr(transformers, names[0]).from_dict(cfg)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}: transformers' {names[0]} refuses it ({err})") from None
    return config, getattr(transformers, names[1])


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _ours(name: str) -> str:
    """Our name of a transformers parameter or buffer (ours drop the "model." prefix)."""
    return name[len("model."):] if name.startswith("model.") else name


def load_transformers_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "meta", **load_options) -> tuple[nn.Module, ModelArgs]:
    """transformers' DeepseekV2/V3ForCausalLM of `checkpoint`, in eval mode, and our ModelArgs of it.

    device="meta": every weight is a meta tensor with a `dsc_source` reading it from the checkpoint
    (nothing is read here); another device: the weights are real. The RoPE frequencies are computed
    by transformers (on the CPU, real on every device). Checkpoint and config errors are those of
    `load_checkpoint` (CheckpointError, ConfigError), which also takes `load_options` (scan,
    progress, allow_nonfinite).
    """
    checkpoint = Path(checkpoint)
    ours = load_checkpoint(checkpoint, dtype=dtype, device=device, **load_options)  # names, shapes, config
    args = ours.args
    config, model_class = _hf_config(checkpoint)
    with torch.device("meta"):
        model = model_class(config)
    weights = dict(ours.named_parameters())
    weights.update(ours.named_buffers())
    real = str(device) != "meta"

    def tensor_for(name: str, like: torch.Tensor) -> torch.Tensor:
        """The value of transformers' weight `name` (shaped as `like`) from our loaded model."""
        mine = _ours(name)
        gate, up = mine.replace(".gate_up_proj", ".gate_proj"), mine.replace(".gate_up_proj", ".up_proj")
        if mine.endswith(".experts.gate_up_proj") and gate in weights:  # deferred on the meta device
            value = derive(_fuse_gate_up, weights[gate], weights[up])
        elif mine in weights:
            value = weights[mine]
        else:
            raise CheckpointError(f"{checkpoint}: transformers' {type(model).__name__} has weight {name}, "
                                  "which the checkpoint does not provide")
        if tuple(value.shape) != tuple(like.shape):
            raise CheckpointError(f"{checkpoint}: {name} has shape {list(value.shape)}, transformers' "
                                  f"{type(model).__name__} expects {list(like.shape)}")
        return value

    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    replaced: dict[int, nn.Parameter] = {}  # one new parameter per old one: tied weights stay tied
    for module in model.modules():
        for key, old in list(module._parameters.items()):
            if old is None:
                continue
            if id(old) not in replaced:
                value = tensor_for(first_name[id(old)], old)
                new = nn.Parameter(value.detach(), requires_grad=False)
                if value.is_meta:
                    new.dsc_source = value.dsc_source
                replaced[id(old)] = new
            module._parameters[key] = replaced[id(old)]
    for module_name, module in model.named_modules():
        if "inv_freq" in module._buffers:  # the rotary embedding: transformers computes it, on the CPU
            with torch.device("cpu"):
                fresh = type(module)(config)
            for key, value in fresh._buffers.items():  # inv_freq, original_inv_freq [R/2] float32
                module._buffers[key] = value.to(device) if real else value
            continue
        for key, old in list(module._buffers.items()):
            if old is not None:
                module._buffers[key] = tensor_for(f"{module_name}.{key}", old)  # the V3 routing bias
    return model.eval(), args


class TransformersContract(nn.Module):
    """transformers' model behind the IO contract (capture/__init__.py's ContractModule).

    (input_ids [B, S], position_ids [B, S], attention_mask [B, T], past: per layer
    (kv_latent [B, P, C], k_rope [B, P, R])) -> (logits float32 [B, S, V], present: per layer
    (kv_latent [B, T, C], k_rope [B, T, R])). The past fills a fresh DynamicCache ([B, 1, P, *]: one
    "head"); the model appends the new tokens; present is read back from the cache.
    """

    def __init__(self, model: nn.Module, args: ModelArgs):
        super().__init__()
        self.model, self.args = model, args

    @property
    def embed_tokens(self) -> nn.Module:  # what capture.example_inputs reads the device and dtype from
        return self.model.model.embed_tokens

    def forward(self, input_ids, position_ids, attention_mask, past):
        # transformers takes a prepared 4D mask as it is: the contract's causal + padding rule
        # (model/transformer.py causal_mask) over the T keys the padding mask spans. Its own mask
        # builder indexes the padding mask by cache positions, which the in-place decode graph
        # (cache buffers with spare rows, lowering/in_place.py) would read out of range.
        mask = causal_mask(attention_mask, input_ids.shape[1], self.embed_tokens.weight.dtype)
        cache = prefilled_cache(self.model.config, [(c.unsqueeze(1), r.unsqueeze(1)) for c, r in past])
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                         past_key_values=cache, use_cache=True)
        present = [(layer.keys.squeeze(1), layer.values.squeeze(1)) for layer in cache.layers]
        return out.logits.float(), present


def capture_transformers(model: nn.Module, args: ModelArgs, limits: Limits = Limits()) -> ExportedProgram:
    """Export transformers' model under the engine contract (same inputs, outputs and dynamic dims as
    capture/__init__.py's capture), with the patches of transformers_patches applied during the trace."""
    contract = TransformersContract(model, args)
    inputs = example_inputs(contract, limits.example_batch, limits.example_new, limits.example_past)
    with torch.no_grad(), export_patches(model):
        ep = torch.export.export(contract, inputs, dynamic_shapes=contract_dims(args, limits), strict=False)
    # transformers' code writes into tensors (the attention key is copied into slices of an empty
    # tensor, the group mask is scatter_'ed): the passes match dataflow, so the program is made
    # functional (in-place writes become slice_scatter / scatter); no op is decomposed. Its cache
    # appends on transformers' [B, 1, P, *] view are written on the contract's past by the first
    # pass of the pipeline (passes/squeeze_cache_append.py).
    return ep.run_decompositions({})
