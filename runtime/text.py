"""The text layer of `dscompile run --prompt/--chat`: tokenizer files, chat templates, streaming, stop strings.

Engines take and return token ids; this module turns text into ids and ids back into text.

- `Tokenizer` reads the tokenizer files a checkpoint ships (`TOKENIZER_FILES`; export copies them
  next to the engine with `copy_tokenizer`, which checks they load first): tokenizer.json through the Rust `tokenizers` library, the special tokens and
  chat template of tokenizer_config.json, and the end-of-sequence ids and sampling defaults of
  generation_config.json. Encoding follows transformers' fast tokenizers, so ids match what the
  model saw in training.
- A chat template is Jinja code that comes with the checkpoint. It renders in jinja2's immutable
  sandbox without a loader (no include, import or extends can reach a file), and the first unsafe
  attribute access fails the render instead of quietly printing nothing.
- `DetokenizeStream` prints generated text as tokens arrive without ever printing half a character
  or losing a space: the concatenated pieces always equal `Tokenizer.decode` of all the ids.
- `StopStrings` ends generation at the first stop string, also one split across pieces.

Every problem with these files, a template, or text from the user is a one-line `TextError`;
generation from token ids works without any of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import tokenizers
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dscompile.errors import TextError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# generation_config.json fields used as sampling defaults, with the JSON types each accepts.
GENERATION_FIELDS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "repetition_penalty": (int, float),
    "do_sample": (bool,),
    "max_new_tokens": (int,),
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback token
_REPLACEMENT = "\ufffd"  # what decoding gives for bytes that are not (yet) a whole UTF-8 character


def read_utf8(data: bytes, what: str) -> str:
    """`data` decoded as UTF-8; TextError naming `what` and the offset of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{what} is not valid UTF-8 (byte {e.start})") from None


