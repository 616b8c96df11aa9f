"""Load a Hugging Face-layout DeepSeek checkpoint (config.json + *.safetensors) into a Transformer.

Safetensors only: a folder with nothing but pickle files (pytorch_model.bin, *.pt) is refused,
because unpickling runs code from the file. `auto_map` / remote code in config.json is never
imported. Tensors are read shard by shard, straight into the model's parameters.

Both expert layouts found in the wild load:
- published DeepSeek layout: `mlp.experts.{j}.gate_proj.weight` ... one tensor per expert;
- transformers 5.x stacked layout: `mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I].
DeepSeek-V3's FP8 weights (float8_e4m3fn `weight` + float32 `weight_scale_inv` per block) are
dequantized to the requested dtype. Multi-token-prediction layers are skipped.

With device="meta" nothing is read: names and shapes are checked from the safetensors headers,
and every weight is a meta tensor whose `dsc_source` (a `CheckpointSource`) reads it when asked,
with the same conversions (expert stacking, FP8 dequantization, dtype). That is how an export
streams: it never holds more than the few tensors it is writing. `scan=True` checks the values
(finite, readable) in one pass of one tensor at a time before that.

Every floating-point tensor is checked for NaN/Inf as it streams in (one `isfinite` pass over a
tensor that is being copied anyway): a checkpoint with non-finite weights is refused, naming the
tensor, unless `allow_nonfinite` (then each one is logged as a warning). A NaN weight does not
fail loudly later: it turns some rows of logits into NaN, which greedy decoding reads as token 0.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from dscompile.model.args import ModelArgs
from dscompile.model.quant import FakeQuantized, Scheme, error_of, fake_quantize, is_quantized
from dscompile.model.transformer import Transformer
from dscompile.errors import CheckpointError, OptionError

log = logging.getLogger("dscompile")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The trained checkpoint shipped with the package (training/train.py wrote it; `dscompile demo` runs it),
# with its tokenizer and the held-out text it is evaluated on (heldout.txt, never trained on).
PRETRAINED = Path(__file__).resolve().parent / "pretrained"

# The one HF-name -> ours table. Ours drop the "model." prefix and stack routed experts.
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally one expert's slice or half of gate_up."""

    name: str  # our parameter / buffer name
    expert: int | None = None  # index into the stacked [E, ...] parameter
    half: str | None = None  # "gate" or "up" half of a stacked gate_up_proj


