"""The GPU run's parts and time budget: each part's share and allowance, deadlines inside a part, and
the hard stop a worker raises on itself when it overruns. No torch here: the verb's parser reads it."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

# In run order, most valuable first: the machine's ceilings (short; every fraction of peak needs them),
# then what answers "how fast against diffusers" (the step latency, whose most valuable rows come first,
# then the whole call), then the kernel checks, and the step cache last, with a guaranteed minimum.
PARTS = ("machine", "latency", "e2e", "correctness", "step_cache")
# Seconds per part on an H100 (their sum leaves 30 s of slack in the default budget). Guesses: nothing
# has been timed on a GPU yet; the JSON records what each part and step took, to set them from.
GPU_SHARES = {"machine": 20.0, "latency": 260.0, "e2e": 65.0, "correctness": 55.0, "step_cache": 20.0}
# What a part keeps even when earlier parts overran: no earlier part's allowance reaches into it.
PART_MINIMUMS = {"step_cache": 15.0}
DEFAULT_BUDGET_S = 450.0


class HardStop(BaseException):
    """Raised by the alarm at the hard deadline; a BaseException so that no part's guard swallows it."""


def part_allowance(
    remaining_s: float, share_s: float, later_shares_s: float, later_minimums_s: float = 0.0
) -> float:
    """Seconds a part may use: its share plus what earlier parts left unused, never the shares of the
    parts after it, never their guaranteed minimums, and never more than remains. An earlier overrun
    squeezes later parts first (they are the less valuable ones), down to their minimums."""
    remaining_s = max(0.0, remaining_s)
    return max(0.0, min(remaining_s - later_minimums_s, max(share_s, remaining_s - later_shares_s)))


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


class RowOverrun(Exception):
    """Raised by :func:`time_limit` when one row (a step variant, say) passes its own deadline; the
    row's guard records it and the next row runs."""


def overrun_in(error: BaseException) -> RowOverrun | None:
    """The :class:`RowOverrun` behind ``error`` (a compiler may wrap what interrupted it), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, RowOverrun):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def hard_stop_after(seconds: float) -> Iterator[None]:
    """Raise :class:`HardStop` in the main thread after ``seconds`` (SIGALRM)."""

    def stop(*_: Any) -> None:
        raise HardStop()

    with _alarm(seconds, stop):
        yield


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`RowOverrun` in the main thread when the block runs past ``seconds``, so that one
    expensive row (a quantize-and-compile, say) cannot overrun into the rows and parts after it. Nests
    inside :func:`hard_stop_after`: an outer limit that comes first still fires first, and the outer
    timer is set again (less the time spent here) when the block ends."""

    def overrun(*_: Any) -> None:
        raise RowOverrun(f"{what} passed its own limit of {seconds:.0f} s and was stopped")

    with _alarm(seconds, overrun):
        yield


@contextlib.contextmanager
def _alarm(seconds: float, handler: Callable[..., Any]) -> Iterator[None]:
    """Run ``handler`` on SIGALRM after ``seconds``, unless an alarm already set fires first; the one
    set before is restored afterwards (with the time spent here taken off)."""
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:  # the outer alarm comes first: it alone stays
        yield
        return
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(0.001, outer_left - (time.monotonic() - start)))
