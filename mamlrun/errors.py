"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input (a config value, a missing file). The message names the key or file and the fix."""


class ConfigError(UserError):
    """A config value mamlrun cannot run with. The message names the key and the fix."""


def fail(command: str, message: str, exit_code: int = 2) -> NoReturn:
    """End the command with one line on stderr and exit status 2 (bad input, not a bug), or
    `exit_code` (128 + signal for a run a signal stopped)."""
    kind = "error: " if exit_code == 2 else ""
    print(f"mamlrun {command}: {kind}{message}", file=sys.stderr)
    raise SystemExit(exit_code)