def map_name(hf_name: str) -> Target | None:
    """Our destination for a Hugging Face tensor name, or None for names we do not load."""
    m = _EXPERT.match(hf_name)
    if m:
        layer, expert, proj = m.groups()
        return Target(f"layers.{layer}.mlp.experts.{proj}", expert=int(expert))
    m = _STACKED.match(hf_name)
    if m:
        layer, proj = m.groups()
        if proj == "down_proj":
            return Target(f"layers.{layer}.mlp.experts.down_proj")
        return Target(f"layers.{layer}.mlp.experts.gate_proj", half="gate")
    if hf_name == "lm_head.weight":
        return Target("lm_head.weight")
    if hf_name.startswith("model."):
        return Target(hf_name[len("model.") :])
    return None


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in load order; refuses pickle-only folders."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{index}: shard {name} named in the index is missing")
        return [path / name for name in files]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights found ({', '.join(pickles[:3])}); dscompile loads safetensors only, "
            "because unpickling executes code from the file. Convert the checkpoint to safetensors first"
        )
    raise CheckpointError(f"{path}: no *.safetensors weights found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None


def iter_tensors(files: list[Path], read: bool = True) -> Iterator[tuple[str, Path, torch.Tensor | tuple]]:
    """Yield (name, file, tensor) per stored tensor, shard by shard; with read=False the shape only.

    Each tensor is read through its own short-lived mapping of the file: pages of a shard that
    were read stay resident (and counted as ours) while the mapping lives, so holding one open
    across a whole shard costs the shard's size in memory, one tensor at a time does not.
    """
    for file in files:
        with _open(file) as f:
            names = list(f.keys())
            if not read:
                for name in names:
                    yield name, file, tuple(f.get_slice(name).get_shape())
                continue
        for name in names:
            with _open(file) as f:
                tensor = _read(f, file, name)
            yield name, file, tensor


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3 FP8: float8 weight [O, I] times one float32 scale per block [ceil(O/b0), ceil(I/b1)]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


@dataclass(frozen=True)
class Part:
    """One stored tensor that fills (part of) one of our weights."""

    file: Path
    name: str  # the checkpoint's tensor name
    expert: int | None = None  # the slice of a stacked [E, ...] weight it fills
    half: str | None = None  # "gate" or "up": the half of a stacked gate_up_proj it is


class CheckpointSource:
    """Reads one weight of a meta-loaded model from the safetensors files (the `dsc_source` protocol)."""

    def __init__(self, name: str, parts: list[Part], like: torch.Tensor, fp8: dict[str, Path],
                 fp8_block: tuple[int, int]):
        self.name, self.parts, self.shape, self.dtype = name, parts, tuple(like.shape), like.dtype
        self.fp8, self.fp8_block = fp8, fp8_block

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        for file in sorted({p.file for p in self.parts}):
            with _open(file) as f:
                for part in (p for p in self.parts if p.file == file):
                    tensor = _read(f, file, part.name)
                    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                        scale_file = self.fp8.get(part.name)
                        if scale_file is None:
                            raise CheckpointError(f"{file}: fp8 tensor {part.name} has no {part.name}_scale_inv")
                        with _open(scale_file) as g:
                            scale = _read(g, scale_file, part.name + "_scale_inv")
                        tensor = dequantize_fp8(tensor, scale, self.fp8_block)
                    if part.half is not None:
                        tensor = tensor.chunk(2, dim=1)[0 if part.half == "gate" else 1]
                    (out if part.expert is None else out[part.expert]).copy_(tensor.to(self.dtype))
        return out


class _Computed:
    """`dsc_source` of a buffer the model computes from its config (RoPE frequencies)."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn

    def load(self) -> torch.Tensor:
        return self.fn()


def _read(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: tensor {name} cannot be read ({err})") from None


def check_finite(tensor: torch.Tensor, file: Path, name: str, allow_nonfinite: bool) -> None:
    """Refuse (or, with allow_nonfinite, log) a floating-point tensor holding NaN/Inf."""
    if tensor.is_floating_point() and tensor.element_size() == 1:  # float8: isfinite works on wider types
        tensor = tensor.float()
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())  # only on the failure path: the count helps triage
        if not allow_nonfinite:
            raise CheckpointError(f"{file}: tensor {name} has {bad} non-finite value(s) (NaN/Inf); "
                                  "pass --allow-nonfinite to export it anyway")
        log.warning("tensor %s in %s has %d non-finite value(s) (NaN/Inf); loading it anyway", name, file, bad)


def build_model(args: ModelArgs, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """An uninitialized Transformer in `dtype` on `device` (the meta device builds no storage)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype)
    if str(device) == "meta":  # fp32 like the real one below, computed when materialized
        model.rotary_emb.inv_freq = torch.empty(model.rotary_emb.inv_freq.shape, device="meta")
        model.rotary_emb.inv_freq.dsc_source = _Computed(args.rope_inv_freq)
    else:
        model = model.to_empty(device=device)
        model.rotary_emb.inv_freq = args.rope_inv_freq().to(device)
        if args.tie_word_embeddings:  # to_empty materializes each module's reference separately
            model.lm_head.weight = model.embed_tokens.weight
    for layer in model.layers:  # the routing bias stays fp32 whatever the weights' dtype
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias = gate.e_score_correction_bias.float()
    return model.eval()


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    allow_nonfinite: bool = False,
    scan: bool = False,
    quantize: Scheme | None = None,
    quant_errors: dict[str, dict[str, float]] | None = None,
    importance: dict[str, torch.Tensor] | None = None,
) -> Transformer:
    """Read config.json and the safetensors weights of `path` into a Transformer.

    With device="meta" the weights are not read (their names and shapes are still checked), so
    full-size configs can be captured. `progress(done, total)` is called after each shard.
    Non-finite weights are refused unless `allow_nonfinite` (see the module docstring); with
    device="meta" they are found only with `scan`, which reads every tensor once, one at a time,
    to check it (and that its data reads), and drops it.

    `quantize` loads every weight that scheme quantizes (model.quant.is_quantized) fake-quantized:
    as dequantize(quantize(w)), the values a quantized engine computes with, and marks it
    (`dsc_quantize` attribute) for the lowering to store as bits and scales. On the meta device
    the conversion happens when the weight is read (model.quant.FakeQuantized). `quant_errors`
    receives each such weight's largest quantization error as it is computed. `importance` (our
    parameter name -> mean squared input activation per input channel, model/calibration.py)
    chooses the quantized weights' scales by calibration (model.quant.quantize_weighted).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json not found")
    args = ModelArgs.from_json(path / "config.json")
    files = find_weight_files(path)
    model = build_model(args, dtype, device)
    meta = str(device) == "meta"
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    expected = {n for n in params if not n.endswith("inv_freq")}
    if args.tie_word_embeddings:
        expected.discard("lm_head.weight")
    filled: dict[str, int] = {}  # name -> number of slices written (experts fill one slice each)
    scales: dict[str, torch.Tensor] = {}
    pending_fp8: dict[str, tuple[torch.Tensor, Path]] = {}
    skipped_mtp: set[int] = set()
    unknown: list[str] = []
    parts: dict[str, list[Part]] = {}  # meta: our name -> the stored tensors it is read from
    fp8_scales: dict[str, Path] = {}  # meta: weight name -> the file of its weight_scale_inv

    def place(hf_name: str, file: Path, tensor) -> None:
        target = map_name(hf_name)
        if target is None or target.name not in params:
            unknown.append(hf_name)
            return
        param = params[target.name]
        shape = tensor if meta else tuple(tensor.shape)
        want = tuple(param.shape)
        if target.expert is not None:
            want = want[1:]
            if target.expert >= param.shape[0]:
                raise CheckpointError(
                    f"{file}: tensor {hf_name} names expert {target.expert} but the config has {param.shape[0]} experts"
                )
        if target.half is not None:
            want = (want[0], 2 * want[1], want[2])
        if tuple(shape) != want:
            raise CheckpointError(f"{file}: tensor {hf_name} has shape {list(shape)}, the config implies {list(want)}")
        if not meta:
            check_finite(tensor, file, hf_name, allow_nonfinite)
        if meta:  # what CheckpointSource will read
            if target.half is not None:
                up_name = target.name.replace("gate_proj", "up_proj")
                parts.setdefault(target.name, []).append(Part(file, hf_name, half="gate"))
                parts.setdefault(up_name, []).append(Part(file, hf_name, half="up"))
            else:
                parts.setdefault(target.name, []).append(Part(file, hf_name, expert=target.expert))
        if target.half is not None:
            up = params[target.name.replace("gate_proj", "up_proj")]
            if not meta:
                gate, upper = tensor.chunk(2, dim=1)
                param.data.copy_(gate.to(param.dtype))
                up.data.copy_(upper.to(up.dtype))
            filled[target.name] = filled[target.name.replace("gate_proj", "up_proj")] = param.shape[0]
            return
        if not meta:
            dest = param.data if target.expert is None else param.data[target.expert]
            dest.copy_(tensor.to(param.dtype))
        whole = param.shape[0] if name_is_stacked(target.name) else 1
        filled[target.name] = whole if target.expert is None else filled.get(target.name, 0) + 1

    total = len(files)
    for done, file in enumerate(files, 1):
        for name, src, tensor in iter_tensors([file], read=not meta or scan):
            if meta and scan:  # checked here once; only the shape goes on
                check_finite(tensor, src, name, allow_nonfinite)
                tensor = tuple(tensor.shape)
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= args.num_hidden_layers:
                skipped_mtp.add(int(layer.group(1)))
                continue
            if name.endswith(".weight_scale_inv"):
                scales[name[: -len("_scale_inv")]] = tensor
                fp8_scales[name[: -len("_scale_inv")]] = src
                continue
            if not meta and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                pending_fp8[name] = (tensor, src)
                continue
            place(name, src, tensor)
        # FP8 weights whose scales were in this or an earlier shard can be placed now.
        for name in [n for n in pending_fp8 if n in scales]:
            weight, src = pending_fp8.pop(name)
            place(name, src, dequantize_fp8(weight, scales.pop(name), args.fp8_block_size or (128, 128)))
        if progress is not None:
            progress(done, total)
    if pending_fp8:
        name = next(iter(pending_fp8))
        raise CheckpointError(f"{path}: fp8 tensor {name} has no {name}_scale_inv")
    if skipped_mtp:
        log.info("skipped multi-token-prediction layer(s) %s (not used for generation)", sorted(skipped_mtp))
    if unknown:
        log.warning("ignored %d tensor(s) the model does not use, e.g. %s", len(unknown), unknown[0])
    for name in sorted(expected):
        need = params[name].shape[0] if name_is_stacked(name) else 1
        if filled.get(name, 0) < need:
            raise CheckpointError(f"{path}: tensor {_hf_name(name)} is missing from the checkpoint")
    if meta:
        block = args.fp8_block_size or (128, 128)
        for name, found in parts.items():
            params[name].dsc_source = CheckpointSource(name, found, params[name], fp8_scales, block)
    if quantize is not None:
        apply_quantization(model, quantize, quant_errors, importance)
    return model


def apply_quantization(model: Transformer, scheme: Scheme, errors: dict[str, dict[str, float]] | None = None,
                       importance: dict[str, torch.Tensor] | None = None) -> int:
    """Mark (and, with values, fake-quantize) the weights `scheme` quantizes; returns how many.

    Real weights are replaced by their fake-quantized values now; meta weights with a source read
    them so later; meta weights without one (a model built from a config alone) are only marked.
    """
    errors = {} if errors is None else errors
    count = 0
    tied = model.args.tie_word_embeddings
    for name, param in model.named_parameters():
        if not is_quantized(name) or (tied and name == "lm_head.weight"):
            continue
        if param.shape[-1] % scheme.block_size:
            raise OptionError(f"--block-size {scheme.block_size} does not divide the input dimension "
                              f"{param.shape[-1]} of weight {_hf_name(name)}; choose one that divides it")
        own = scheme.for_weight(name)  # lm_head may keep more bits (model/quant.py)
        if param.is_meta:
            source = getattr(param, "dsc_source", None)
            if source is not None:
                param.dsc_source = FakeQuantized(_hf_name(name), source, own, errors, (importance or {}).get(name))
        else:
            fake = fake_quantize(param.data, own, (importance or {}).get(name))
            errors[_hf_name(name)] = error_of(param.data, fake)
            param.data.copy_(fake)
        param.dsc_quantize = own
        count += 1
    return count


def name_is_stacked(ours: str) -> bool:
    """Our stacked expert parameters ([E, ...]) are filled one expert at a time in the published layout."""
    return ours.split(".")[-2] == "experts"


def _hf_name(ours: str) -> str:
    """Our parameter name back to the checkpoint's (for messages)."""
    return ours if ours == "lm_head.weight" else f"model.{ours}"
