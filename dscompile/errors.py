"""Errors a user can cause. The CLI prints them as one line and exits 2, without a traceback."""


class DscompileError(Exception):
    """Base of every error caused by user input (files, options, shapes)."""


class CheckpointError(DscompileError):
    """A checkpoint folder, its config or one of its tensors is missing, corrupt or unsupported."""


class ConfigError(DscompileError):
    """A config.json field is missing, contradictory or unsupported."""


class EngineError(DscompileError):
    """An engine folder (OUT) is missing, corrupt, or given inputs it cannot take."""


class OptionError(DscompileError):
    """A command-line option has a value outside what the command accepts."""


class TextError(DscompileError):
    """A tokenizer file, chat template, prompt or stop string cannot be used (token ids still work)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): a one-line error's detail."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
