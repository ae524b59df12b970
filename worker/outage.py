"""Redis being away, as the worker's loop sees it: said once when it goes, once when it is back.

The loop keeps expiring timed rules in the kernel meanwhile; each reconnect attempt waits a
backoff step, at most :data:`RECONNECT_MAX_S`, so a backlog waits at most that long.
"""

from __future__ import annotations

import logging
import time

import redis

from pushfw.worker.backoff import Backoff
from pushfw.worker.metrics import Metrics
from pushfw.worker.notify import Notifier

__all__ = ["RECONNECT_MAX_S", "Outage"]

RECONNECT_MAX_S = 1.0
"""Reconnect attempts are at most this far apart: a backlog waits at most this long."""


class Outage:
    """The current Redis outage of one worker, if any.

    Args:
        notifier: systemd's status line says Redis is away.
        metrics: counts reconnects.
        log: the run loop's logger: what the loop says stays under one name.
    """

    def __init__(self, notifier: Notifier, metrics: Metrics, log: logging.Logger) -> None:
        self.notifier = notifier
        self.metrics = metrics
        self.log = log
        self.since: float | None = None
        """When the outage began (monotonic), or None: Redis answers."""
        self.backoff = Backoff(0.1, RECONNECT_MAX_S)
        self._back = False
        """Redis answered again since the outage began (said once)."""
        self._cut_warned = False

    def began(self, exc: Exception) -> float:
        """Redis did not answer; returns how long to wait (expiring) before the next try."""
        if self.since is None or self._back:  # a new outage, or it went away again
            self._back = False
            self.log.warning(
                "redis unavailable (%s); retrying with backoff", exc, extra={"state": "redis_down"}
            )
            self.metrics.redis_reconnects.inc()
            self.notifier.status(f"Redis unavailable ({exc}); still expiring timed rules")
            self.since = time.monotonic()
        return self.wait_s()

    def wait_s(self) -> float:
        """The next backoff step, short enough for systemd's watchdog."""
        return min(self.backoff.next_delay_s(), self.notifier.max_wait_s)

    def check_back(self, client: redis.Redis) -> bool:
        """In an outage, whether Redis answers a PING (raises while it does not).

        Redis is said to be back once per outage, and only once it answered: a refused
        connection or a frozen server raises here, and the loop waits in silence.
        Returns True in an outage (the caller reconciles once it is ready).
        """
        if self.since is None:
            return False
        if not self._back:
            client.ping()
            self._back = True
            self.log.info(
                "redis is back after %.1f s: reconciling",
                time.monotonic() - self.since,
                extra={"state": "following"},
            )
        return True

    def ended(self) -> bool:
        """A pass of the loop went through: the outage is over (True: there was one)."""
        self.backoff.reset()
        if self.since is None:
            return False
        self.since, self._back = None, False
        return True

    def cut_short(self) -> None:
        """A Redis call outlived the next expiry (said once)."""
        if not self._cut_warned:
            self.log.warning(
                "Redis has not answered past an expiry: removing timed rules meanwhile"
            )
            self._cut_warned = True
