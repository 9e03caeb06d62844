"""Running a command through typer's CliRunner, and what every user error must look like."""

from __future__ import annotations

from typer.testing import CliRunner

from nmgrad_cli.cli.app import app

runner = CliRunner()


def invoke(command: str, *args):
    """``nmgrad COMMAND ARGS...``; whatever happens, never a traceback, never a stray exception."""
    result = runner.invoke(app, [command, *map(str, args)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assert_user_error(result, match: str, code: int = 2) -> None:
    """Exit ``code`` and exactly one line on stderr: ``error: ...`` containing ``match``."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]
