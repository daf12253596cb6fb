"""Progress bars (tqdm) with rate and ETA: the teacher fine-tune, the teacher-output cache build and the
study as a whole. Quiet when stderr is not a terminal (logs, CI, pipes) or with TUNEKD_PROGRESS=0;
TUNEKD_PROGRESS=1 forces them on. Log lines go through `write` so that they do not tear a bar.
"""

from __future__ import annotations

import os
import sys

_BARS: list = []  # the open bars, so that `write` can print above them


def enabled() -> bool:
    flag = os.environ.get("TUNEKD_PROGRESS", "")
    if flag in ("0", "1"):
        return flag == "1"
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(total: int | None, desc: str, unit: str = "it", **kw):
    """A tqdm bar on stderr (disabled — nothing printed — when `enabled()` is false)."""
    from tqdm import tqdm

    b = tqdm(total=total, desc=desc, unit=unit, disable=not enabled(), leave=False, dynamic_ncols=True,
             file=sys.stderr, **kw)
    if not b.disable:
        _BARS.append(b)
        close = b.close

        def _close():
            if b in _BARS:
                _BARS.remove(b)
            close()

        b.close = _close
    return b


def write(line: str) -> None:
    """Print a log line on stdout, above any open bar."""
    if _BARS:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


class StudyProgress:
    """The study's bar: trials finished out of the total, with running / completed / stopped / failed
    counts, rate and ETA. The driver's Tune callback calls `started`, `ended` (and `close` at the end)."""

    STATES = ("running", "completed", "early_stopped", "failed")

    def __init__(self, total: int, desc: str = "study"):
        self.total = total
        self.status: dict[str, str] = {}
        self.done = 0  # trials ended
        self.bar = bar(total, desc, unit="trial")

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in self.STATES}
        for s in self.status.values():
            out[s] = out.get(s, 0) + 1
        return out

    def _refresh(self) -> None:
        c = self.counts()
        self.bar.set_postfix_str(f"running {c['running']}, done {c['completed']}, stopped {c['early_stopped']}, "
                                 f"failed {c['failed']}", refresh=True)

    def started(self, trial_id: str) -> None:
        self.status[trial_id] = "running"
        self._refresh()

    def ended(self, trial_id: str, status: str) -> None:
        if self.status.get(trial_id) not in (None, "running"):
            return  # reported before
        self.status[trial_id] = status
        self.done += 1
        self.bar.update(1)
        self._refresh()

    def close(self) -> None:
        self.bar.close()
