"""A Ray worker's exit waits for the trial thread that Tune has just told to stop.

Ray Tune runs a function trainable in a daemon thread. It stops a trial (ASHA's stop, the end of a study,
an actor it does not reuse) by setting a stop flag and releasing the thread blocked in `tune.report`, which
then raises `SystemExit(0)` there; `cleanup` joins the thread with timeout 0 and the actor process exits.
The thread meanwhile unwinds: the exception's traceback holds the trial's frames, so the model, optimizer
and batches are freed when Ray's thread runner drops the exception. If the interpreter has begun to
finalise by then, a daemon thread that takes the GIL is ended by `pthread_exit`, whose forced unwind
through torch's non-throwing C++ destructors (`THPVariable_dealloc`) calls `std::terminate`: "*** SIGABRT
received", "Fatal Python error: Aborted" and a native stack on the console of a study that succeeded.

Two parts remove the race:
- `reporting()` marks the thread while it waits inside `tune.report`, the only place Tune stops it; on a
  normal return the mark is cleared.
- `stoppable()` around the trial catches the `SystemExit`, frees the trial's frames (their locals, then a
  garbage collection) in the thread itself, clears the mark, and exits the thread as Tune asked.
An `atexit` handler (registered once per process; atexit handlers run before finalisation begins) joins
every marked thread, up to `WAIT_S` each. A thread that is training (not in `tune.report`) is not waited
for: only a released thread is sure to end soon.
"""

from __future__ import annotations

import atexit
import gc
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

# how long a worker's exit waits for one released trial thread to finish freeing (it takes well under a second)
WAIT_S = 10.0

_RELEASED: set[threading.Thread] = set()  # threads inside `tune.report` or unwinding the stop
_LOCK = threading.Lock()
_REGISTERED: list[bool] = []


def _mark(on: bool) -> None:
    thread = threading.current_thread()
    with _LOCK:
        (_RELEASED.add if on else _RELEASED.discard)(thread)


def join_released(timeout: float = WAIT_S) -> list[threading.Thread]:
    """Join every marked thread (the atexit handler); returns those still alive after `timeout`."""
    with _LOCK:
        threads = [t for t in _RELEASED if t is not threading.current_thread()]
    for thread in threads:
        thread.join(timeout)
    return [t for t in threads if t.is_alive()]


@contextmanager
def reporting() -> Iterator[None]:
    """Around `tune.report`: the thread is marked while Tune may stop it there."""
    _mark(True)
    yield  # a SystemExit from Tune passes through with the mark kept: `stoppable` clears it once freed
    _mark(False)


@contextmanager
def stoppable() -> Iterator[None]:
    """Around a trial in Tune's thread: a stop by `SystemExit` frees the trial in this thread, then exits it."""
    with _LOCK:
        if not _REGISTERED:
            atexit.register(join_released)
            _REGISTERED.append(True)
    stopped, code = False, None
    try:
        yield
    except SystemExit as stop:
        stopped, code = True, stop.code
        # the frames of the trial (model, optimizer, batches) are freed here, not by whoever drops the exception
        traceback.clear_frames(stop.__traceback__)
    finally:
        if not stopped:
            _mark(False)
    if not stopped:
        return
    gc.collect()
    _mark(False)
    raise SystemExit(code)
