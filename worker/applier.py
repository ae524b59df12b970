"""The Applier role: read a host's share of the command stream and make the kernel follow it.

Per batch: parse every entry, ask the gate (:func:`pushfw.worker.decide.decide`) what each
command means for this host, plan the decisions against the backend's index (so a rule
already present costs no kernel call), commit the batch once, write one result per
command, then XACK. A batch the kernel refuses is split and retried one command at a time
so one bad command cannot hold the others back; a command that keeps failing ends in the
dead-letter stream after ``max_deliveries``. The applier decides nothing itself: it stages,
commits, reports and acknowledges.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import redis
from redis.typing import EncodableT, FieldT

from pushfw.producer.contract import CommandRejected, Status
from pushfw.producer.lists import ListCommand, is_list_entry
from pushfw.producer.records import RuleRecord
from pushfw.producer.render import plural
from pushfw.producer.wire import ParsedCommand
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.backoff import Backoff
from pushfw.worker.clock import Clock
from pushfw.worker.copies import ContentCopies
from pushfw.worker.decide import Decision, Delete, Policy, Report, Request, decide
from pushfw.worker.errors import BackendError, PermanentBackendError, TransientBackendError
from pushfw.worker.expiry import ExpiryQueue
from pushfw.worker.ledger import Ledger
from pushfw.worker.lists import ListKeeper
from pushfw.worker.metrics import Metrics
from pushfw.worker.plan import Step, plan
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.stream import (
    CommandStream,
    Entry,
    HostStream,
    ParsedEntries,
    stream_id_order,
)

logger = logging.getLogger(__name__)

_QUICK_RETRIES = 3


class StopRequested(Exception):
    """Raised from the signal handler to cut an idle blocking read short."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What this host answers for one entry; ``status`` None: leave it pending, retry later."""

    entry: Entry
    status: Status | None
    detail: str = ""
    request_id: str = ""
    command: ParsedCommand | ListCommand | None = None
    report: bool = True
    permanent: bool = False
    busy: bool = False
    """Left pending because the kernel was busy (a held lock): not the command's fault."""

    @property
    def skip(self) -> bool:
        return not self.report


@dataclass(frozen=True, slots=True)
class Decided:
    """One entry with the gate's decision for it."""

    entry: Entry
    request: Request
    decision: Decision

    @property
    def key(self) -> RuleKey:
        return self.request.key


def _answer(item: Answer | Decided, step: Step | BackendError | None) -> Answer:
    """The answer once the batch is committed (status None: left pending for a retry)."""
    if isinstance(item, Answer):
        return item
    decision = item.decision
    report = not isinstance(decision, Delete) or decision.report
    request = item.request
    if isinstance(step, BackendError):
        return Answer(
            item.entry,
            None,
            str(step),
            _request_id(request),
            request.command,
            report,
            permanent=isinstance(step, PermanentBackendError),
            busy=isinstance(step, TransientBackendError),
        )
    assert step is not None
    return Answer(
        item.entry, step.status, step.detail, _request_id(request), request.command, report
    )


def _superseding(
    request: Request, record: RuleRecord | None, boundary: tuple[int, int]
) -> Report | None:
    """A late retry overtaken by a newer command this host already read: nothing to do."""
    if record is None or request.is_expiry:
        return None
    newer = stream_id_order(record.order_id)
    if stream_id_order(request.id) < newer <= boundary:
        return Report(Status.UNCHANGED, f"superseded by newer command {record.id}")
    return None


def _is_expiry(answer: Answer) -> bool:
    cmd = answer.command
    return cmd is not None and cmd.origin == "ttl" and not cmd.is_insert


def _wants_result(answer: Answer) -> bool:
    """Results on request: for commands that ask, and always for rejected and failed ones."""
    if answer.status in (Status.REJECTED, Status.FAILED):
        return True
    return answer.command is not None and answer.command.wants_result


def _request_id(request: Request) -> str:
    return request.command.request_id if request.command is not None else ""


