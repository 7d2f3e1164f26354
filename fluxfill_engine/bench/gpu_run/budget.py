"""The GPU run's parts and time budget: each part's share and allowance, deadlines inside a part, and
the hard stop a worker raises on itself when it overruns. No torch here: the verb's parser reads it."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

PARTS = ("machine", "correctness", "latency", "e2e", "step_cache")
# Seconds per part on an H100 (their sum leaves 20 s of slack in the default budget). Guesses: nothing
# has been timed on a GPU yet; the JSON records what each part and step took, to set them from.
GPU_SHARES = {"machine": 15.0, "correctness": 85.0, "latency": 215.0, "e2e": 65.0, "step_cache": 20.0}
DEFAULT_BUDGET_S = 420.0


class HardStop(BaseException):
    """Raised by the alarm at the hard deadline; a BaseException so that no part's guard swallows it."""


def part_allowance(remaining_s: float, share_s: float, later_shares_s: float) -> float:
    """Seconds a part may use: its share plus what earlier parts left unused, never the shares of the
    parts after it, and never more than remains. An earlier overrun squeezes later parts first (they
    are the less valuable ones)."""
    remaining_s = max(0.0, remaining_s)
    return min(remaining_s, max(share_s, remaining_s - later_shares_s))


class Deadline:
    """A point in time on the monotonic clock; ``fits(seconds)`` says whether work of that cost ends
    before it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until = clock() + max(0.0, seconds)

    def left(self) -> float:
        return max(0.0, self.until - self.clock())

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds

    def within(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from now, no later than this one."""
        return Deadline(min(seconds, self.left()), self.clock)


def too_late(what: str, needs_s: float, deadline: Deadline) -> dict[str, Any]:
    return skipped(
        f"{what} needs about {needs_s:.0f} s (estimate); {deadline.left():.0f} s of the budget left"
    )


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason, **extra}


@contextlib.contextmanager
def hard_stop_after(seconds: float) -> Iterator[None]:
    """Raise :class:`HardStop` in the main thread after ``seconds`` (whole seconds, SIGALRM)."""

    def stop(*_: Any) -> None:
        raise HardStop()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(math.ceil(seconds))))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
