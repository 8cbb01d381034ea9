"""Ctrl-C and SIGTERM end a controller the same way, and never cut its cleanup short.

`stop_on_signals(stop)` makes SIGINT and SIGTERM call `stop()` while a run is deployed or
under way (set handlers explicitly: a shell that starts us in the background ignores
SIGINT, and SIGTERM's default would end the process with every node left running).
`shielded()` covers the removal of every node and link: a second Ctrl-C or a SIGTERM
then only says that removal is under way. Both restore the handlers they replaced, and
do nothing outside the main thread (where Python cannot set handlers).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt(*_) -> None:
    """A `stop` that ends what the main thread is doing, as Ctrl-C does."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, h)


def stop_on_signals(stop: Callable[..., None]) -> contextlib.AbstractContextManager:
    """SIGINT and SIGTERM call `stop(signum, frame)` inside the block."""
    return _handlers(stop)


def shielded(what: str = "removing every node and link") -> contextlib.AbstractContextManager:
    """SIGINT and SIGTERM only say that `what` is under way inside the block."""
    def wait(signum, _frame):
        print(f"controller: {signal.Signals(signum).name} while {what}: finishing that first "
              f"(it ends by itself)", file=sys.stderr, flush=True)
    return _handlers(wait)
