"""A worker's exit waits for the trial thread Tune has just stopped (`tunekd.thread_exit`).

Each case runs Tune's pattern in a fresh interpreter: a daemon thread blocks in "tune.report" (a lock),
the main thread sets the stop, releases it and exits at once; the thread then raises SystemExit(0) there,
and freeing the trial's state (an object whose finaliser takes 0.5 s and then writes a file, standing in for
torch tensors) must finish before the interpreter finalises. Without `thread_exit` the file is never written:
the control case shows the race the module closes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from tunekd import thread_exit

SCRIPT = """
import sys, threading, time
from pathlib import Path
from tunekd import thread_exit

GUARDED = {guarded}
marker = Path(sys.argv[1])
lock, stop, waiting = threading.Lock(), threading.Event(), threading.Event()
lock.acquire()

class TrialState:  # freed slowly, like a model's tensors
    def __del__(self):
        time.sleep(0.5)
        marker.write_text("freed")

def report():  # Tune's report: wait for the driver, exit when told to stop
    waiting.set()
    lock.acquire()
    if stop.is_set():
        sys.exit(0)

def trial():
    state = TrialState()
    for epoch in range(3):
        if GUARDED:
            with thread_exit.reporting():
                report()
        else:
            report()

def target():  # Ray's RunnerThread: a SystemExit(0) ends the thread quietly
    try:
        if GUARDED:
            with thread_exit.stoppable():
                trial()
        else:
            trial()
    except SystemExit:
        pass

threading.Thread(target=target, daemon=True).start()
waiting.wait(10)
stop.set()
lock.release()  # Tune's cleanup: release the thread, do not wait for it
sys.exit(0)
"""


def _run(tmp_path, guarded: bool) -> tuple[subprocess.CompletedProcess, bool]:
    marker = tmp_path / f"freed_{guarded}"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(guarded=guarded), str(marker)], capture_output=True,
                          text=True, timeout=60)
    return proc, marker.exists()


def test_exit_waits_for_a_stopped_trial_to_free_its_state(tmp_path):
    proc, freed = _run(tmp_path, guarded=True)
    assert proc.returncode == 0, proc.stderr
    assert freed, "the worker exited while its stopped trial was still freeing"
    assert "Fatal Python error" not in proc.stderr


def test_without_it_the_trial_is_cut_off_while_freeing(tmp_path):
    # the control: the same process without thread_exit finalises while the thread frees, which is the race
    proc, freed = _run(tmp_path, guarded=False)
    assert proc.returncode == 0, proc.stderr
    assert not freed


def test_a_thread_still_waiting_is_given_up_after_the_timeout():
    # a thread marked in report that nobody releases does not hold the exit beyond the timeout
    gate, entered = threading.Event(), threading.Event()

    def target():
        with thread_exit.reporting():
            entered.set()
            gate.wait(30)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    entered.wait(10)
    t0 = time.perf_counter()
    left = thread_exit.join_released(timeout=0.2)
    assert left == [thread] and time.perf_counter() - t0 < 5
    gate.set()
    thread.join(10)
    assert thread_exit.join_released(timeout=0.2) == []  # a normal return clears the mark


def test_a_trial_that_ends_normally_or_fails_is_not_waited_for():
    def run(body):
        with thread_exit.stoppable():
            body()

    run(lambda: None)
    with pytest.raises(ValueError, match="boom"):  # passed on, not swallowed
        run(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert thread_exit.join_released(timeout=0.1) == []


def test_the_stop_keeps_its_exit_code():
    with pytest.raises(SystemExit) as stop:  # the thread still exits as Tune asked
        with thread_exit.stoppable():
            with thread_exit.reporting():
                sys.exit(0)
    assert stop.value.code == 0
    assert thread_exit.join_released(timeout=0.1) == []
