"""ExportOptions (exporter/options.py): one set of export options, defaults and checks for every way in.

- `dscompile export`, `dscompile.export(...)` and `export_checkpoint` with the same options write
  byte-identical manifests (which hash every file of OUT), and with no option the same defaults;
- each invalid option is refused, before anything is read, with one line naming the flag, by the
  options object and by the command line alike.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import dscompile
from helpers import run_here
from dscompile.errors import OptionError
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions


def test_the_three_entry_points_write_the_same_manifest(tmp_path, one_layer_ckpt, small_limits, small_flags):
    cli = run_here("export", one_layer_ckpt, "-o", tmp_path / "cli", *small_flags, "--json")
    assert cli.returncode == 0, cli.stderr
    dscompile.export(one_layer_ckpt, tmp_path / "api", **dataclasses.asdict(small_limits))
    export_checkpoint(one_layer_ckpt, tmp_path / "job", ExportOptions.within(small_limits))
    manifests = {way: (tmp_path / way / "manifest.json").read_bytes() for way in ("cli", "api", "job")}
    assert manifests["cli"] == manifests["api"] == manifests["job"]


def test_one_set_of_defaults():
    """The command line's defaults (README) are the options' defaults, which the API and the job take."""
    from dscompile.cli.export import export as command

    flags = {name: p.default.default for name, p in inspect.signature(command).parameters.items()}  # typer's
    defaults = ExportOptions()
    assert defaults.max_prompt_tokens == flags["max_prompt_tokens"] == 4096
    options = dataclasses.asdict(defaults)
    assert set(options) - set(flags) == {"accuracy_level"}  # the API's alone: no flag
    assert {name: flags[name] for name in options if name in flags} == \
        {name: value for name, value in options.items() if name in flags}
    assert ExportOptions(dtype="bf16").dtype == "bfloat16"
    from dscompile.capture import Limits

    assert defaults.limits == Limits()  # a bare capture has a default export's ranges


BAD = [  # (options, what the one-line error says)
    (dict(dtype="float8"), "--dtype 'float8' is not one of float32, float16, bfloat16"),
    (dict(absorb="maybe"), "--absorb 'maybe' is not one of auto, fold, reassociate, none"),
    (dict(target="tpu"), "--target 'tpu' is not one of onnxruntime, tensorrt"),
    (dict(device="rocm"), "--device 'rocm' is not one of cpu, cuda"),
    (dict(device="cuda", target="tensorrt"), "--device cuda is an option of --target onnxruntime"),
    (dict(opset=22), "--opset 22 is too old: the lowering needs opset >= 23"),
    (dict(max_prompt_tokens=1), "--max-batch/--max-prompt-tokens/--max-context: need max_prompt_tokens >= 2"),
    (dict(max_prompt_tokens=64, max_context=32), "--max-batch/--max-prompt-tokens/--max-context: need max_batch"),
    (dict(weights="int3"), "--weights 'int3' is not one of int8, int4"),
    (dict(weights="int4", block_size=24), "--block-size 24 is not one of 16, 32, 64, 128"),
    (dict(weights="int4", lm_head_bits=3), "--lm-head-bits 3 is not one of 4, 6, 8"),
    (dict(weights="int8", target="tensorrt"), "--weights int8 with --target tensorrt"),
    (dict(weights="int4", dtype="float16"), "--weights int4 with --dtype float16"),
    (dict(accuracy_level=7), "accuracy level 7 is not one of 0-4"),
    (dict(frontend="tvm"), "--frontend 'tvm' is not one of dscompile, transformers"),
    (dict(graphs_only=True, verify=True), "--graphs-only and --verify"),
    (dict(tp=0), "--tp 0 and --ep 1 must be >= 1"),
    (dict(tp=2, weights="int8"), "--tp 2 --ep 1 with --weights int8"),
    (dict(ep=2, target="tensorrt"), "--tp 1 --ep 2 with --target tensorrt"),
    (dict(target="tensorrt", precision="int8"), "--precision must be one of fp32, fp16, bf16, got 'int8'"),
]


@pytest.mark.parametrize("options,says", BAD, ids=[says.split(":")[0][:40] for _, says in BAD])
def test_a_bad_option_is_one_line_naming_it(tmp_path, one_layer_ckpt, options, says):
    with pytest.raises(OptionError) as err:
        ExportOptions(**options)
    assert str(err.value).startswith(says) and len(str(err.value).splitlines()) == 1
    with pytest.raises(OptionError, match=says.split(":")[0].replace("(", r"\(")):
        dscompile.export(one_layer_ckpt, tmp_path / "api", **options)
    if "accuracy_level" in options:  # not a command-line flag
        return
    flags = [f for name, value in options.items()
             for f in ([f"--{name.replace('_', '-')}"] if value is True else [f"--{name.replace('_', '-')}", value])]
    out = run_here("export", one_layer_ckpt, "-o", tmp_path / "cli", *flags)
    assert out.returncode == 2 and out.stderr.startswith(f"error: {says}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "cli").exists() \
        and not (tmp_path / "api").exists()
