"""Quality on real text: perplexity and KL divergence of every engine kind against float32 eager.

Exports a checkpoint as float32, float16, int8 and int4 (block 32 and 128, each also calibrated with
`--calibration` when a calibration text is given) and runs `dscompile eval` on each with the
checkpoint as the reference: the README's "Quality on real text" table; int4 also through the native
kernels, with the 8-bit and the 6-bit lm_head. A variant whose export is refused (a block size that does
not divide a weight, native kernels this machine cannot build) is reported with the reason. With
`--llama-perplexity BIN --gguf F32.gguf --gguf-quant Q4_0.gguf`, llama.cpp's own KL divergence of the
quantized GGUF against the float32 one on the same text is added (`llama-perplexity
--kl-divergence-base` then `--kl-divergence`, its default non-overlapping chunks of `--context`
tokens scored on their second half).

    python benchmarks/quality.py model/pretrained --text model/pretrained/heldout.txt \\
        (--calibration CAL.txt | --calibration-from TRAIN.txt) [--work /tmp/quality] [--context 512] [--max-tokens N] [--json]

Engines are exported once into WORK (reused when their folder exists), with room for `dscompile
compare CKPT OUT` (batch 2).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import dscompile
from dscompile.errors import DscompileError, first_line

VARIANTS = {  # name: export options
    "float32": {},
    "float16": {"dtype": "float16"},
    "int8 (block 32)": {"weights": "int8", "block_size": 32},
    "int4 block 32": {"weights": "int4", "block_size": 32},
    "int4 block 32, 4-bit lm_head": {"weights": "int4", "block_size": 32, "lm_head_bits": 4},
    "int4 block 32, native kernels": {"weights": "int4", "block_size": 32, "native_kernels": True},
    "int4 block 32, native kernels, 6-bit lm_head": {"weights": "int4", "block_size": 32, "native_kernels": True,
                                                     "lm_head_bits": 6},
    "int4 block 128": {"weights": "int4", "block_size": 128},
    "int4 block 32 + calibration": {"weights": "int4", "block_size": 32, "calibration": True},
    "int4 block 128 + calibration": {"weights": "int4", "block_size": 128, "calibration": True},
}


def _variants(only: str) -> list[str]:
    """The variant names in `only`, comma-separated (a name holding commas itself is matched whole, the
    longest name first)."""
    pieces = [p.strip() for p in only.split(",")]
    names, i = [], 0
    while i < len(pieces):
        j = next((j for j in range(len(pieces), i, -1) if ", ".join(pieces[i:j]) in VARIANTS), None)
        if j is None:
            sys.exit(f"quality: --only: no variant {pieces[i]!r} (variants: {'; '.join(VARIANTS)})")
        names.append(", ".join(pieces[i:j]))
        i = j
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--text", type=Path, required=True, help="held-out text to evaluate on")
    p.add_argument("--calibration", type=Path, default=None, help="calibration text (not the held-out text)")
    p.add_argument("--calibration-from", type=Path, default=None,
                   help="make the calibration text from this file instead: --calibration-pieces evenly spaced "
                        "runs of whole lines, 2 KB each (e.g. the training text: samples of every source)")
    p.add_argument("--calibration-pieces", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/dscompile-quality"))
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--llama-perplexity", type=Path, default=None)
    p.add_argument("--gguf", type=Path, default=None, help="float32 GGUF of the checkpoint")
    p.add_argument("--gguf-quant", type=Path, action="append", default=None,
                   help="quantized GGUF (e.g. Q4_0; repeat for several)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.calibration_from is not None:
        a.calibration = a.work / "calibration.txt"
        a.calibration.write_text(sample_text(a.calibration_from.read_text(encoding="utf-8"), a.calibration_pieces),
                                 encoding="utf-8")
    rows = {}
    names = _variants(a.only) if a.only else list(VARIANTS)
    for name in names:
        options = dict(VARIANTS[name])
        if options.pop("calibration", False):
            if a.calibration is None:
                continue
            options["calibration"] = a.calibration
        out = a.work / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        start = time.perf_counter()
        try:
            if not (out / "manifest.json").is_file():
                dscompile.export(a.checkpoint, out, max_batch=2, max_prompt_tokens=a.context, max_context=a.context,
                                 force=True, **options)
            exported = time.perf_counter() - start
            report = dscompile.eval(out, a.text, reference=a.checkpoint, context=a.context, stride=a.stride,
                                    max_tokens=a.max_tokens, threads=a.threads)
        except DscompileError as err:
            rows[name] = {"error": first_line(err)}
            print(f"{name}: {first_line(err)}", file=sys.stderr)
            continue
        ref = report["reference"]
        rows[name] = {"perplexity": report["perplexity"], "reference_perplexity": ref["perplexity"],
                      "ppl_ratio": ref["perplexity_ratio"], "kl": ref["kl"], "top1": ref["top1_agreement"],
                      "scored_tokens": report["scored_tokens"], "windows": report["windows"],
                      "export_s": round(exported, 1), "eval_s": round(time.perf_counter() - start - exported, 1)}
        print(f"{name}: ppl {report['perplexity']:.3f} KL {ref['kl']['mean']:.4g} top1 {ref['top1_agreement']:.4f}",
              file=sys.stderr)
    for quant in (a.gguf_quant or []) if a.llama_perplexity and a.gguf else []:
        rows["llama.cpp " + quant.stem] = llama_kl(a.llama_perplexity, a.gguf, quant, a.text, a.context,
                                                   a.work, a.threads or 2, a.max_tokens)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print("| engine | perplexity | ratio to float32 eager | KL mean | KL p99 | KL max | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | |")
            continue
        print(f"| {name} | {r['perplexity']:.3f} | {r['ppl_ratio']:.4f} | {r['kl']['mean']:.3g} | "
              f"{r['kl']['p99']:.3g} | {r['kl']['max']:.3g} | {r['top1']:.4f} |")
    first = next((r for r in rows.values() if "reference_perplexity" in r), None)
    if first:
        print(f"\nfloat32 eager perplexity {first['reference_perplexity']:.3f} on {first['scored_tokens']} scored tokens "
              f"({first['windows']} windows of {a.context})")


def sample_text(text: str, pieces: int, piece_chars: int = 2048) -> str:
    """`pieces` runs of whole lines, ~piece_chars each, from evenly spaced places of `text`."""
    out = []
    for i in range(pieces):
        start = text.find("\n", i * len(text) // pieces) + 1
        end = text.find("\n", start + piece_chars)
        out.append(text[start:end if end > 0 else None].strip())
    return "\n\n".join(out) + "\n"


def llama_kl(binary: Path, base: Path, quant: Path, text: Path, context: int, work: Path, threads: int,
             max_tokens: int | None = None) -> dict:
    """llama-perplexity's KL divergence of `quant` against `base` on `text` (its own chunking; the first
    `max_tokens` // `context` chunks where given)."""
    logits = work / "llama-base.kld"
    common = ["-f", str(text), "-c", str(context), "-t", str(threads), "--kl-divergence-base", str(logits)]
    if max_tokens:
        common += ["--chunks", str(max(1, max_tokens // context))]
    subprocess.run([str(binary), "-m", str(base), *common], check=True, capture_output=True, text=True)
    done = subprocess.run([str(binary), "-m", str(quant), *common, "--kl-divergence"], check=True,
                          capture_output=True, text=True)
    log = done.stdout + done.stderr
    found = {}
    for key, pattern in {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
                         "ratio": r"Mean\s+PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)", "kl_mean": r"Mean\s+KLD:\s*([\d.e+-]+)",
                         "kl_median": r"Median\s+KLD:\s*([\d.e+-]+)",
                         "kl_p99": r"99\.0%\s+KLD:\s*([\d.e+-]+)", "kl_max": r"Maximum KLD:\s*([\d.e+-]+)",
                         "top1": r"Same top p:\s*([\d.]+)"}.items():
        m = re.search(pattern, log)
        found[key] = float(m.group(1)) if m else None
    top1 = found["top1"] / 100 if found["top1"] and found["top1"] > 1 else found["top1"]
    return {"perplexity": found["ppl"], "reference_perplexity": found["ppl_base"], "ppl_ratio": found["ratio"],
            "kl": {"mean": found["kl_mean"], "median": found["kl_median"], "p99": found["kl_p99"],
                   "max": found["kl_max"]}, "top1": top1,
            "scored_tokens": None, "windows": None, "log_tail": log[-2000:]}


if __name__ == "__main__":
    main()
