"""Supervision of the worker's roles: an unexpected error costs a role one pass, not the worker.

Each role (startup, applier, ledger, expiry, reconcile, heartbeat, trimming, scheduler,
hits) runs under a :class:`RoleHealth`. A failure is logged once per streak (again only if the
error changes), counted in ``pushfw_role_failures_total``, and the role is retried with
backoff while the others go on: a failing ledger fold must not keep timed rules in the
kernel. The heartbeat carries every role's state, so ``pushfw status`` says ``scheduler: failing
since …``. Errors the worker's loop handles as a whole (Redis unreachable, a busy kernel, a
stop signal) pass through untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import redis

from pushfw.producer.records import RoleState
from pushfw.worker.backoff import Backoff

__all__ = ["OUTAGES", "ROLES", "RoleHealth", "Supervisor", "clock_text"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

ROLES = (
    "startup",
    "applier",
    "ledger",
    "expiry",
    "reconcile",
    "heartbeat",
    "trimming",
    "scheduler",
    "hits",
)
OUTAGES = (redis.ConnectionError, redis.TimeoutError)
"""Redis unreachable or frozen: expected in a fleet's life, a WARNING without a traceback
(tracebacks are for the unexpected)."""
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0


def clock_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class RoleHealth:
    """One role's failure streak; safe to update from the role's own thread."""

    def __init__(self, role: str, counted: Callable[[str], None] | None = None) -> None:
        self.role = role
        self.failing_since_ms: int | None = None
        self.failures = 0
        self.error = ""
        self.retry_at = 0.0
        self._counted = counted
        self._backoff = Backoff(RETRY_BASE_S, RETRY_MAX_S)
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """Not waiting out the backoff of a failure."""
        return time.monotonic() >= self.retry_at

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns the seconds to wait before the next attempt."""
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        with self._lock:
            first = self.failing_since_ms is None
            changed = error != self.error
            if first:
                self.failing_since_ms = int(time.time() * 1000)
            self.failures += 1
            self.error = error
            delay = self._backoff.next_delay_s()
            self.retry_at = time.monotonic() + delay
        if self._counted is not None:
            self._counted(self.role)
        if isinstance(exc, OUTAGES):
            if first:  # the outage's own message changes (refused, timed out): said once
                logger.warning(
                    "%s: redis unavailable (%s); retrying with backoff",
                    self.role,
                    error,
                    extra={"role": self.role},
                )
        elif first or changed:
            logger.error(
                "%s failed (%s); the other roles go on, retrying with backoff",
                self.role,
                error,
                exc_info=exc if first else None,
                extra={"role": self.role},
            )
        return delay

    def succeeded(self) -> None:
        """A pass of the role completed: end the streak, saying so once."""
        if self.failing_since_ms is None:
            return
        with self._lock:
            since_ms, failures = self.failing_since_ms, self.failures
            self.failing_since_ms, self.failures, self.error, self.retry_at = None, 0, "", 0.0
            self._backoff.reset()
        logger.info(
            "%s works again after %d failures in %.1f s",
            self.role,
            failures,
            time.time() - since_ms / 1000,
            extra={"role": self.role},
        )

    def problem(self) -> str | None:
        """One line for the heartbeat's problems (None while healthy)."""
        since_ms = self.failing_since_ms
        if since_ms is None:
            return None
        return (
            f"{self.role}: failing since {clock_text(since_ms)} "
            f"({self.failures} failures): {self.error}"
        )

    def state(self) -> RoleState:
        since_ms = self.failing_since_ms
        if since_ms is None:
            return RoleState(state="ok")
        return RoleState(
            state="failing", since_ms=since_ms, failures=self.failures, error=self.error
        )


class Supervisor:
    """Runs the worker's roles, each under its own :class:`RoleHealth`.

    Args:
        passes_through: errors the worker's loop handles as a whole; re-raised as they are.
        counted: called with the role's name on every failure (the metric).
    """

    def __init__(
        self,
        passes_through: Callable[[BaseException], bool],
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self._passes_through = passes_through
        self.strict = False
        """Re-raise a role's failure once recorded (a one-off run, not a daemon)."""
        self.roles = {name: RoleHealth(name, counted) for name in ROLES}

    def __getitem__(self, role: str) -> RoleHealth:
        return self.roles[role]

    def run(
        self, role: str, work: Callable[[], T], on_error: Callable[[], None] | None = None
    ) -> T | None:
        """``work()`` unless the role waits out a failure; None when skipped or failed.

        ``on_error`` puts back what the failure may have left half done (a read whose
        entries are now pending, say) so the retry starts clean.
        """
        health = self.roles[role]
        if not health.ready():
            return None
        try:
            result = work()
        except Exception as exc:
            if self._passes_through(exc):
                raise
            health.failed(exc)
            if on_error is not None:
                on_error()
            if self.strict:
                raise
            return None
        health.succeeded()
        return result

    def problems(self) -> list[str]:
        return [p for p in (h.problem() for h in self.roles.values()) if p is not None]

    def states(self) -> dict[str, RoleState]:
        return {name: health.state() for name, health in self.roles.items()}
