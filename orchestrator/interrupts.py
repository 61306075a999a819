"""Ctrl-C through Ray Tune: make it mean what it means everywhere else (KeyboardInterrupt); SIGTERM alike.

`Tuner.fit()` swaps in its own SIGINT handler: the first Ctrl-C stops the experiment gracefully
(its state is saved, so `distill sweep --resume` can continue) and `fit()` then *returns* as if the
sweep had finished. Left alone, the driver would go on to pick a champion from half a sweep and
close its MLflow run FINISHED. Tune puts the previous handler back only when that Ctrl-C came, so
the handler in place after `fit()` tells which happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
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


class Terminated:
    """Whether SIGTERM arrived while `sigterm_as_ctrl_c` was in force (the exit code then says 143, not 130)."""

    seen = False


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Make SIGTERM (`ray job stop`, Kubernetes, a batch scheduler) do what Ctrl-C does.

    It is turned into a SIGINT to this process, so whichever SIGINT handler is in place acts:
    Python's KeyboardInterrupt (run scopes end KILLED) or Tune's graceful stop (state saved for --resume).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        Terminated.seen = True
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
