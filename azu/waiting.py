"""Waiting with a deadline: poll a condition until it holds, never a bare sleep.

One loop for the command lines (``azu up``, ``azu wallet``), the tests (``tests.support.wait_for``) and the
benches (``bench/_support.py``); each says what a timeout is in its world through ``error``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T | None], timeout: float, what: str, *, interval: float = 0.05,
               error: Callable[[str], BaseException] = TimeoutError,
               each: Callable[[], None] | None = None) -> T:
    """``cond()``'s first truthy value, polled every ``interval`` seconds (``each()`` runs before every
    poll: a check that may raise, such as "is the child process still alive"); after ``timeout`` seconds,
    raise ``error("timed out after <timeout>s waiting for <what>")``."""
    deadline = time.monotonic() + timeout
    while True:
        if each is not None:
            each()
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)  # polling interval of a deadline wait, not a synchronization
