"""Ctrl-C through Ray Tune and Ray Train: make it mean what it means everywhere else (KeyboardInterrupt); SIGTERM alike.

`Tuner.fit()` swaps in its own SIGINT handler: the first Ctrl-C stops the experiment gracefully
(its state is saved, so `distill sweep --resume` can continue) and `fit()` then *returns* as if the
sweep had finished. Left alone, the driver would go on to pick a champion from half a sweep and
close its MLflow run FINISHED. Tune puts the previous handler back only when that Ctrl-C came, so
the handler in place after `fit()` tells which happened.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any


def fit_noticing_ctrl_c(tuner: Any) -> Any:
    """`tuner.fit()`, raising KeyboardInterrupt after Tune's graceful stop on Ctrl-C."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    ours = signal.getsignal(signal.SIGINT) if in_main_thread else None
    tune_catches = in_main_thread and ours is not None and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    try:
        results = tuner.fit()
    finally:
        interrupted = tune_catches and signal.getsignal(signal.SIGINT) is ours
        if ours is not None:
            # Without a Ctrl-C, Tune leaves its handler installed: a later Ctrl-C would only set a dead flag.
            signal.signal(signal.SIGINT, ours)
    if interrupted:
        raise KeyboardInterrupt
    return results


def train_fit_noticing_ctrl_c(trainer: Any) -> Any:
    """`trainer.fit()` of a Ray Train trainer, raising KeyboardInterrupt if Ctrl-C (or SIGTERM) came during it.

    In the main thread, Ray Train 2.60's fit() installs its own SIGINT handler, which aborts the run
    gracefully; fit() then fails like any failed run (runs would end FAILED, exit 1), and the handler
    stays installed after it, aborting a controller that no longer exists. Which Python handler ran
    cannot be seen afterwards, but the signal wakeup fd hears every signal the process receives.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # in a Tune trial: Ray Train installs nothing, Tune handles Ctrl-C
    ours = signal.getsignal(signal.SIGINT)
    heard, writer = socket.socketpair()
    heard.setblocking(False)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    failure: BaseException | None = None
    try:
        result = trainer.fit()
    except BaseException as exc:  # an aborted run fails (or Ray's handler exits); below: did a Ctrl-C do that?
        failure = exc
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, ours)
        signals = _drain(heard)
        heard.close()
        writer.close()
    if signal.SIGINT in signals:
        raise KeyboardInterrupt from failure
    if failure is not None:
        raise failure
    return result


def _drain(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Terminated:
    """Whether SIGTERM arrived while `ctrl_c_never_lost` was in force (the exit code then says 143, not 130)."""

    seen = False
    forwarding = False  # whether ctrl_c_never_lost is in force


@contextlib.contextmanager
def ctrl_c_never_lost() -> Iterator[None]:
    """Make every Ctrl-C, and every SIGTERM (`ray job stop`, Kubernetes, a batch scheduler), stop the command.

    SIGTERM is turned into a SIGINT to this process, so whichever SIGINT handler is in place acts:
    Python's KeyboardInterrupt (run scopes end KILLED) or Tune's graceful stop (state saved for --resume).
    A KeyboardInterrupt that lands while the main thread runs a garbage-collector callback or a
    `__del__` (SQLAlchemy and Ray run plenty) is printed as "Exception ignored" and dropped by Python:
    the command would go on as if never interrupted. Such a dropped one is delivered again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous_term = signal.signal(signal.SIGTERM, _forward_sigterm)
    previous_hook = sys.unraisablehook

    def redeliver_dropped_interrupt(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # From another thread, a moment later: in this one the handler would run before the hook
            # returns and be dropped again. Landing in a finalizer again just comes back here.
            threading.Timer(0.05, _thread.interrupt_main, args=(signal.SIGINT,)).start()
            return
        previous_hook(unraisable)

    sys.unraisablehook = redeliver_dropped_interrupt
    Terminated.forwarding = True
    try:
        yield
    finally:
        Terminated.forwarding = False
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous_term)


def _forward_sigterm(signum, frame) -> None:
    Terminated.seen = True
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started by a script with `cmd &`, SIGINT is ignored: the SIGINT raised below (and any
        # re-delivery of it) would vanish, and the SIGTERM with it. A SIGTERM must still stop us.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.raise_signal(signal.SIGINT)


def reclaim_sigterm() -> None:
    """Put our SIGTERM handler back after `ray.init`, which replaces it with a bare `sys.exit`
    (no KILLED runs, and a SystemExit raised wherever the main thread happens to be)."""
    if Terminated.forwarding and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _forward_sigterm)