def check_utf8(text: str, what: str) -> None:
    """TextError if `text` holds lone surrogates (how Python passes argv bytes that are not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextError(f"{what} is not valid UTF-8 (byte {len(text[: e.start].encode('utf-8'))})") from None


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template and the ids that end generation."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: tuple[int, ...],
        add_bos_token: bool,
        chat_template: str | None,
        generation_defaults: dict,
        byte_fallback: bool,
    ):
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = None if bos_token is None else backend.token_to_id(bos_token)
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.generation_defaults = generation_defaults
        self._add_bos = add_bos_token
        self._byte_fallback = byte_fallback
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    @staticmethod
    def load(folder: Path) -> "Tokenizer | None":
        """The tokenizer in `folder`; None when it has no tokenizer.json. Bad files raise TextError."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            return None
        text = _read_text(path)
        spec = _parse_json(text, path)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust library reports every malformed field as a bare Exception
            raise TextError(f"{path}: not a tokenizer the tokenizers library can read ({_one_line(e)})") from None
        vocab_size = backend.get_vocab_size(with_added_tokens=True)

        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        tokens = {key: _token_text(config, key, config_path) for key in ("bos_token", "eos_token")}
        for key, token in tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise TextError(f"{config_path}: {key} {token!r} is not a token of {path.name}")
        add_bos = config.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise TextError(f"{config_path}: add_bos_token must be true or false, not {_short(add_bos)}")

        gen_path = folder / "generation_config.json"
        generation = _read_json(gen_path) if gen_path.is_file() else {}
        bos_id = _token_ids(generation, "bos_token_id", gen_path, vocab_size)
        eos_ids = _token_ids(generation, "eos_token_id", gen_path, vocab_size)
        if tokens["bos_token"] is None and bos_id:
            tokens["bos_token"] = backend.id_to_token(bos_id[0])
        if tokens["eos_token"] is not None:
            eos_ids.append(backend.token_to_id(tokens["eos_token"]))
        elif eos_ids:
            tokens["eos_token"] = backend.id_to_token(eos_ids[0])

        return Tokenizer(
            backend,
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"],
            eos_token_ids=tuple(dict.fromkeys(eos_ids)),
            add_bos_token=add_bos,
            chat_template=_chat_template(config.get("chat_template"), config_path),
            generation_defaults=_generation_defaults(generation, gen_path),
            byte_fallback=_has_byte_fallback(spec.get("decoder")),
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the special tokens transformers' fast tokenizers add.

        That is what tokenizer.json's post-processor adds, plus bos when tokenizer_config.json sets
        add_bos_token and the post-processor did not add it. A rendered chat already starts with
        bos: encode it with add_special_tokens=False.
        """
        check_utf8(text, "text to encode")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids`; ids outside the vocabulary decode to nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{"role": str, "content": str}, ...]), sandboxed."""
        if self.chat_template is None:
            raise TextError("chat template: the checkpoint's tokenizer_config.json has none")
        turns = _check_messages(messages)
        variables: dict[str, Any] = {"messages": turns, "add_generation_prompt": add_generation_prompt}
        for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token)):
            if token is not None:  # absent rather than "None", as transformers leaves an unset token
                variables[name] = token
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(self.chat_template).render(**variables)
        except TemplateSyntaxError as e:
            raise TextError(f"chat template: line {e.lineno}: {_one_line(e.message or e)}") from None
        except TemplateError as e:  # SecurityError, undefined values, raise_exception(...)
            raise TextError(f"chat template: {_one_line(e)}") from None
        except Exception as e:  # the template is checkpoint code: whatever it raises is its error
            raise TextError(f"chat template: {type(e).__name__}: {_one_line(e)}") from None

    def stream(self, *, skip_special_tokens: bool = True) -> "DetokenizeStream":
        """A new incremental decoder for one generated sequence."""
        return DetokenizeStream(self, skip_special_tokens=skip_special_tokens)

    def _defers(self, token_id: int, skip_special_tokens: bool) -> bool:
        """Whether the text of everything pushed so far may still change with the next token.

        Only with a ByteFallback decoder: it decodes a whole run of consecutive byte tokens at once
        and turns every byte of the run into U+FFFD if the run is not valid UTF-8, so text already
        complete inside a run is final only once the run ends. Skipped special tokens do not end it.
        """
        if not self._byte_fallback:
            return False
        if skip_special_tokens and token_id in self._special_ids:
            return True
        return _BYTE_TOKEN.fullmatch(self._backend.id_to_token(token_id) or "") is not None


def copy_tokenizer(config: Path, folder: Path, vocab_size: int) -> dict[str, Any] | None:
    """Copy the tokenizer files (those present) beside the checkpoint's `config` into `folder`, after
    checking they load and fit the model's `vocab_size`.

    Returns the manifest's `tokenizer` entry (files, bos and eos ids, the latter also config.json's,
    whether a chat template came), or None when there is no tokenizer.json: the engine runs token
    ids only.
    """
    source = config.parent
    tokenizer = Tokenizer.load(source)
    if tokenizer is None:
        return None
    if tokenizer.vocab_size > vocab_size:
        raise TextError(f"{source / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary of {vocab_size}")
    files = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in files:
        shutil.copyfile(source / name, folder / name)
    eos = set(tokenizer.eos_token_ids)
    config_eos = json.loads(config.read_text()).get("eos_token_id")
    eos.update(i for i in (config_eos if isinstance(config_eos, list) else [config_eos])
               if isinstance(i, int) and 0 <= i < vocab_size)
    return {"files": files, "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": sorted(eos),
            "chat_template": tokenizer.chat_template is not None, "vocab_size": tokenizer.vocab_size}


