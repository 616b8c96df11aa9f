"""The text layer of `dscompile run --prompt/--chat` (runtime/text.py, model/demo_tokenizer.py).

- the demo tokenizer is deterministic (also across processes), round-trips text, prepends bos,
  stays inside its vocabulary and refuses a vocabulary too small for it;
- encode, decode and the chat template give what transformers gives for the same files;
- streamed pieces always concatenate to `decode` of all ids, for byte-level BPE and for
  SentencePiece-style byte-fallback tokenizers, with characters split across tokens, and text is
  emitted as it comes rather than at the end;
- stop strings cut at the earliest stop, also across pieces, and hold back only possible stops;
- chat templates run sandboxed: escapes, includes and errors are one-line TextErrors, nothing runs;
- corrupt tokenizer files are one-line TextErrors naming the file; no tokenizer.json means None;
- invalid UTF-8 from stdin or argv is reported with its byte offset.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dscompile.model.demo_tokenizer import BOS, BOS_ID, CORPUS, EOS, EOS_ID, write_demo_tokenizer
from dscompile.errors import OptionError, TextError
from dscompile.runtime.text import StopStrings, Tokenizer, check_utf8, read_utf8

DEMO_VOCAB = 1000
TEXTS = [
    "Hello world, the compiler runs.",
    "The café serves naïve crêpes.",
    "中文字符",
    "🙂🚀",
    "mixed: 编译 🙂 ok  two  spaces\n\nand a new line",
    " leading space and trailing ",
]
CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is MLA?"},
    {"role": "assistant", "content": "Multi-head latent attention."},
    {"role": "user", "content": "Why does it save memory? 🙂"},
]
# SentencePiece-style decoders over byte-fallback tokens: Metaspace, and the Replace/Fuse/Strip chain.
BYTE_FALLBACK_DECODERS = {
    "metaspace": lambda: decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]),
    "strip": lambda: decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    ),
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo-tokenizer")
    write_demo_tokenizer(folder, DEMO_VOCAB)
    return folder


@pytest.fixture(scope="module")
def demo(demo_dir) -> Tokenizer:
    return Tokenizer.load(demo_dir)


def _byte_fallback_tokenizer(folder: Path, decoder: str) -> Tokenizer:
    """A Llama-style tokenizer: BPE merges learned on ASCII text, <0x00>..<0xFF> byte tokens for the rest."""
    ascii_bpe = RustTokenizer(models.BPE(unk_token="<unk>"))
    ascii_bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    ascii_bpe.train_from_iterator(
        [CORPUS.encode("ascii", "ignore").decode()],
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    learned = json.loads(ascii_bpe.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = BYTE_FALLBACK_DECODERS[decoder]()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.load(folder)


@pytest.fixture(scope="module")
def tokenizers_under_test(demo, tmp_path_factory) -> dict[str, Tokenizer]:
    root = tmp_path_factory.mktemp("byte-fallback")
    byte_fallback = {f"byte-fallback-{d}": _byte_fallback_tokenizer(root / d, d) for d in BYTE_FALLBACK_DECODERS}
    return {"demo": demo, **byte_fallback}


def _one_line_error(excinfo, *words: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# ---- demo tokenizer ----------------------------------------------------------------------------


def test_demo_tokenizer_is_deterministic(tmp_path, demo_dir):
    names = write_demo_tokenizer(tmp_path / "again", DEMO_VOCAB)
    assert names == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    code = "import sys; from dscompile.model.demo_tokenizer import write_demo_tokenizer; " \
           "write_demo_tokenizer(sys.argv[1], int(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "process"), str(DEMO_VOCAB)], check=True)
    for name in names:
        first = (demo_dir / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first, name
        assert (tmp_path / "process" / name).read_bytes() == first, name


def test_demo_tokenizer_round_trip_bos_and_vocab(demo):
    assert (BOS_ID, EOS_ID) == (0, 1)  # as in DeepSeek's tokenizers
    assert demo.bos_token == BOS and demo.bos_token_id == BOS_ID
    assert demo.eos_token == EOS and demo.eos_token_ids == (EOS_ID,)
    assert demo.generation_defaults == {"do_sample": False}
    assert demo.vocab_size <= DEMO_VOCAB
    for text in TEXTS:
        ids = demo.encode(text)
        assert ids[0] == 0 and 0 not in ids[1:], (text, ids)
        assert all(0 <= i < demo.vocab_size for i in ids), (text, ids)
        assert demo.encode(text, add_special_tokens=False) == ids[1:]
        assert demo.decode(ids) == text
        assert demo.decode(ids, skip_special_tokens=False) == BOS + text
    # The corpus taught it merges: common words take fewer tokens than bytes.
    assert len(demo.encode("the compiler", add_special_tokens=False)) < len("the compiler") // 2


def test_demo_tokenizer_vocab_limits(tmp_path):
    small = write_demo_tokenizer(tmp_path / "small", 300)
    assert len(small) == 3
    assert Tokenizer.load(tmp_path / "small").vocab_size == 300
    with pytest.raises(OptionError) as excinfo:
        write_demo_tokenizer(tmp_path / "tiny", 100)
    _one_line_error(excinfo, "--vocab", "300")
    assert not (tmp_path / "tiny").exists()


# ---- parity with transformers ------------------------------------------------------------------


def test_encode_decode_and_chat_match_transformers(demo_dir, demo):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(demo_dir))
    bare = transformers.PreTrainedTokenizerFast(tokenizer_file=str(demo_dir / "tokenizer.json"))
    for text in TEXTS + [""]:
        ids = demo.encode(text)
        assert auto.encode(text) == ids, text
        assert bare.encode(text) == ids, text
        assert auto.encode(text, add_special_tokens=False) == demo.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert auto.decode(ids, skip_special_tokens=skip) == demo.decode(ids, skip_special_tokens=skip), text
    for prompt in (True, False):
        rendered = demo.render_chat(CHAT, add_generation_prompt=prompt)
        assert rendered == auto.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
    expected = auto.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert demo.encode(demo.render_chat(CHAT), add_special_tokens=False) == expected


def test_demo_chat_template_shape(demo):
    rendered = demo.render_chat(CHAT)
    assert rendered == (
        f"{BOS}You are a terse assistant.\n\nUser: What is MLA?\n\n"
        f"Assistant: Multi-head latent attention.{EOS}User: Why does it save memory? 🙂\n\nAssistant:"
    )
    with pytest.raises(TextError) as excinfo:
        demo.render_chat([{"role": "tool", "content": "x"}])
    _one_line_error(excinfo, "chat template", "unknown role tool")


# ---- streaming ---------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> tuple[list[str], str]:
    stream = tok.stream(skip_special_tokens=skip)
    return [stream.push(i) for i in ids], stream.flush()


@pytest.mark.parametrize("name", ["demo", "byte-fallback-metaspace", "byte-fallback-strip"])
def test_stream_pieces_concatenate_to_decode(tokenizers_under_test, name):
    tok = tokenizers_under_test[name]
    split_inside_character = False
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            pieces, rest = _stream(tok, ids, skip)
            assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip), (text, ids, pieces, rest)
        pieces, _ = _stream(tok, ids, True)
        for k in range(1, len(ids)):
            if tok.decode(ids[:k]).endswith("\ufffd"):  # ids[k - 1] ends in the middle of a character
                split_inside_character = True
                assert pieces[k - 1] == "", (text, k, pieces)
    assert split_inside_character, f"{name}: no text put a token boundary inside a character"


@pytest.mark.parametrize("name", ["demo", "byte-fallback-metaspace", "byte-fallback-strip"])
def test_stream_emits_as_tokens_arrive(tokenizers_under_test, name):
    tok = tokenizers_under_test[name]
    text = "the model 中文 🙂 streams text as it goes"
    ids = tok.encode(text)
    pieces, rest = _stream(tok, ids, True)
    assert rest == "" and "".join(pieces) == tok.decode(ids)
    # Past the emoji only ASCII tokens follow: each is printed when it arrives, not saved for the end.
    after_emoji = next(k for k in range(len(ids)) if "🙂" in tok.decode(ids[:k]))
    assert after_emoji < len(ids) - 4 and all(pieces[after_emoji:]), pieces


@pytest.mark.parametrize("name", ["demo", "byte-fallback-metaspace", "byte-fallback-strip"])
def test_stream_any_id_sequence(tokenizers_under_test, name):
    """Random ids, weighted toward byte and special tokens: broken characters, bos/eos anywhere."""
    tok = tokenizers_under_test[name]
    rng = random.Random(1234)
    special = [0, 1, 2] if name != "demo" else [0, 1]
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]  # bytes of a longer character
    assert len(partial) >= 64
    for _ in range(300):
        pools = [rng.choice((special, partial, partial, range(tok.vocab_size))) for _ in range(rng.randint(1, 16))]
        ids = [rng.choice(pool) for pool in pools]
        for skip in (True, False):
            pieces, rest = _stream(tok, ids, skip)
            assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip), (ids, skip, pieces, rest)


# ---- stop strings ------------------------------------------------------------------------------


def _run_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    cut, out = StopStrings(stops), []
    for piece in pieces:
        text, stopped = cut.feed(piece)
        out.append(text)
        if stopped:
            assert cut.feed("more") == ("", True) and cut.flush() == ""
            return "".join(out), True
    return "".join(out) + cut.flush(), False


def test_stop_strings_cases():
    cut = StopStrings(["</end>"])
    assert cut.feed("hello </e") == ("hello ", False)
    assert cut.feed("nd> ignored") == ("", True)
    assert StopStrings(["STOP"]).feed("STOP and the rest") == ("", True)
    assert StopStrings(["XY"]).feed("before XY after") == ("before ", True)
    cut = StopStrings(["world!"])
    assert cut.feed("hello wor") == ("hello ", False)
    assert cut.flush() == "wor"
    # "ab" could still become "abc": held back until "d" shows it was the start of "bd".
    cut = StopStrings(["abc", "bd"])
    assert cut.feed("xa") == ("x", False)
    assert cut.feed("b") == ("", False)
    assert cut.feed("d") == ("a", True)
    assert _run_stops(["ab", "abc"], ["xa", "bc"]) == ("x", True)
    assert _run_stops(["aab"], ["a", "a", "a", "b"]) == ("a", True)
    assert _run_stops([], ["any", "thing"]) == ("anything", False)
    with pytest.raises(TextError):
        StopStrings(["ok", ""])


def test_stop_strings_match_a_plain_search():
    rng = random.Random(7)
    stops = ["ab", "abc", "ca", "bbb"]
    for _ in range(500):
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = (text[: min(hits)], True) if hits else (text, False)
        assert _run_stops(stops, pieces) == expected, (text, pieces)


# ---- chat template sandbox ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "template,words",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["__class__"]),
        ("{{ cycler.__init__.__globals__ }}", ["__init__"]),
        ("{{ joiner.__init__.__globals__.os.system('true') }}", ["__init__"]),
        ("{% set ns = namespace() %}{{ ns.__init__.__globals__ }}", ["__init__"]),
        ("{{ lipsum.__globals__['os'] }}", ["__globals__"]),
        ("{{ messages[0]|attr('__class__') }}", ["__class__"]),
        ("{{ messages.append(1) }}", ["append"]),
        ("{% include '/etc/passwd' %}", ["loader"]),
        ("{% extends '/etc/passwd' %}", ["loader"]),
        ("{{ raise_exception('no') }}", ["no"]),
        ("{% for m in messages %}{{ m.content }", ["line 1"]),
        ("{{ 1 / 0 }}", ["ZeroDivisionError"]),
    ],
)
def test_chat_template_sandbox_refuses(demo_dir, tmp_path, template, words):
    tok = Tokenizer.load(demo_dir)
    tok.chat_template = template
    with pytest.raises(TextError) as excinfo:
        tok.render_chat(CHAT)
    assert _one_line_error(excinfo, *words).startswith("chat template: ")


def test_chat_template_escape_runs_nothing(demo_dir, tmp_path):
    tok = Tokenizer.load(demo_dir)
    target = tmp_path / "escaped"
    for template in (
        f"{{{{ self.__init__.__globals__.__builtins__.open('{target}', 'w').write('x') }}}}",
        f"{{{{ cycler.__init__.__globals__.os.popen('touch {target}').read() }}}}",
        f"{{{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__['open']('{target}', 'w') }}}}",
        f"{{{{ '{{0.__init__.__globals__}}'.format(cycler) }}}}",
    ):
        tok.chat_template = template
        with pytest.raises(TextError):
            tok.render_chat(CHAT)
        assert not target.exists(), template


def test_chat_messages_and_missing_template(demo_dir):
    tok = Tokenizer.load(demo_dir)
    for bad in ("hello", [{"role": "user"}], [{"role": "user", "content": 3}], ["user: hi"]):
        with pytest.raises(TextError) as excinfo:
            tok.render_chat(bad)
        _one_line_error(excinfo, "chat message")
    tok.chat_template = None
    with pytest.raises(TextError) as excinfo:
        tok.render_chat(CHAT)
    _one_line_error(excinfo, "chat template")


# ---- loading tokenizer files -------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_missing_and_corrupt_files(demo_dir, tmp_path):
    assert Tokenizer.load(tmp_path) is None
    good = (demo_dir / "tokenizer.json").read_bytes()
    cases = {
        "tokenizer.json": [b"\x89PNG\r\n\x1a\n\xff\x00garbage", good[: len(good) // 2], b'{"model": 1}', b"[1, 2]"],
        "generation_config.json": [b"{not json", b'{"eos_token_id": "x"}', b'{"eos_token_id": [1, 99999]}',
                                   b'{"temperature": "hot"}', b'{"do_sample": 1}'],
        "tokenizer_config.json": [b'{"eos_token": "<nope>"}', b'{"bos_token": 7}', b'{"chat_template": 5}',
                                  b'{"add_bos_token": "yes"}', b"\xff"],
    }
    n = 0
    for name, contents in cases.items():
        for content in contents:
            folder = _copy(demo_dir, tmp_path / f"case{n}")
            n += 1
            (folder / name).write_bytes(content)
            with pytest.raises(TextError) as excinfo:
                Tokenizer.load(folder)
            _one_line_error(excinfo, name)


def test_load_optional_files_and_eos_union(demo_dir, tmp_path):
    folder = _copy(demo_dir, tmp_path / "only-json")
    (folder / "tokenizer_config.json").unlink()
    (folder / "generation_config.json").unlink()
    bare = Tokenizer.load(folder)
    assert bare.bos_token is None and bare.eos_token_ids == () and bare.chat_template is None
    assert bare.encode("hi")[0] == 0  # the post-processor still adds bos

    generation = {"eos_token_id": [5, 1], "bos_token_id": 0, "temperature": 0.6, "top_p": 0.95, "top_k": 40,
                  "max_new_tokens": 64, "do_sample": True, "unrelated": 1}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    tok = Tokenizer.load(folder)
    assert tok.eos_token_ids == (5, 1) and tok.eos_token == tok.decode([5], skip_special_tokens=False)
    assert tok.bos_token == BOS and tok.bos_token_id == 0
    assert tok.generation_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "do_sample": True,
                                       "max_new_tokens": 64}

    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": EOS}
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": "{{ bos_token }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(folder)
    assert tok.eos_token_ids == (5, 1) and tok.eos_token == EOS
    assert tok.render_chat(CHAT) == BOS


def test_add_bos_token_without_post_processor(demo_dir, tmp_path):
    folder = _copy(demo_dir, tmp_path / "no-post")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer.load(folder)
    assert tok.encode("hi")[0] == 0 and tok.encode("hi").count(0) == 1
    assert 0 not in tok.encode("hi", add_special_tokens=False)


# ---- UTF-8 checks ------------------------------------------------------------------------------


def test_read_utf8_and_check_utf8(demo):
    assert read_utf8("中文 ok".encode(), "stdin") == "中文 ok"
    with pytest.raises(TextError) as excinfo:
        read_utf8(b"ok \xe4\xb8", "stdin")
    assert str(excinfo.value) == "stdin is not valid UTF-8 (byte 3)"
    check_utf8("café 🙂", "--prompt")
    argv = b"ab\xffcd".decode("utf-8", "surrogateescape")
    with pytest.raises(TextError) as excinfo:
        check_utf8(argv, "--prompt")
    assert str(excinfo.value) == "--prompt is not valid UTF-8 (byte 2)"
    with pytest.raises(TextError):
        demo.encode(argv)
