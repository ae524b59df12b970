"""What the applier reads next: its own pending entries, then idle ones it claims, then new.

A command left pending for a retry is re-read after a backoff that grows while it keeps
failing; entries another consumer left idle are claimed (``XAUTOCLAIM``); only then does the
read block for new entries, and never past the next timed rule, list expiry or fold owed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from pushfw.producer.entry_ids import entry_order
from pushfw.worker.backoff import Backoff
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.stream import Entry, HostStream

__all__ = ["Reader", "StopRequested"]

logger = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised from the signal handler to cut an idle blocking read short."""


class Reader:
    """One host's reads: pending entries, claims of idle ones, new entries, retry timing.

    Args:
        stream: the host's group (or a follower's position).
        settings: batch size, block and claim timing, retry backoff.
        wakes: each bounds the blocking read (ms until something is due; None: nothing).
    """

    def __init__(
        self,
        stream: HostStream,
        settings: WorkerSettings,
        wakes: Sequence[Callable[[], int | None]] = (),
    ) -> None:
        self.stream = stream
        self.settings = settings
        self.wakes = tuple(wakes)
        self.stopping = False
        self.blocking = False
        self.high_water = (0, 0)
        """The newest entry this host has read (a late retry up to there may be superseded)."""
        self._pending_from: str | None = "0"
        self._retry_at = 0.0
        self._retry_backoff = Backoff(settings.retry_base_ms / 1000, settings.retry_max_ms / 1000)
        self._claim_start = "0-0"
        self._claim_at = 0.0

    def setup(self) -> None:
        """Start after the newest entry the group was ever given."""
        self.high_water = entry_order(self.stream.last_delivered())

    def next_batch(self) -> tuple[list[Entry], tuple[int, int]]:
        """The next entries to process, and the newest entry read before them."""
        boundary = self.high_water
        entries = self._next_entries()
        if entries:
            self.high_water = max(self.high_water, entries[-1].order)
        return entries, boundary

    def _next_entries(self) -> list[Entry]:
        count = self.settings.batch_size
        now = time.monotonic()
        entries = self._pending(now, count)
        if entries:
            return entries
        if now >= self._claim_at:
            entries = self._claim(now, count)
            if entries:
                return entries
        return self._read_new(count)

    def _pending(self, now: float, count: int) -> list[Entry]:
        if self._pending_from is None and self._retry_at and now >= self._retry_at:
            self._retry_at = 0.0
            self._pending_from = "0"
        if self._pending_from is None:
            return []
        entries = self.stream.read(self._pending_from, count, None)
        self._pending_from = entries[-1].id if entries else None
        if not entries and not self._retry_at:
            self._retry_backoff.reset()
        return entries

    def _claim(self, now: float, count: int) -> list[Entry]:
        self._claim_start, entries = self.stream.autoclaim(
            self.settings.claim_idle_ms, self._claim_start, count
        )
        if self._claim_start == "0-0":
            self._claim_at = now + max(1.0, self.settings.claim_idle_ms / 2000)
        if entries:
            logger.info("reclaimed %d idle entries of group %s", len(entries), self.stream.group)
        return entries

    def _read_new(self, count: int) -> list[Entry]:
        block_ms = self.settings.block_ms
        if self._retry_at:
            block_ms = min(block_ms, int((self._retry_at - time.monotonic()) * 1000))
        for wake in self.wakes:
            bound_ms = wake()
            if bound_ms is not None:
                block_ms = min(block_ms, bound_ms)
        self.blocking = True
        try:
            if self.stopping:
                return []
            return self.stream.read(">", count, max(1, block_ms))
        finally:
            self.blocking = False

    def retry_later(self) -> None:
        """Some entries were left pending: re-read them after the next backoff step."""
        if not self._retry_at:
            self._retry_at = time.monotonic() + self._retry_backoff.next_delay_s()

    def reset_reads(self) -> None:
        """After a lost connection, re-read our pending entries before anything new."""
        self._pending_from = "0"

    def idle(self) -> bool:
        """Nothing of ours is pending or waiting for a retry."""
        return self._pending_from is None and not self._retry_at
