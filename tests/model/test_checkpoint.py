"""Checkpoint loading: layouts, shards, FP8, the meta device, configs, and every bad input we refuse."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_close, run_here
from dscompile.model.args import PUBLISHED_CONFIGS, ModelArgs
from dscompile.model.checkpoint import dequantize_fp8, load_checkpoint
from dscompile.model.synthetic import make_checkpoint, quantize_fp8, random_state, tiny_args, write_checkpoint
from dscompile.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[2]



def _logits(model, seed=0):
    ids = torch.randint(0, model.args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


def test_layouts_and_shards_load_to_the_same_model(tmp_path):
    args = tiny_args("v3", layers=3, experts=8)
    state = random_state(args, seed=3)
    ref = load_checkpoint(write_checkpoint(tmp_path / "published", args, state))
    for name, kw in {"stacked": {"layout": "stacked"}, "sharded": {"shards": 4}}.items():
        other = load_checkpoint(write_checkpoint(tmp_path / name, args, state, **kw))
        for (n, a), (_, b) in zip(ref.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), f"{name}: {n} differs"
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()


def test_fp8_checkpoint_dequantizes_within_fp8_rounding(tmp_path):
    args = tiny_args("v3", layers=2, experts=8, hidden=160)  # 160: blocks of 128 with a ragged edge
    state = random_state(args, seed=1)
    path = write_checkpoint(tmp_path / "fp8", args, state, fp8=True)
    stored = load_file(str(next(path.glob("*.safetensors"))))
    assert stored["model.layers.0.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in stored
    model = load_checkpoint(path)
    for name, original in state.items():
        loaded = model.state_dict()[name]
        # e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4, against each 128x128 block's max.
        tol = original.abs().max() * 2**-4 + 1e-6
        err = (loaded - original).abs().max()
        assert err <= tol, f"{name}: fp8 round trip error {err:.3g} > {tol:.3g}"
    assert model.args.fp8_block_size == (128, 128)


def test_dequantize_fp8_applies_one_scale_per_block():
    w = torch.randn(130, 260)
    q, s = quantize_fp8(w, (128, 128))
    assert s.shape == (2, 3)
    back = dequantize_fp8(q, s, (128, 128))
    assert back.shape == w.shape
    assert (back - w).abs().max() <= w.abs().max() * 2**-4


def test_mtp_layers_are_skipped_with_a_log_line(tmp_path, caplog):
    args = tiny_args("v3", layers=2, experts=8)
    state = random_state(args)
    path = write_checkpoint(tmp_path / "mtp", args, state)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.2.eh_proj.weight"] = torch.randn(4, 4)  # a multi-token-prediction layer
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("INFO", logger="dscompile"):
        model = load_checkpoint(path)
    assert "multi-token-prediction" in caplog.text
    assert len(model.layers) == 2


def test_meta_device_builds_without_reading_weights(make_ckpt):
    model = load_checkpoint(make_ckpt("v2", layers=2, experts=8), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name,params", [("deepseek-v3.json", 671.0e9), ("deepseek-v2.json", 235.7e9),
                                          ("deepseek-v2-lite.json", 15.7e9)])
def test_published_configs_parse_with_their_parameter_counts(name, params):
    from dscompile.model.checkpoint import build_model

    args = ModelArgs.from_json(PUBLISHED_CONFIGS / name)
    model = build_model(args, device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.005, f"{name}: {count / 1e9:.1f}B params"
    assert args.softmax_scale != args.qk_head_dim**-0.5  # YaRN's mscale² is applied


def test_yarn_and_scale_follow_the_config():
    args = ModelArgs.from_config({**tiny_args("v3").to_config()})
    assert args.rope_type == "yarn" and args.rope_factor == 40.0
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert args.softmax_scale == pytest.approx(args.qk_head_dim**-0.5 * m * m)


# ---- bad input: each a CheckpointError/ConfigError with one line naming the culprit ----


def _copy(make_ckpt, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(make_ckpt("v3", layers=2, experts=8), dst)
    return dst


def test_missing_config(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(path)


def test_unsupported_model_type(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_checkpoint(path)


def test_garbled_config(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_checkpoint(path)


def test_missing_tensor_is_named(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight is missing"):
        load_checkpoint(path)


def test_missing_expert_is_named(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.up_proj is missing"):
        load_checkpoint(path)


def test_wrong_shape_names_tensor_and_both_shapes(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight has shape \[64, 60\], the config implies \[64, 64\]"):
        load_checkpoint(path)


def test_truncated_safetensors(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path)


def test_missing_shard_named_in_index(tmp_path):
    args = tiny_args("v2-lite", layers=2)
    path = write_checkpoint(tmp_path / "sharded", args, random_state(args), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors named in the index is missing"):
        load_checkpoint(path)


def test_pickle_only_folder_is_refused(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_args("v3").to_config()))
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="only pickle weights .*unpickling executes code"):
        load_checkpoint(path)


def test_remote_code_is_never_imported(make_ckpt, tmp_path):
    path = _copy(make_ckpt, tmp_path)
    (path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (path / "config.json").write_text(json.dumps(cfg))
    assert_close(_logits(load_checkpoint(path)), _logits(load_checkpoint(make_ckpt("v3", layers=2, experts=8))))


def test_deterministic_generation(tmp_path):
    a = make_checkpoint(tmp_path / "a", "v3", seed=7)
    b = make_checkpoint(tmp_path / "b", "v3", seed=7)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
    for name in files:  # the weights and the demo tokenizer: the same bytes for the same seed
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path):
    """The real command: exit 2, one line on stderr, no traceback."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = subprocess.run([sys.executable, "-m", "dscompile", "make-checkpoint", str(tmp_path / "x"),
                          "--variant", "v9"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --variant 'v9' is not one of v2, v2-lite, v3"
    assert "Traceback" not in out.stderr


def test_make_checkpoint_config_writes_a_streamed_bf16_checkpoint(tmp_path):
    """`make-checkpoint --config FILE`: any config, generated tensor by tensor into shards with an
    index, in bfloat16, the same bytes for the same seed (in two processes: the real command in a
    subprocess and the command's entry point in this one), loading through the real loader."""
    args = tiny_args("v2-lite", layers=2)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(args.to_config()))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = ["make-checkpoint", str(out), "--config", str(config), "--json"]
        if name == "a":
            done = subprocess.run([sys.executable, "-m", "dscompile", *argv], capture_output=True, text=True, cwd=ROOT)
        else:
            done = run_here(*argv)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(out)
    index = json.loads((runs[0] / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(runs[0] / f))
        assert (runs[0] / f).read_bytes() == (runs[1] / f).read_bytes()
    assert tensors["model.layers.1.mlp.experts.3.gate_proj.weight"].dtype == torch.bfloat16
    assert not torch.equal(tensors["model.layers.1.mlp.experts.3.gate_proj.weight"],
                           tensors["model.layers.1.mlp.experts.4.gate_proj.weight"])
    model = load_checkpoint(runs[0])
    assert model.args == args
    bad = run_here("make-checkpoint", tmp_path / "c", "--config", "v9")
    assert bad.returncode == 2 and "--config 'v9': not a file, nor one of v2, v2-lite, v3" in bad.stderr
