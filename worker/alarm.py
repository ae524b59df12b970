"""An alarm at the next expiry, so a Redis call that hangs cannot hold a ban past its time.

The worker's loop talks to Redis and to the kernel on one thread (libiptc must stay on one
thread). When Redis is frozen (SIGSTOP, a stalled network) a call waits for its socket
timeout, and the timed rules due meanwhile would stay in the kernel. Before each pass the
worker arms ``SIGALRM`` a little past the next expiry; if the pass has not returned by then,
the handler raises :class:`ExpiryDue` out of the Redis call, and the loop drops its Redis
connections (their state is unknown), removes what is due and goes on. Kernel work is never
interrupted: inside :meth:`ExpiryAlarm.kernel` the alarm only waits.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["ExpiryAlarm", "ExpiryDue"]

MARGIN_S = 0.5
"""How long past an expiry a Redis call may run before it is cut short."""


class ExpiryDue(Exception):
    """Raised from the alarm: a timed rule is due while a Redis call has not returned."""


class ExpiryAlarm:
    """``SIGALRM`` at the next expiry; only for a worker that runs in the main thread."""

    def __init__(self) -> None:
        self.installed = False
        self._watching = False
        self._in_kernel = False

    def install(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)
        self.installed = True

    @contextlib.contextmanager
    def watch(self, ms_until_due: int | None) -> Iterator[None]:
        """One pass of the loop, cut short ``ms_until_due`` (plus the margin) from now.

        None (no timed rule) arms nothing. On leaving, however it is left, the alarm is off.
        """
        if not self.installed or ms_until_due is None:
            yield
            return
        self._watching = True
        signal.setitimer(signal.ITIMER_REAL, max(0, ms_until_due) / 1000 + MARGIN_S)
        try:
            yield
        finally:
            self._watching = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def kernel(self) -> Iterator[None]:
        """A section the alarm never interrupts: a commit and the index update after it."""
        outer, self._in_kernel = self._in_kernel, True
        try:
            yield
        finally:
            self._in_kernel = outer

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._watching and not self._in_kernel:
            self._watching = False  # once: the loop's own handling is never cut short
            raise ExpiryDue
