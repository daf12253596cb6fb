"""One error type for bad user input, and the 'did you mean' helper every registry uses."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
