"""One error type for bad user input, the 'did you mean' helper every registry uses, and the exception and
exit codes of a stop signal."""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
from collections.abc import Callable, Iterable

EXIT_CONFIG = 2


class ConfigError(ValueError):
    """Bad input from a study file, the command line or the data: one clear line, exit code 2."""


def unknown(kind: str, name: object, known: Iterable[str]) -> ConfigError:
    """`unknown strategy 'foward'; known: none, forward, ... (did you mean 'forward'?)`."""
    known = list(known)
    msg = f"unknown {kind} {name!r}; known: {', '.join(known)}"
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    return ConfigError(msg)


def not_utf8(path: str | os.PathLike, exc: UnicodeDecodeError, data: bytes | None = None) -> ConfigError:
    """`data/train.tsv: not UTF-8 text (byte 0xe9 at line 3); save it as UTF-8`. `data` (the whole file)
    locates the byte; without it (a streamed file) the position is left out."""
    where = ""
    if data is not None:
        line = data[:exc.start].count(b"\n") + 1
        where = f" (byte 0x{data[exc.start]:02x} at line {line})"
    return ConfigError(f"{os.fspath(path)}: not UTF-8 text{where}; save it as UTF-8")


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's contents; bytes that are not UTF-8 are one ConfigError naming the file."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, data) from None


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}  # stop a study


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) ended the command: exit code 128 + the signal's number
    (130, 143, 129), as a shell reports a process the signal killed."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted ({SIGNAL_NAMES.get(signum, f'signal {signum}')})")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`tunekd: error: ...`, exit 2) like every other bad input,
    instead of the usage block."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"tunekd: error: {message} (see {self.prog} --help)\n")


def run_cli(run: Callable[..., int], *args) -> int:
    """Run a command; bad input becomes one line on stderr and exit code 2, a stop signal that ended it
    (`Interrupted`) one line and 128 + its number."""
    try:
        return run(*args)
    except Interrupted as exc:
        print(f"tunekd: {exc}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        text = str(exc)
        print(f"tunekd: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return EXIT_CONFIG
