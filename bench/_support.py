"""What the bench scripts share. A bench script runs as ``python bench/<name>.py``, so this folder is first on
``sys.path`` and ``from _support import ...`` finds this module."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
               error: type[BaseException] = SystemExit) -> T:
    """``cond()``'s first truthy value, polled every ``interval`` seconds; ``error("timed out waiting for
    <what>")`` once ``timeout`` seconds have passed (SystemExit by default: a bench stops with the reason)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out waiting for {what}")
        time.sleep(interval)
