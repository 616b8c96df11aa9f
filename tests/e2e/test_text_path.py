"""Text in, text out on a real exported engine: the tokenizer travels with the engine, generation
matches transformers' generate, streaming, chat with a kept cache, stops, the CLI and the Python API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dscompile
from dscompile.capture import Limits
from dscompile.exporter.export import export_checkpoint
from dscompile.exporter.options import ExportOptions
from dscompile.model.synthetic import make_checkpoint
from dscompile.errors import EngineError, TextError
from dscompile.runtime.session import TextEngine
from helpers import run_here

pytestmark = pytest.mark.long  # minutes of exports: scheduled first (tests/conftest.py)

LIMITS = Limits(max_batch=4, max_prompt_tokens=128, max_context=256)  # the exports made here
PROMPTS = ["The compiler folds the latent cache", "中文字符的缓存", "Emoji 🙂🚀 and café"]


@pytest.fixture(scope="module")
def built(exported, exported_ckpt):
    """(checkpoint, OUT): the two-layer v3 with the demo tokenizer and the session's export of it
    (tests/conftest.py `exported`, within `export_limits`)."""
    return exported_ckpt("v3"), exported("v3")


@pytest.fixture(scope="module")
def llm(built):
    return TextEngine.open(built[1])


def dsc(*args, stdin: bytes | None = None, check: int = 0) -> subprocess.CompletedProcess:
    """`dscompile *args` in this process (run_here, tests/conftest.py), stdin piped (not a terminal);
    stdout and stderr as bytes. The real process with stdin a terminal: test_interactive_chat_on_a_terminal."""
    proc = run_here(*args, input=stdin if stdin is not None else b"", text=False)
    assert proc.returncode == check, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc


def test_export_copies_the_tokenizer_files_and_hashes_them(built):
    ckpt, out = built
    manifest = json.loads((out / "manifest.json").read_text())
    files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert manifest["tokenizer"]["files"] == files
    assert manifest["tokenizer"]["eos_token_ids"] == [1] and manifest["tokenizer"]["chat_template"] is True
    for name in files:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()
        assert manifest["files"][name]["bytes"] == (out / name).stat().st_size


def test_greedy_text_matches_transformers_generate(built, llm):
    transformers = pytest.importorskip("transformers")
    ckpt, _ = built
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=1, pad_token_id=1)
        want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert llm.generate(prompt, max_new_tokens=12) == want, prompt
        assert llm.generate(ids[0].tolist(), max_new_tokens=12) == ref[0, ids.shape[1]:].tolist()


def test_a_batch_of_text_prompts_equals_each_prompt_alone(llm):
    batch = llm.generate(PROMPTS, max_new_tokens=10)
    assert batch == [llm.generate(p, max_new_tokens=10) for p in PROMPTS]


def test_stream_pieces_concatenate_to_the_decoded_text(llm):
    split = False
    for prompt in PROMPTS:
        pieces = list(llm.stream(prompt, max_new_tokens=24, ignore_eos=True))
        result = llm.complete([prompt], max_new_tokens=24, ignore_eos=True).completions[0]
        assert "".join(pieces) == result.text == llm.tokenizer.decode(result.ids)
        assert len(result.ids) == 24
        split |= any(llm.tokenizer.decode([t]) != piece for t, piece in zip(result.ids, pieces))
    assert split  # some piece was not its own token's text: the multi-byte case was exercised


def test_chat_keeps_the_cache_between_turns(built):
    """Each turn runs only what its rendered conversation does not share with the cached one: at
    least the whole previous prompt is reused (a reply can re-tokenize differently once the
    template has placed it), and the reply is the one a run from scratch gives."""
    out = built[1]
    kept, fresh = TextEngine.open(out), TextEngine.open(out)
    messages = [{"role": "system", "content": "Be brief."}]
    previous = 0  # tokens of the previous turn's prompt
    for i, text in enumerate(["Hello there", "What is MLA?", "Thanks, bye"]):
        messages.append({"role": "user", "content": text})
        run = kept.chat_run(messages, dict(max_new_tokens=6))
        reply = "".join(piece for _, piece in run)
        fresh.reset()
        assert fresh.chat(messages, max_new_tokens=6) == reply  # the same reply as a run from scratch
        full = len(kept.tokenizer.encode(kept.tokenizer.render_chat(messages), add_special_tokens=False))
        assert run.result.timings.prefill_tokens == full - run.reused_tokens
        assert run.reused_tokens >= previous and (i == 0 or run.reused_tokens > 0)
        previous = full
        messages.append({"role": "assistant", "content": reply})


def test_stop_strings_and_eos_end_a_prompt(llm):
    prompt = PROMPTS[0]
    full = llm.complete([prompt], max_new_tokens=20, ignore_eos=True).completions[0]
    assert len(full.text) > 8
    stop = full.text[4:7]
    cut = llm.complete([prompt], max_new_tokens=20, ignore_eos=True, stop=[stop]).completions[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    eos_at = full.ids[2]
    engine = TextEngine(llm.engine, llm.tokenizer, eos_ids=[eos_at])
    ended = engine.complete([prompt], max_new_tokens=20).completions[0]
    first = full.ids.index(eos_at)
    assert ended.ids == full.ids[: first + 1] and ended.finish_reason == "eos"
    assert llm.complete([prompt], max_new_tokens=5, ignore_eos=True).completions[0].finish_reason == "length"


def test_sampling_is_seeded(llm):
    a = llm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5, seed=3, ignore_eos=True)
    assert a == llm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5, seed=3, ignore_eos=True)
    others = {llm.generate(PROMPTS[0], max_new_tokens=16, temperature=1.5, seed=s, ignore_eos=True) for s in range(4, 8)}
    assert others - {a}


def test_prompt_longer_than_the_engine_names_both_numbers(llm, export_limits):
    with pytest.raises(EngineError, match=f"exceeds the engine's maximum of {export_limits.max_context}"):
        llm.generate("word " * 400, max_new_tokens=4)


def test_python_api(built, make_ckpt, tmp_path):
    _, out = built
    llm = dscompile.load(out)
    assert llm.generate(PROMPTS[0], max_new_tokens=6) == TextEngine.open(out).generate(PROMPTS[0], max_new_tokens=6)
    assert isinstance(llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=4), str)
    ckpt = make_ckpt("v3", layers=1, experts=4, hidden=32)  # small, with the demo tokenizer (vocab 512)
    manifest = dscompile.export(ckpt, tmp_path / "api-out", max_prompt_tokens=16, max_context=64)
    assert manifest["limits"]["max_context"] == 64 and manifest["tokenizer"]["files"]
    assert dscompile.compare(ckpt, tmp_path / "api-out", decode_steps=2)["passed"]
    with pytest.raises(dscompile.DscompileError, match="top_p"):
        llm.generate(PROMPTS[0], top_p=1.5)


def test_cli_text_batch_chat_and_json(built, llm):
    _, out = built
    proc = dsc("run", out, "--prompt", PROMPTS[0], "--max-new-tokens", "8")
    assert proc.stdout.decode() == llm.generate(PROMPTS[0], max_new_tokens=8) + "\n"
    assert b"tokens/s" in proc.stderr
    result = json.loads(dsc("run", out, "-p", PROMPTS[0], "-p", PROMPTS[1], "--max-new-tokens", "8", "--json").stdout)
    assert [o["text"] for o in result["outputs"]] == llm.generate(PROMPTS[:2], max_new_tokens=8)
    assert result["timings"]["prefill_tokens"] == sum(len(llm.tokenizer.encode(p)) for p in PROMPTS[:2])
    piped = dsc("run", out, "--max-new-tokens", "8", stdin=PROMPTS[2].encode())
    assert piped.stdout.decode() == llm.generate(PROMPTS[2], max_new_tokens=8) + "\n"
    turns = json.loads(dsc("run", out, "--chat", "--max-new-tokens", "5", "--json",
                           stdin="Hello\nWhat is MLA?\nBye\n".encode()).stdout)["turns"]
    assert [t["user"] for t in turns] == ["Hello", "What is MLA?", "Bye"]
    assert turns[0]["cached_tokens"] == 0 and all(t["cached_tokens"] > 0 for t in turns[1:])
    ids = json.loads(dsc("run", out, "--input-ids", "0,5,6", "--max-new-tokens", "3", "--json").stdout)
    assert ids["tokens"] == [llm.generate([0, 5, 6], max_new_tokens=3)]


def test_cli_text_errors_are_one_line(built, export_limits, tmp_path):
    ckpt, out = built
    err = dsc("run", out, "--max-new-tokens", "2", stdin=b"caf\xe9", check=2).stderr.decode().strip()
    assert err.startswith("error: stdin is not valid UTF-8") and len(err.splitlines()) == 1
    err = dsc("run", out, "--prompt", "word " * 400, check=2).stderr.decode().strip()
    assert f"exceeds the engine's maximum of {export_limits.max_context}" in err and len(err.splitlines()) == 1

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "tokenizer.json").write_text("{ not json")
    err = dsc("run", broken, "--prompt", "hi", check=2).stderr.decode().strip()
    assert "tokenizer.json" in err and len(err.splitlines()) == 1
    dsc("run", broken, "--input-ids", "1,2", "--max-new-tokens", "2")  # ids still work

    escaping = tmp_path / "escaping"
    shutil.copytree(out, escaping)
    marker = tmp_path / "escaped"
    config = json.loads((escaping / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}")
    (escaping / "tokenizer_config.json").write_text(json.dumps(config))
    err = dsc("run", escaping, "--chat", "--max-new-tokens", "2", stdin=b"hi\n", check=2).stderr.decode().strip()
    assert err.startswith("error: chat template") and len(err.splitlines()) == 1
    assert not marker.exists()


def test_engines_without_a_tokenizer_run_ids_and_refuse_text(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "v2", layers=1, experts=4, hidden=32, tokenizer=False)
    out = tmp_path / "out"
    manifest = export_checkpoint(ckpt, out, ExportOptions.within(LIMITS))
    assert manifest["tokenizer"] is None and not (out / "tokenizer.json").exists()
    llm = TextEngine.open(out)
    assert len(llm.generate([1, 2, 3], max_new_tokens=3)) == 3
    with pytest.raises(TextError, match="no tokenizer.json"):
        llm.generate("hello")


def test_export_refuses_a_corrupt_tokenizer_naming_it(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "v2", layers=1, experts=4)
    (ckpt / "tokenizer.json").write_bytes(b"\x00garbage")
    with pytest.raises(TextError, match="tokenizer.json"):
        export_checkpoint(ckpt, tmp_path / "out", ExportOptions.within(LIMITS))
    assert not (tmp_path / "out").exists()


def test_one_top_level_package(tmp_path):
    """Installed, the package adds `dscompile` and nothing else to the import namespace."""
    import importlib.metadata

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib.util, dscompile.model.args, dscompile.runtime.session; "
             "print([n for n in ('model', 'runtime', 'passes', 'exporter') if importlib.util.find_spec(n)])")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stderr
    top_level = importlib.metadata.distribution("dscompile").read_text("top_level.txt")
    assert top_level.split() == ["dscompile"]


def test_interactive_chat_on_a_terminal(built):
    """stdin a terminal: a prompt per turn, /reset forgets the conversation (and its cache), /exit quits."""
    import pty

    _, out = built
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dscompile", "run", str(out), "--chat", "--max-new-tokens", "4"],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    os.write(master, b"Hello there\nWhat is MLA?\n/reset\nHello there\n/exit\n")
    stdout, stderr = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    llm = TextEngine.open(out)
    first = [{"role": "user", "content": "Hello there"}]
    r1 = llm.chat(first, max_new_tokens=4)
    r2 = llm.chat(first + [{"role": "assistant", "content": r1}, {"role": "user", "content": "What is MLA?"}],
                  max_new_tokens=4)
    assert stdout.decode() == f"{r1}\n{r2}\n{r1}\n"  # after /reset: the first turn's reply again
    cached = [int(n) for n in re.findall(r"\[(\d+) cached, ", stderr.decode())]
    assert len(cached) == 3 and cached[0] == 0 and cached[1] > 0 and cached[2] == 0
    assert "(conversation reset)" in stderr.decode()