class DetokenizeStream:
    """Incremental decoding: `push` each generated id, `flush` at the end.

    Decoders depend on context (a SentencePiece decoder drops the leading space of the first token,
    byte tokens only make a character together), so each push decodes a window: the ids of the
    previous emitted piece (`_start`..`_done`) plus everything since. The window starts where a
    piece ended, so its first token is decoded the same way in both decodes below, and the new text
    is what the whole window adds after the previous piece. Nothing is emitted while the text ends
    with U+FFFD (a character split across tokens) or while `Tokenizer._defers` says it may change.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # first id of the decode window
        self._done = 0  # the text of ids before this one has been emitted

    def push(self, token_id: int) -> str:
        """The new text `token_id` completes; "" while it waits for the rest of a character."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if self._tokenizer._defers(token_id, self._skip):
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held at the end (an unfinished character decodes to U+FFFD, as in decode)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        emitted = self._tokenizer.decode(self._ids[self._start : self._done], skip_special_tokens=self._skip)
        text = self._tokenizer.decode(self._ids[self._start :], skip_special_tokens=self._skip)
        if len(text) <= len(emitted) or (not final and text.endswith(_REPLACEMENT)):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(emitted) :]


class StopStrings:
    """Cuts streamed text at the first occurrence of any stop string, also across pieces."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise TextError("a stop string must not be empty")
        self._stops = tuple(stops)
        self._held = ""  # the tail that may be the start of a stop string
        self._stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached). After a stop: ("", True)."""
        if self._stopped:
            return "", True
        text = self._held + piece
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if found:
            self._stopped, self._held = True, ""
            return text[: min(found)], True
        keep = self._partial_stop(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail, when generation ended without reaching a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-k:]):
                    longest = k
                    break
        return longest


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, failing at the first unsafe attribute rather than rendering it empty."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to {type(obj).__name__}.{attribute} is not allowed")


def _raise_exception(message: str) -> None:
    """The `raise_exception(msg)` helper chat templates call to refuse a conversation."""
    raise TemplateError(str(message))


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """Copies of the role and content of each message; TextError for anything else."""
    if not isinstance(messages, list):
        raise TextError(f'chat messages must be a list of {{"role": str, "content": str}}, not {_short(messages)}')
    for n, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TextError(f'chat message {n} must be {{"role": str, "content": str}}, not {_short(m)}')
        check_utf8(m["role"], f"chat message {n} role")
        check_utf8(m["content"], f"chat message {n} content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; TextError naming the file for unreadable, non-UTF-8 or bad JSON."""
    return _parse_json(_read_text(path), path)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TextError(f"{path}: cannot be read ({e.strerror})") from None
    return read_utf8(data, str(path))


def _parse_json(text: str, path: Path) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TextError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TextError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _token_text(config: dict, key: str, path: Path) -> str | None:
    """A special token of tokenizer_config.json: a string, an AddedToken object {"content": ...}, or null."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TextError(f"{path}: {key} must be a string or {{\"content\": string}}, not {_short(config.get(key))}")
    return value


def _token_ids(generation: dict, key: str, path: Path, vocab_size: int) -> list[int]:
    """A token id field of generation_config.json (an id, a list of ids, or absent) as a list."""
    value = generation.get(key)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise TextError(f"{path}: {key} must be token ids below the vocabulary size {vocab_size}, not {_short(value)}")
    return ids


def _chat_template(value: Any, path: Path) -> str | None:
    """The template string; from a list of {"name", "template"} the one named "default"."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is not None and not isinstance(value, str):
        raise TextError(f"{path}: chat_template must be a string or a list of {{\"name\", \"template\"}}")
    return value


def _generation_defaults(generation: dict, path: Path) -> dict:
    """The sampling fields of generation_config.json that are present, type-checked."""
    defaults = {}
    for key, types in GENERATION_FIELDS.items():
        value = generation.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise TextError(f"{path}: {key} must be {' or '.join(t.__name__ for t in types)}, not {_short(value)}")
        defaults[key] = value
    return defaults


def _has_byte_fallback(decoder: Any) -> bool:
    """Whether a tokenizer.json decoder (possibly a Sequence) contains a ByteFallback step."""
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == "ByteFallback" or any(_has_byte_fallback(d) for d in decoder.get("decoders") or [])


def _one_line(error: Any, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    return _one_line(repr(value), 60)
