"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""

import sys
from typing import NoReturn


class UserError(Exception):
    """Bad input (a config value, a missing file). The message names the key or file and the fix."""


class ConfigError(UserError):
    """A config value mamlrun cannot run with. The message names the key and the fix."""


def fail(command: str, message: str) -> NoReturn:
    """End the command with one line on stderr and exit status 2 (bad input, not a bug)."""
    print(f"mamlrun {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
