"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input (a config value, a missing file). The message names the key or file and the fix."""
