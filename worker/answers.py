"""What a host answers for a batch: results, dead letters, the acknowledgement and its counts.

An entry left pending (status None) is retried later; one that failed ``max_deliveries``
times on its own account (a busy kernel's deliveries do not count) or failed for good ends in
the dead-letter stream with its original fields. Everything answered is acknowledged with
its results in one round trip, and counted for the heartbeat.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from redis.typing import EncodableT, FieldT

from pushfw.producer.contract import Status
from pushfw.producer.entry_ids import entry_order
from pushfw.worker.batch import Answer
from pushfw.worker.metrics import Metrics
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.stream import HostStream

__all__ = ["Answerer"]

logger = logging.getLogger(__name__)

Fields = dict[FieldT, EncodableT]


class Answerer:
    """Writes one host's answers: results, dead letters, ``XACK``, and what it answered.

    Args:
        stream: the host's group, where answers are acknowledged.
        settings: host name, ``max_deliveries`` and the streams' bounds.
        metrics: counts dead letters.
        retry_later: called when an entry is left pending (the reader re-reads it later).
    """

    def __init__(
        self,
        stream: HostStream,
        settings: WorkerSettings,
        metrics: Metrics,
        retry_later: Callable[[], None],
    ) -> None:
        self.stream = stream
        self.settings = settings
        self.metrics = metrics
        self.retry_later = retry_later
        self.failing: set[str] = set()
        """Entries left pending to retry: their failure is logged once, not per try."""
        self._busy: Counter[str] = Counter()  # deliveries a busy kernel cost, per entry
        self.done_id = ""
        """The newest entry this host has answered and acknowledged (for the heartbeat)."""
        self.counts: Counter[str] = Counter()
        """Commands this host answered since it started, by status (for the heartbeat)."""

    @property
    def kernel_was_busy(self) -> bool:
        """Entries wait because the kernel was busy: a busy kernel again is no news."""
        return bool(self._busy)

    def finish(self, answers: list[Answer]) -> list[Answer]:
        """Dead-letter what failed too often, write results and acknowledge what is done."""
        dead: list[Fields] = []
        if any(a.status is None for a in answers):
            answers = self._bury(answers, dead)
            self.retry_later()
        if logger.isEnabledFor(logging.DEBUG):
            for answer in answers:
                status = answer.status.value if answer.status else "retry"
                logger.debug("%s: %s %s", answer.entry.id, status, answer.detail)
        done = [a for a in answers if a.status is not None]
        self._forget(answers, done)
        self.stream.finish(
            [a.entry.id for a in done],
            [self._result_fields(a) for a in done if a.report and a.wants_result],
            dead,
            self.settings.results_maxlen,
            self.settings.dead_maxlen,
        )
        self.metrics.dead_letters.inc(len(dead))
        self._count(done)
        return answers

    def _bury(self, answers: list[Answer], dead: list[Fields]) -> list[Answer]:
        """The answers with each entry that failed too often turned into a dead letter."""
        failing = [a for a in answers if a.status is None]
        counts = self.stream.deliveries([a.entry.id for a in failing])
        self._busy.update(a.entry.id for a in failing if a.busy)
        buried: dict[str, Answer] = {}
        for answer in failing:
            delivered = counts.get(answer.entry.id, 0)
            tried = delivered - self._busy[answer.entry.id]
            if answer.permanent or (not answer.busy and tried >= self.settings.max_deliveries):
                dead.append(self._dead_letter(answer, delivered))
                buried[answer.entry.id] = replace(
                    answer,
                    status=Status.FAILED,
                    detail=f"dead letter after {delivered} deliveries: {answer.detail}",
                )
        return [buried.get(a.entry.id, a) for a in answers] if buried else answers

    def _forget(self, answers: list[Answer], done: list[Answer]) -> None:
        """Remember what is left pending; forget what is answered."""
        if len(done) < len(answers):
            self.failing.update(a.entry.id for a in answers if a.status is None)
        if self.failing:
            self.failing.difference_update(a.entry.id for a in done)
        if self._busy:
            for answer in done:
                self._busy.pop(answer.entry.id, None)

    def _count(self, done: list[Answer]) -> None:
        if not done:
            return
        newest = max(done, key=lambda a: a.entry.order).entry
        if not self.done_id or newest.order > entry_order(self.done_id):
            self.done_id = newest.id
        self.counts.update(a.status.value for a in done if a.report and a.status is not None)

    def _result_fields(self, out: Answer) -> Fields:
        assert out.status is not None
        return {
            "cmd": out.entry.id,
            "request_id": out.request_id,
            "host": self.settings.host_name,
            "status": out.status.value,
            "detail": out.detail,
        }

    def _dead_letter(self, out: Answer, delivered: int) -> Fields:
        fields: Fields = {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
            for k, v in (out.entry.fields or {}).items()
        }
        fields.update(
            {
                "cmd": out.entry.id,
                "error": out.detail or "failed",
                "deliveries": str(delivered),
                "host": self.settings.host_name,
            }
        )
        logger.error("dead letter %s after %d deliveries: %s", out.entry.id, delivered, out.detail)
        return fields
