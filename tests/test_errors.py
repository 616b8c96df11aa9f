"""dscompile.errors.first_line: the one-line detail of an exception, whatever its message."""

from __future__ import annotations

import pytest
import typer

from dscompile.cli import guard
from dscompile.errors import EngineError, OptionError, first_line


def test_first_line_of_a_long_message():
    assert first_line(EngineError("weights.bin: truncated\n  at offset 4096")) == "weights.bin: truncated"
    assert first_line(RuntimeError("\n  cannot load\nTraceback ...")) == "cannot load"


@pytest.mark.parametrize("err", [RuntimeError(), RuntimeError(""), RuntimeError(" \n \n"), EngineError()])
def test_first_line_of_an_empty_message_is_the_type(err):
    """No message (or only blank lines): the type names what failed, instead of an IndexError."""
    assert first_line(err) == type(err).__name__


def test_the_cli_prints_an_error_without_a_message_as_one_line(capsys):
    with pytest.raises(typer.Exit) as done, guard():
        raise OptionError()
    assert done.value.exit_code == 2 and capsys.readouterr().err == "error: OptionError\n"
