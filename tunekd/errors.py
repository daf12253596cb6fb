"""One error type for bad user input, and the 'did you mean' helper every registry uses."""

from __future__ import annotations

import difflib
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


def run_cli(run: Callable[..., int], *args) -> int:
    """Run a command; bad input becomes one line on stderr and exit code 2."""
    try:
        return run(*args)
    except ConfigError as exc:
        text = str(exc)
        print(f"tunekd: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return EXIT_CONFIG