class Applier:
    """One host's applier: consumer group ``host:<name>`` on the command stream, or a
    follower's position (:mod:`pushfw.worker.follower`)."""

    def __init__(
        self,
        client: redis.Redis,
        backend: Backend,
        settings: WorkerSettings,
        policy: Policy,
        ledger: Ledger | None = None,
        stream: HostStream | None = None,
    ) -> None:
        from pushfw.producer.keys import Keys

        self.settings = settings
        self.backend = backend
        self.policy = policy
        self.ledger = ledger
        keys = Keys(settings.key_prefix)
        self.clock = ledger.clock if ledger is not None else Clock(client, keys)
        self.parsed = ledger.parsed if ledger is not None else ParsedEntries()
        self.host = settings.host_name
        self.stream: HostStream = stream or CommandStream(
            client, keys, Keys.host_group(self.host), settings.consumer_name
        )
        self.stopping = False
        self.blocking = False
        self.drifted = False
        """Set when the kernel was found changed behind our back: the worker reconciles."""
        self.kernel: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
        """Wraps kernel work; the worker's expiry alarm never interrupts it."""
        self._pending_from: str | None = "0"
        self._retry_at = 0.0
        self._retry_backoff = Backoff(settings.retry_base_ms / 1000, settings.retry_max_ms / 1000)
        self._claim_start = "0-0"
        self._claim_at = 0.0
        self.expiry = ExpiryQueue()
        self._failing: set[str] = set()  # entries left pending to retry: logged once, not per try
        self._busy: Counter[str] = Counter()  # deliveries a busy kernel cost, per entry
        self._high_water = (0, 0)
        self.done_id = ""
        """The newest entry this host has answered and acknowledged (for the heartbeat)."""
        self.counts: Counter[str] = Counter()
        """Commands this host answered since it started, by status (for the heartbeat)."""
        self._clock_offset_ms = 0
        self.metrics = Metrics()  # the worker shares it with its other roles
        copies = ContentCopies(settings.state_dir, self.host) if policy.signing.required else None
        self.lists = ListKeeper(client, keys, backend, policy, lambda: self.kernel(), copies)
        self.wake_in_ms: Callable[[], int | None] = lambda: None
        """Another bound on the blocking read, in ms: a follower's next ledger fold."""
        self.lists_changed: Callable[[], None] = lambda: None
        """Called once a batch changed the kernel's lists, before its results are written:
        the worker beats, so ``pushfw lists`` after ``pushfw import --wait`` agrees."""

    def setup(self, start_id: str = "0") -> None:
        """Create the host's group at ``start_id`` if it is new (the worker opens the backend)."""
        if self.stream.ensure_group(start_id):
            logger.info(
                "%s starts reading %s at %s", self.stream.group, self.stream.keys.cmd, start_id
            )
        self._high_water = stream_id_order(self.stream.last_delivered())
        self._sync_clock(self.stream.now_ms())
        self.rebuild_expiry()

    def rebuild_expiry(self) -> None:
        """Queue every timed rule the backend holds (after open or a reconcile)."""
        with self.kernel():
            self.expiry.rebuild(self.backend.timed())

    def _sync_clock(self, redis_ms: int) -> None:
        self._clock_offset_ms = redis_ms - int(time.time() * 1000)

    def now_ms(self) -> int:
        """Redis's clock, estimated locally so expiry keeps working while Redis is away."""
        return int(time.time() * 1000) + self._clock_offset_ms

    def expire_due(self) -> int:
        """Remove the timed rules whose expiry has passed (see :mod:`pushfw.worker.expiry`)."""
        with self.kernel():  # the queue and the kernel change together, never half
            return self._expire_due() + self.lists.expire_due(self.now_ms())

    def _expire_due(self) -> int:
        now = self.now_ms()
        due = self.expiry.pop_due(now, self.backend.get)
        if not due:
            return 0
        error = self._commit([Step(Status.APPLIED, "expired", delete=rule.key) for rule in due])
        if error is not None:
            logger.warning("could not remove %d expired rules (%s); will retry", len(due), error)
            self.expiry.retry(due, delay_ms=1000)
            return 0
        expiries = [r.expires_ms for r in due if r.expires_ms is not None]
        logger.info("expired %s (oldest %d ms late)", plural(len(due), "rule"), now - min(expiries))
        self.metrics.expired(expiries, self.now_ms())
        return len(due)

    def remove(self, keys: list[RuleKey]) -> BackendError | None:
        """Remove these rules now, outside any batch (a drop that came to cover Redis)."""
        return self._commit([Step(Status.APPLIED, "removed", delete=key) for key in keys])

    def iteration(self) -> int:
        """Read one batch (pending, claimed, new) and process it (the worker expires first)."""
        boundary = self._high_water
        entries = self._next_entries()
        if entries:
            self._high_water = max(self._high_water, entries[-1].order)
            self.process(entries, boundary)
        return len(entries)

    def _next_entries(self) -> list[Entry]:
        count = self.settings.batch_size
        now = time.monotonic()
        if self._pending_from is None and self._retry_at and now >= self._retry_at:
            self._retry_at = 0.0
            self._pending_from = "0"
        if self._pending_from is not None:
            entries = self.stream.read(self._pending_from, count, None)
            self._pending_from = entries[-1].id if entries else None
            if entries:
                return entries
            if not self._retry_at:
                self._retry_backoff.reset()
        if now >= self._claim_at:
            self._claim_start, entries = self.stream.autoclaim(
                self.settings.claim_idle_ms, self._claim_start, count
            )
            if self._claim_start == "0-0":
                self._claim_at = now + max(1.0, self.settings.claim_idle_ms / 2000)
            if entries:
                logger.info(
                    "reclaimed %d idle entries of group %s", len(entries), self.stream.group
                )
                return entries
        return self._read_new(count)

    def _read_new(self, count: int) -> list[Entry]:
        block_ms = self.settings.block_ms
        if self._retry_at:
            block_ms = min(block_ms, int((self._retry_at - time.monotonic()) * 1000))
        for bound_ms in (
            self.expiry.ms_until_next(self.now_ms()),
            self.lists.ms_until_next(self.now_ms()),
            self.wake_in_ms(),
        ):
            if bound_ms is not None:
                block_ms = min(block_ms, bound_ms)
        block_ms = max(1, block_ms)
        self.blocking = True
        try:
            if self.stopping:
                return []
            return self.stream.read(">", count, block_ms)
        finally:
            self.blocking = False

    def process(self, entries: list[Entry], boundary: tuple[int, int] = (0, 0)) -> None:
        """Decide, apply, report and acknowledge one batch.

        ``boundary`` is the newest entry this host had read before this batch: a command
        the ledger knows a newer command for, up to there, is superseded.
        """
        started = time.perf_counter()
        now_ms, seen = self.clock.read(entries)
        self._sync_clock(now_ms)
        lists = [e for e in entries if is_list_entry(e.fields)]
        of_rules = [e for e in entries if not is_list_entry(e.fields)] if lists else entries
        requests = [self._request(entry, seen) for entry in of_rules]
        records = self._records(requests, boundary)
        decided: list[Answer | Decided] = []
        for entry, request in zip(of_rules, requests, strict=True):
            if isinstance(request, Answer):
                decided.append(request)
                continue
            record = records.get(str(request.key)) if records else None
            decision = _superseding(request, record, boundary) or decide(
                request, self.policy, now_ms, record
            )
            decided.append(Decided(entry, request, decision))
        final = self._apply(decided) if decided else []
        if lists:
            answers = [self._list_answer(entry, seen[entry.id], now_ms) for entry in lists]
            if any(a.status is Status.APPLIED for a in answers):
                self.lists_changed()  # the heartbeat says so before any result does
            final += answers
        final = self._finish(final)
        self.metrics.batch(final, time.perf_counter() - started, self.now_ms())
        reported = [a for a in final if a.report]
        tally = Counter(a.status.value if a.status else "retry" for a in reported)
        # The scheduler's delete of a rule this host already removed on its own clock is
        # the usual end of a ban: the expiry was logged once already.
        echo = all(a.status is Status.UNCHANGED and _is_expiry(a) for a in reported)
        logger.log(
            logging.DEBUG if echo else logging.INFO,
            "batch of %d (%s..%s) in %.1f ms: %s",
            len(entries),
            entries[0].id,
            entries[-1].id,
            (time.perf_counter() - started) * 1000,
            ", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "none for this host",
        )

    def _request(self, entry: Entry, seen: dict[str, int]) -> Request | Answer:
        if entry.fields is None:
            return Answer(entry, Status.FAILED, "entry was trimmed before it was applied")
        try:
            cmd = self.parsed.parse(entry)
        except CommandRejected as exc:
            request_id = entry.fields.get(b"request_id", b"")[:128].decode("utf-8", "replace")
            return Answer(entry, Status.REJECTED, str(exc), request_id=request_id)
        return Request.from_entry(entry, cmd, seen[entry.id])

    def _list_answer(self, entry: Entry, seen_ms: int, now_ms: int) -> Answer:
        """One ``list.*`` entry, carried out alone: a list is one kernel transaction itself."""
        outcome, cmd = self.lists.handle(entry, seen_ms, now_ms)
        return Answer(
            entry,
            outcome.status,
            outcome.detail,
            cmd.request_id if cmd is not None else "",
            cmd,
            outcome.report,
            outcome.permanent,
            outcome.busy,
        )

    def _records(
        self, requests: list[Request | Answer], boundary: tuple[int, int]
    ) -> dict[str, RuleRecord]:
        """Ledger records the batch needs: the scheduler's expiries, and late retries."""
        # Only an entry this host had already read can have been overtaken by a newer one it
        # also read: entries fresh from '>' are all past the boundary and skip the lookup.
        wanted = {
            str(r.key): None
            for r in requests
            if isinstance(r, Request) and (r.is_expiry or stream_id_order(r.id) <= boundary)
        }
        if not wanted or self.ledger is None:
            return {}
        return self.ledger.records_for(list(wanted))

    def _apply(self, decided: list[Answer | Decided]) -> list[Answer]:
        """Plan every decision against the index plus the batch's earlier steps, commit once."""
        with self.kernel():  # the kernel, the index and the expiry queue change together
            return self._apply_now(decided)

    def _apply_now(self, decided: list[Answer | Decided]) -> list[Answer]:
        view: dict[RuleKey, Rule | None] = {}
        steps: list[Step | BackendError | None] = []
        for item in decided:
            if isinstance(item, Answer):
                steps.append(None)
                continue
            key = item.key
            step = plan(item.decision, view[key] if key in view else self.backend.get(key))
            if step.add is not None:
                view[step.add.key] = step.add
            elif step.delete is not None:
                view[step.delete] = None
            steps.append(step)
        changes = [s for s in steps if isinstance(s, Step) and s.changes]
        error = self._commit(changes) if changes else None
        if isinstance(error, TransientBackendError):
            # One by one would wait for the same lock once per command: the batch waits whole.
            logger.log(
                logging.DEBUG if self._busy else logging.WARNING,
                "the kernel is busy (%s): %d commands wait for the next try",
                error,
                len(decided),
            )
            steps = [None if isinstance(i, Answer) else error for i in decided]
        elif error is not None:
            self._check_kernel()
            retrying = all(item.entry.id in self._failing for item in decided)
            logger.log(
                logging.DEBUG if retrying else logging.WARNING,
                "batch of %d refused (%s); applying one by one",
                len(decided),
                error,
            )
            steps = [None if isinstance(i, Answer) else self._apply_alone(i) for i in decided]
        for done in steps:
            if isinstance(done, Step) and done.add is not None:
                self.expiry.push(done.add)
        ended = [s.ended_ms for s in steps if isinstance(s, Step) and s.ended_ms is not None]
        if ended:
            self.metrics.expired(ended, self.now_ms())
        return [_answer(item, step) for item, step in zip(decided, steps, strict=True)]

    def _check_kernel(self) -> None:
        """After a refused batch: was the kernel changed behind our back (a hand flush)?

        Re-opening recreates missing chains, sets and tables and re-reads the index, so
        the batch is retried against the kernel as it is; a changed index asks the worker to
        reconcile at once instead of at the next interval.
        """
        before = self.backend.snapshot()
        try:
            with self.kernel():
                self.backend.open()
        except BackendError as exc:
            logger.error("could not re-open the firewall after a refused batch: %s", exc)
            return
        if self.backend.snapshot() != before:
            logger.warning("the kernel's managed rules changed behind pushfw's back: reconciling")
            self.drifted = True
            self.rebuild_expiry()

    def _apply_alone(self, item: Decided) -> Step | BackendError:
        """Re-plan one decision against the kernel as it now stands and commit it alone."""
        step = plan(item.decision, self.backend.get(item.key))
        if not step.changes:
            return step
        error = self._commit([step])
        return step if error is None else error

    def _commit(self, steps: list[Step]) -> BackendError | None:
        """Stage ``steps`` and commit them; a busy kernel is retried with the changes staged anew.

        A failed commit discards what was staged, so every attempt stages again: a retry
        never commits an empty batch and calls it done.
        """
        with self.kernel():
            return self._commit_now(steps)

    def _commit_now(self, steps: list[Step]) -> BackendError | None:
        backoff = Backoff(0.05, 0.5)
        for attempt in range(_QUICK_RETRIES):
            self.backend.discard()
            for step in steps:
                if step.add is not None:
                    self.backend.add(step.add)
                elif step.delete is not None:
                    self.backend.delete(step.delete)
            try:
                self.backend.commit()
                return None
            except TransientBackendError as exc:
                if attempt == _QUICK_RETRIES - 1:
                    return exc
                time.sleep(backoff.next_delay_s())
            except BackendError as exc:
                return exc
        return None

    def _finish(self, answers: list[Answer]) -> list[Answer]:
        """Dead-letter what failed too often, write results and acknowledge what is done."""
        failing = [a for a in answers if a.status is None]
        dead: list[dict[FieldT, EncodableT]] = []
        if failing:
            counts = self.stream.deliveries([a.entry.id for a in failing])
            self._busy.update(a.entry.id for a in failing if a.busy)
            buried = {}
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
            answers = [buried.get(a.entry.id, a) for a in answers]
            self._schedule_retry()
        if logger.isEnabledFor(logging.DEBUG):
            for answer in answers:
                status = answer.status.value if answer.status else "retry"
                logger.debug("%s: %s %s", answer.entry.id, status, answer.detail)
        done = [a for a in answers if a.status is not None]
        self._failing.update(a.entry.id for a in answers if a.status is None)
        self._failing.difference_update(a.entry.id for a in done)
        for answer in done:
            self._busy.pop(answer.entry.id, None)
        self.stream.finish(
            [a.entry.id for a in done],
            [self._result_fields(a) for a in done if a.report and _wants_result(a)],
            dead,
            self.settings.results_maxlen,
            self.settings.dead_maxlen,
        )
        self.metrics.dead_letters.inc(len(dead))
        if done:
            newest = max(done, key=lambda a: a.entry.order).entry
            if not self.done_id or newest.order > stream_id_order(self.done_id):
                self.done_id = newest.id
            self.counts.update(a.status.value for a in done if a.report and a.status is not None)
        return answers

    def _schedule_retry(self) -> None:
        if not self._retry_at:
            self._retry_at = time.monotonic() + self._retry_backoff.next_delay_s()

    def _result_fields(self, out: Answer) -> dict[FieldT, EncodableT]:
        assert out.status is not None
        return {
            "cmd": out.entry.id,
            "request_id": out.request_id,
            "host": self.host,
            "status": out.status.value,
            "detail": out.detail,
        }

    def _dead_letter(self, out: Answer, delivered: int) -> dict[FieldT, EncodableT]:
        fields: dict[FieldT, EncodableT] = {
            k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
            for k, v in (out.entry.fields or {}).items()
        }
        fields.update(
            {
                "cmd": out.entry.id,
                "error": out.detail or "failed",
                "deliveries": str(delivered),
                "host": self.host,
            }
        )
        logger.error("dead letter %s after %d deliveries: %s", out.entry.id, delivered, out.detail)
        return fields

    def reset_reads(self) -> None:
        """After a lost connection, re-read our pending entries before anything new."""
        self._pending_from = "0"

    def idle(self) -> bool:
        """Nothing of ours is pending or waiting for a retry."""
        return self._pending_from is None and not self._retry_at
