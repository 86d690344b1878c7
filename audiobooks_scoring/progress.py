"""Progress of long work, told to whoever listens (the command line's progress bars).

The library reports with `report(task, done, total)`; nothing listens unless a caller
installs a listener with `listening(...)`, so reporting costs nothing in production runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, float, float], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def active() -> bool:
    """Whether anyone listens (callers skip work done only for progress, e.g. counting)."""
    return bool(_listeners)


def report(task: str, done: float, total: float) -> None:
    """Tell the listeners that `done` of `total` units of `task` are finished."""
    for listener in list(_listeners):
        listener(task, done, total)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every report to `listener` while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
