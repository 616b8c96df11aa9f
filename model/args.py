"""ModelArgs: the DeepSeek-V2/V3 hyper-parameters, read from a Hugging Face `config.json`.

Field names are transformers' `DeepseekV2Config` / `DeepseekV3Config` names, so a published
config reads without a translation table. Values derived from them (head dims, the softmax scale
with YaRN's mscale², RoPE frequencies) are computed here once, and nowhere else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from dscompile.errors import ConfigError
from dscompile.model.routing import TOPK_METHODS

# The published full-size configs (DeepSeek-V2, V2-Lite, V3; see its README.md), shipped with the
# package: full-size capture and lowering need their shapes, not their weights.
PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "configs"
SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # mla
    q_lora_rank: int | None = 1536  # None: queries come from one q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # moe
    n_routed_experts: int | None = 256  # None: every layer is dense
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    # rope / yarn
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # pairs (x0, x1), (x2, x3) rotate together, as DeepSeek trained them
    rope_type: str = "default"  # "default" or "yarn"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    rope_attention_factor: float | None = None  # explicit override of YaRN's cos/sin factor
    rope_truncate: bool = True
    # checkpoint
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers stored after the main ones
    fp8_block_size: tuple[int, int] | None = None  # DeepSeek-V3's published FP8 weights

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived values ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Values cached per token and layer: the latent plus the shared rotated key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_nope + d_rope), times YaRN's mscale(factor, mscale_all_dim)² when YaRN is on."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn" and self.rope_mscale_all_dim:
            m = _yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def rope_cos_sin_factor(self) -> float:
        """YaRN's 'attention factor' applied to cos and sin (1.0 without YaRN)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        if self.rope_mscale and self.rope_mscale_all_dim:
            return _yarn_mscale(self.rope_factor, self.rope_mscale) / _yarn_mscale(
                self.rope_factor, self.rope_mscale_all_dim
            )
        return _yarn_mscale(self.rope_factor)

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse frequencies [R/2] for plain RoPE, or YaRN's blend of interpolated and extrapolated ones."""
        dim, base = self.qk_rope_head_dim, self.rope_theta
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        if self.rope_type != "yarn":
            return 1.0 / pos_freqs

        def correction_dim(rotations: float) -> float:
            return dim * math.log(self.rope_original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(base)
            )

        low, high = correction_dim(self.rope_beta_fast), correction_dim(self.rope_beta_slow)
        if self.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1.0 - ramp  # 1 keeps the original frequency (high-frequency dims)
        return (1.0 / (self.rope_factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation

    # ---- reading and writing config.json ----
    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """Build from a Hugging Face config dict. `auto_map` and any code reference are ignored."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "vocab_size"):
            if key not in cfg:
                raise ConfigError(f"{source}: required field {key!r} is missing")
        if cfg.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (no published DeepSeek model uses it)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        heads = cfg["num_attention_heads"]
        if cfg.get("num_key_value_heads") not in (None, heads):
            raise ConfigError(f"{source}: num_key_value_heads must equal num_attention_heads for MLA")

        is_v3 = model_type == "deepseek_v3"
        defaults = cls() if is_v3 else _V2_DEFAULTS
        kw: dict[str, Any] = {"model_type": model_type}
        plain = {f.name for f in fields(cls)} - {"model_type"}
        for name in plain:
            if name in cfg and not name.startswith("rope_") and name != "fp8_block_size":
                kw[name] = cfg[name]
        for name in plain - set(kw):
            if not name.startswith("rope_") and name != "fp8_block_size":
                kw[name] = getattr(defaults, name)
        if kw["n_group"] is None:
            kw["n_group"] = 1
        if kw["topk_group"] is None:
            kw["topk_group"] = 1
        if kw["num_experts_per_tok"] is None:
            kw["num_experts_per_tok"] = 1
        if "scoring_func" not in cfg:
            kw["scoring_func"] = "sigmoid" if kw["topk_method"] == "noaux_tc" else "softmax"
        # DeepSeek-V2 has no switch: its RoPE always rotates interleaved pairs.
        kw["rope_interleave"] = bool(cfg.get("rope_interleave", True)) if is_v3 else True
        kw.update(_rope_fields(cfg, source))
        quant = cfg.get("quantization_config")
        if quant:
            if quant.get("quant_method") != "fp8" or "weight_block_size" not in quant:
                raise ConfigError(
                    f"{source}: quantization_config {quant.get('quant_method')!r} is not supported "
                    "(only DeepSeek's block-scaled fp8)"
                )
            kw["fp8_block_size"] = tuple(int(v) for v in quant["weight_block_size"])
        kw["num_nextn_predict_layers"] = int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0)
        try:
            return cls(**kw)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_config(cfg, source=str(path))

    def to_config(self) -> dict[str, Any]:
        """The Hugging Face config.json dict for these arguments (what `make-checkpoint` writes)."""
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            "hidden_act": "silu",
            "attention_bias": False,
            "num_key_value_heads": self.num_attention_heads,
        }
        for f in fields(self):
            if not f.name.startswith("rope_") and f.name != "fp8_block_size":
                cfg[f.name] = getattr(self, f.name)
        cfg["rope_theta"] = self.rope_theta
        if self.model_type == "deepseek_v3":
            cfg["rope_interleave"] = self.rope_interleave
        if self.rope_type == "yarn":
            cfg["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "mscale": self.rope_mscale,
                "mscale_all_dim": self.rope_mscale_all_dim,
            }
        if self.fp8_block_size is not None:
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(self.fp8_block_size),
            }
        return cfg


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Read RoPE settings from either `rope_scaling` (published configs) or `rope_parameters` (transformers 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))}
    if rope_type == "default":
        return {**out, "rope_type": "default"}
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (only default and yarn)")
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    original = int(params.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    return {
        **out,
        "rope_type": "yarn",
        "rope_factor": float(factor if factor is not None else max_pos / original),
        "rope_original_max_position_embeddings": original,
        "rope_beta_fast": float(params.get("beta_fast") or 32.0),
        "rope_beta_slow": float(params.get("beta_slow") or 1.0),
        "rope_mscale": float(params.get("mscale") or 0.0),
        "rope_mscale_all_dim": float(params.get("mscale_all_dim") or 0.0),
        "rope_attention_factor": params.get("attention_factor"),
        "rope_truncate": bool(params.get("truncate", True)),
    }


def _validate(a: ModelArgs) -> None:
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "qk_rope_head_dim", "v_head_dim", "intermediate_size")
    for name in positive:
        if not isinstance(getattr(a, name), int) or getattr(a, name) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {getattr(a, name)!r}")
    if a.qk_nope_head_dim < 0 or a.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim must be even, got {a.qk_rope_head_dim}")
    if a.q_lora_rank is not None and a.q_lora_rank <= 0:
        raise ValueError(f"q_lora_rank must be positive or null, got {a.q_lora_rank}")
    if a.n_routed_experts is None:
        return
    if a.topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {a.topk_method!r} is not supported (expected one of {', '.join(TOPK_METHODS)})")
    expected_scoring = "sigmoid" if a.topk_method == "noaux_tc" else "softmax"
    if a.scoring_func != expected_scoring:
        raise ValueError(f"scoring_func {a.scoring_func!r} does not fit topk_method {a.topk_method!r}")
    if not 1 <= a.num_experts_per_tok <= a.n_routed_experts:
        raise ValueError(f"num_experts_per_tok {a.num_experts_per_tok} must be in [1, n_routed_experts={a.n_routed_experts}]")
    if a.n_routed_experts % a.n_group:
        raise ValueError(f"n_routed_experts {a.n_routed_experts} is not divisible by n_group {a.n_group}")
    if not 1 <= a.topk_group <= a.n_group:
        raise ValueError(f"topk_group {a.topk_group} must be in [1, n_group={a.n_group}]")
    if a.topk_method == "noaux_tc" and a.n_routed_experts // a.n_group < 2:
        raise ValueError("noaux_tc scores groups by their top-2 experts: each group needs at least 2")
    if a.moe_layer_freq < 1:
        raise ValueError(f"moe_layer_freq must be >= 1, got {a.moe_layer_freq}")


_V2_DEFAULTS = ModelArgs(
    model_type="deepseek_v2",
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    moe_intermediate_size=1407,
    first_k_dense_replace=0,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    norm_topk_prob=False,
    scoring_func="softmax",
    q_lora_rank=1536,
)
