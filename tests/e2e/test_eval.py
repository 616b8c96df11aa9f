"""`dscompile eval` / dscompile.eval: perplexity of an engine on a text equals exp(mean NLL) of the eager
model's logits on the same windows (prefilled in chunks where the engine's steps are shorter than a
window), KL against the engine itself is ~0 and against another engine > 0, and bad input is one line,
exit 2. On the session's tiny v3 engines (`exported`); ~15 s."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import run_here

import dscompile
from dscompile.model.demo_tokenizer import CORPUS
from dscompile.model.checkpoint import load_checkpoint
from dscompile.verify.quality import windows


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def eager_perplexity(checkpoint, ids: list[int], context: int, stride: int) -> float:
    """The strided perplexity written out on the eager model: window k ends at min(context + k·stride,
    N), starts context tokens earlier, and scores the targets past the previous window's end."""
    model = load_checkpoint(checkpoint)
    tokens = torch.tensor(ids)
    nll, done, end = [], 1, context
    while done < len(ids):
        end = min(end, len(ids))
        with torch.no_grad():
            logits, _ = model(tokens[end - context:end][None])
        log_p = torch.log_softmax(logits[0].double(), -1)
        for j in range(done, end):
            nll.append(-float(log_p[j - 1 - (end - context), tokens[j]]))
        done, end = end, end + stride
    return math.exp(sum(nll) / len(nll))


def test_perplexity_is_exp_mean_nll_of_eager_logits(exported, exported_ckpt, text_file):
    """context 192 > the engine's 128 tokens per step: each window is prefilled in two chunks."""
    out = exported("v3")
    report = dscompile.eval(out, text_file, context=192, stride=64, max_tokens=400)
    assert report["step_tokens"] == 128 and report["windows"] == 5, report  # ends 192, 256, 320, 384, 400
    assert report["scored_tokens"] == 399
    ids = dscompile.load(out).tokenizer.encode(CORPUS)[:400]
    expected = eager_perplexity(exported_ckpt("v3"), ids, 192, 64)
    assert report["perplexity"] == pytest.approx(expected, rel=1e-4), (report["perplexity"], expected)
    assert "reference" not in report


def test_windows_score_each_token_once():
    for n, context, stride in [(10, 10, 5), (11, 4, 3), (100, 16, 3), (17, 8, 7), (9, 2, 1)]:
        scored = [j for w in windows(n, context, stride) for j in range(w.first, w.end)]
        assert scored == list(range(1, n)), (n, context, stride)
        for w in windows(n, context, stride):
            assert w.end - w.begin == context and w.begin <= w.first - 1
            assert w.begin == 0 or w.first - w.begin >= context - stride  # context before every scored token


def test_kl_to_itself_is_zero_and_to_another_engine_positive(exported, exported_ckpt, text_file):
    out = exported("v3")
    same = dscompile.eval(out, text_file, reference=out, context=64, max_tokens=128)["reference"]
    assert same["kl"]["max"] < 1e-9 and same["top1_agreement"] == 1.0 and same["perplexity_ratio"] == 1.0, same
    eager = dscompile.eval(out, text_file, reference=exported_ckpt("v3"), context=64, max_tokens=128)["reference"]
    assert eager["kl"]["max"] < 1e-6 and eager["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5), eager
    half = dscompile.eval(exported("v3", "float16"), text_file, reference=exported_ckpt("v3"), context=64,
                          max_tokens=128)
    kl = half["reference"]["kl"]
    assert 0 < kl["median"] <= kl["mean"] <= kl["p99"] <= kl["max"] < 0.05, kl
    assert half["perplexity"] != half["reference"]["perplexity"]


def test_cli_json_and_status_line(exported, text_file):
    result = run_here("eval", exported("v3"), "--text", text_file, "--context", "64", "--max-tokens", "128", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["windows"] == 3 and report["perplexity"] > 1
    text = run_here("eval", exported("v3"), "--text", text_file, "--context", "64", "--max-tokens", "128")
    assert text.returncode == 0 and text.stdout.splitlines()[-1].startswith("PASSED |"), text.stdout


def test_bad_input_is_one_line(exported, make_ckpt, text_file, tmp_path):
    out = exported("v3")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(out, no_tokenizer)
    manifest = json.loads((no_tokenizer / "manifest.json").read_text())
    manifest["tokenizer"] = None
    (no_tokenizer / "manifest.json").write_text(json.dumps(manifest))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    cases = {
        "is empty": (out, "--text", empty),
        "text file not found": (out, "--text", tmp_path / "missing.txt"),
        "shorter than one window": (out, "--text", text_file, "--max-tokens", "50", "--context", "64"),
        "another vocabulary": (out, "--text", text_file, "--reference", make_ckpt("v3", layers=1, experts=4, vocab=320)),
        "neither a checkpoint": (out, "--text", text_file, "--reference", tmp_path),
        "no tokenizer.json": (no_tokenizer, "--text", text_file),
        "exceeds the engine's limit": (out, "--text", text_file, "--context", "1000"),
        "--stride": (out, "--text", text_file, "--context", "64", "--stride", "64"),
    }
    for message, args in cases.items():
        result = run_here("eval", *args)
        assert result.returncode == 2, (message, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (message, result.stderr)
