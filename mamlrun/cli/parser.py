"""argparse for mamlrun's plain subcommands (`report`, `reproduce`, `checkpoint`), with their
errors as every other mamlrun error: one line, exit status 2."""

from __future__ import annotations

import argparse
from typing import NoReturn

from mamlrun.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints its usage, then the error (several lines, of which the error is the
    last); here the error is the line, and it says where the usage is."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see {self.prog} --help")
