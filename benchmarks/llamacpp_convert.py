"""GGUFs for llama.cpp: float32 from our bench checkpoint (or any checkpoint), then q8_0 and q4_0.

`dscompile bench --llama-cpp NAME=LLAMA_BENCH:GGUF` measures llama.cpp beside our engines on the
same weights; this script writes those GGUFs from a checkout:

1. the bench checkpoint (bench/cache.py bench_checkpoint, under ~/.cache/dscompile or
   $DSCOMPILE_HOME) is staged in a folder of links beside the demo tokenizer trained to the full
   vocabulary (model/demo_tokenizer.py; the converter needs a tokenizer, the bench checkpoint has none);
2. llama.cpp's own `convert_hf_to_gguf.py` (unmodified, with its `gguf-py` and `conversion/`)
   runs under a converter Python (`--convert-python`: a venv with llama.cpp's
   requirements-convert_hf_to_gguf.txt, i.e. transformers 4.57.x, numpy 2.2, sentencepiece,
   protobuf, torch CPU) with two adjustments made in that process, not in its files:
   - its BPE pre-tokenizer check knows published tokenizers by a hash of their output; ours is
     new, and has the GPT-2 byte-level regex, so an unknown hash is named "gpt-2";
   - llama.cpp's deepseek2 loader takes a model without q_lora_rank for V2-Lite only at 26/27
     layers; for others it reads deepseek2.attention.q_lora_rank, which the converter writes only
     when the config sets it. 0 is written when the config has none (the graph then uses attn_q,
     as for V2-Lite);
3. `llama-quantize` writes q8_0 and q4_0 from the float32 file.

    python benchmarks/llamacpp_convert.py --llama-cpp DIR --convert-python PY --quantize BIN [--out /work/gguf]
        [--checkpoint CKPT --name NAME]

`--checkpoint` converts another checkpoint with its own tokenizer (e.g. model/pretrained, for
`llama-perplexity --kl-divergence` beside `dscompile eval`); the files are then NAME-{f32,q8_0,q4_0}.gguf.

DIR holds convert_hf_to_gguf.py, gguf-py/ and conversion/ at llama.cpp commit 0c1e57098 (also
vendored by the llama-cpp-python 0.3.36 sdist under vendor/llama.cpp). Measured on the 2-core machine
beside other jobs: the float32 conversion 2.5 min, each quantization 11-20 s; files of 2,883,193,472 (f32),
766,716,544 (q8_0) and 423,361,152 (q4_0) bytes. The llama.cpp binaries must suit the CPU: a build with
AVX-512 stops with an illegal instruction on an AVX2-only one (rebuild with GGML_NATIVE=ON, ~65 min on 2
busy cores).
Run with `--as-converter` (internal) it is the converter process itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TYPES = ("q8_0", "q4_0")


def _as_converter(llama_dir: str, argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py in this process with the two adjustments of the module docstring."""
    import runpy

    sys.path[:0] = [llama_dir, os.path.join(llama_dir, "gguf-py")]
    from conversion import base, deepseek  # llama.cpp's converter package

    known = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:  # an unpublished tokenizer: ours splits words with GPT-2's regex
            return "gpt-2"

    params = deepseek.DeepseekV2Model.set_gguf_parameters

    def gguf_parameters(self):
        params(self)
        if self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    deepseek.DeepseekV2Model.set_gguf_parameters = gguf_parameters
    script = os.path.join(llama_dir, "convert_hf_to_gguf.py")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def stage_checkpoint(home: Path, folder: Path) -> Path:
    """The bench checkpoint's files linked into `folder`, with a tokenizer of its full vocabulary."""
    from dscompile.bench.cache import bench_checkpoint
    from dscompile.model.args import ModelArgs
    from dscompile.model.demo_tokenizer import write_demo_tokenizer

    source = bench_checkpoint(home)
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        (folder / path.name).symlink_to(path.resolve())
    write_demo_tokenizer(folder, ModelArgs.from_json(source / "config.json").vocab_size)
    return folder


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--as-converter":
        _as_converter(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-cpp", required=True, type=Path, help="folder with convert_hf_to_gguf.py, gguf-py/, conversion/")
    p.add_argument("--convert-python", required=True, help="python of the converter venv")
    p.add_argument("--quantize", required=True, type=Path, help="llama-quantize binary")
    p.add_argument("--out", type=Path, default=Path("/work/gguf"), help="folder of NAME-{f32,q8_0,q4_0}.gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint with its tokenizer (default: the bench checkpoint)")
    p.add_argument("--name", default="bench", help="the files' prefix")
    a = p.parse_args()
    if a.checkpoint is not None and not (a.checkpoint / "tokenizer.json").is_file():
        print(f"error: {a.checkpoint}: no tokenizer.json (the converter needs the checkpoint's tokenizer)", file=sys.stderr)
        return 2
    if not (a.llama_cpp / "convert_hf_to_gguf.py").is_file():
        print(f"error: {a.llama_cpp}: no convert_hf_to_gguf.py", file=sys.stderr)
        return 2
    if not a.quantize.is_file():
        print(f"error: {a.quantize}: llama-quantize not found", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    home = Path(os.environ.get("DSCOMPILE_HOME", Path.home() / ".cache" / "dscompile"))
    a.out.mkdir(parents=True, exist_ok=True)
    f32 = a.out / f"{a.name}-f32.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        if not f32.is_file():
            staged = a.checkpoint if a.checkpoint is not None else stage_checkpoint(home, Path(tmp) / "ckpt")
            part = f32.with_suffix(".part")
            subprocess.run([a.convert_python, __file__, "--as-converter", str(a.llama_cpp.resolve()), str(staged),
                            "--outtype", "f32", "--outfile", str(part)], check=True)
            part.rename(f32)  # written whole or not at all
        for t in TYPES:
            out = a.out / f"{a.name}-{t}.gguf"
            if not out.is_file():
                part = out.with_suffix(".part")
                subprocess.run([str(a.quantize), str(f32), str(part), t.upper(), str(a.threads)], check=True)
                part.rename(out)
            print(out, out.stat().st_size)
    print(f32, f32.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
