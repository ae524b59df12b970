"""The Applier role: decide, plan and commit a host's share of the command stream.

Per batch: parse every entry, ask the gate (:func:`pushfw.worker.decide.decide`) what each
command means for this host, plan the decisions against the backend's index (so a rule
already present costs no kernel call), and commit the batch once. A batch the kernel
refuses is split and retried one command at a time so one bad command cannot hold the
others back. What to read comes from :mod:`pushfw.worker.reader`; results, dead letters
and the ``XACK`` go through :mod:`pushfw.worker.answers`. The applier decides nothing
itself: it stages and commits what the gate decided.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager

from pushfw.producer.contract import CommandRejected, Status
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.lists import is_list_entry
from pushfw.producer.records import RuleRecord
from pushfw.producer.render import plural
from pushfw.worker.answers import Answerer
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.batch import Answer, Decided, Item
from pushfw.worker.clock import Clock, SyncedClock
from pushfw.worker.decide import Decision, Policy, Report, Request, decide
from pushfw.worker.errors import BackendError, TransientBackendError, retry_busy
from pushfw.worker.expiry import ExpiryQueue
from pushfw.worker.ledger import Ledger
from pushfw.worker.lists import ListKeeper
from pushfw.worker.metrics import Metrics
from pushfw.worker.plan import Step, plan
from pushfw.worker.reader import Reader
from pushfw.worker.stream import Entry, ParsedEntries

logger = logging.getLogger(__name__)

Kernel = Callable[[], AbstractContextManager[None]]


def _superseding(
    request: Request, record: RuleRecord | None, boundary: tuple[int, int]
) -> Report | None:
    """A late retry overtaken by a newer command this host already read: nothing to do."""
    if record is None or request.is_expiry:
        return None
    newer = entry_order(record.order_id)
    if entry_order(request.id) < newer <= boundary:
        return Report(Status.UNCHANGED, f"superseded by newer command {record.id}")
    return None


class Applier:
    """One host's applier: reads through ``reader``, answers through ``answers``.

    Args:
        backend: the kernel firewall, opened by the worker.
        policy: the gate's view of this host.
        ledger: the ledger's records (the scheduler's expiries, late retries); its stamping
            clock and parsed entries are shared with the fold.
        clock: Redis's clock, estimated locally, resynced by every batch.
        expiry: the timed rules of the kernel, in order of expiry.
        lists: the list role, carrying out ``list.*`` entries.
        metrics: the worker's metrics.
        kernel: wraps kernel work so that the worker's expiry alarm never interrupts it.
        lists_changed: called once a batch changed the kernel's lists, before its results
            are written: the worker beats, so ``pushfw lists`` after ``pushfw import --wait``
            agrees.
    """

    def __init__(
        self,
        *,
        reader: Reader,
        answers: Answerer,
        backend: Backend,
        policy: Policy,
        ledger: Ledger,
        clock: SyncedClock,
        expiry: ExpiryQueue,
        lists: ListKeeper,
        metrics: Metrics,
        kernel: Kernel,
        lists_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.reader = reader
        self.answers = answers
        self.backend = backend
        self.policy = policy
        self.ledger = ledger
        self.stamps: Clock = ledger.clock
        self.parsed: ParsedEntries = ledger.parsed
        self.clock = clock
        self.expiry = expiry
        self.lists = lists
        self.metrics = metrics
        self.kernel = kernel
        self.lists_changed = lists_changed
        self.drifted = False
        """Set when the kernel was found changed behind our back: the worker reconciles."""

    def setup(self, start_id: str = "0") -> None:
        """Create the host's group at ``start_id`` if it is new (the worker opens the backend)."""
        stream = self.reader.stream
        if stream.ensure_group(start_id):
            logger.info("%s starts reading %s at %s", stream.group, stream.keys.cmd, start_id)
        self.reader.setup()
        self.clock.sync(stream.now_ms())
        self.rebuild_expiry()

    def rebuild_expiry(self) -> None:
        """Queue every timed rule the backend holds (after open or a reconcile)."""
        with self.kernel():
            self.expiry.rebuild(self.backend.committed().timed())

    def expire_due(self) -> int:
        """Remove the timed rules whose expiry has passed (see :mod:`pushfw.worker.expiry`)."""
        with self.kernel():  # the queue and the kernel change together, never half
            return self._expire_due() + self.lists.expire_due(self.clock.now_ms())

    def _expire_due(self) -> int:
        now = self.clock.now_ms()
        due = self.expiry.pop_due(now, self.backend.committed().get)
        if not due:
            return 0
        error = self._commit([Step(Status.APPLIED, "expired", delete=rule.key) for rule in due])
        if error is not None:
            logger.warning("could not remove %d expired rules (%s); will retry", len(due), error)
            self.expiry.retry(due, delay_ms=1000)
            return 0
        expiries = [r.expires_ms for r in due if r.expires_ms is not None]
        logger.info("expired %s (oldest %d ms late)", plural(len(due), "rule"), now - min(expiries))
        self.metrics.expired(expiries, self.clock.now_ms())
        return len(due)

    def ms_until_expiry(self) -> int | None:
        """Milliseconds until the next timed rule ends here (None: none is queued)."""
        return self.expiry.ms_until_next(self.clock.now_ms())

    def remove(self, keys: list[RuleKey]) -> BackendError | None:
        """Remove these rules now, outside any batch (a drop that came to cover Redis)."""
        return self._commit([Step(Status.APPLIED, "removed", delete=key) for key in keys])

    def iteration(self) -> int:
        """Read one batch (pending, claimed, new) and process it (the worker expires first)."""
        entries, boundary = self.reader.next_batch()
        if entries:
            self.process(entries, boundary)
        return len(entries)

    def process(self, entries: list[Entry], boundary: tuple[int, int] = (0, 0)) -> None:
        """Decide, apply, report and acknowledge one batch.

        ``boundary`` is the newest entry this host had read before this batch: a command
        the ledger knows a newer command for, up to there, is superseded.
        """
        started = time.perf_counter()
        now_ms, seen = self.stamps.read(entries)
        self.clock.sync(now_ms)
        lists = [e for e in entries if is_list_entry(e.fields)]
        of_rules = [e for e in entries if not is_list_entry(e.fields)] if lists else entries
        items = self._decide(of_rules, seen, now_ms, boundary)
        final = self._apply(items) if items else []
        if lists:
            answers = [self._list_answer(entry, seen[entry.id], now_ms) for entry in lists]
            if any(a.status is Status.APPLIED for a in answers):
                self.lists_changed()  # the heartbeat says so before any result does
            final += answers
        final = self.answers.finish(final)
        self.metrics.batch(final, time.perf_counter() - started, self.clock.now_ms())
        _log_batch(entries, final, started)

    def _decide(
        self, entries: list[Entry], seen: dict[str, int], now_ms: int, boundary: tuple[int, int]
    ) -> list[Item]:
        """One record per entry: answered at once, or the gate's decision for it."""
        requests = [self._request(entry, seen) for entry in entries]
        records = self._records(requests, boundary)
        return [
            request
            if isinstance(request, Answer)
            else Decided(entry, request, self._gate(request, records, now_ms, boundary))
            for entry, request in zip(entries, requests, strict=True)
        ]

    def _gate(
        self,
        request: Request,
        records: dict[str, RuleRecord],
        now_ms: int,
        boundary: tuple[int, int],
    ) -> Decision:
        record = records.get(str(request.key)) if records else None
        return _superseding(request, record, boundary) or decide(
            request, self.policy, now_ms, record
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
            if isinstance(r, Request) and (r.is_expiry or entry_order(r.id) <= boundary)
        }
        if not wanted:
            return {}
        return self.ledger.records_for(list(wanted))

    def _apply(self, items: list[Item]) -> list[Answer]:
        """Plan every decision against the index plus the batch's earlier steps, commit once."""
        with self.kernel():  # the kernel, the index and the expiry queue change together
            decided = [i for i in items if isinstance(i, Decided)]
            self._plan(decided)
            self._commit_batch(decided, len(items))
            self._settle(decided)
        return [i if isinstance(i, Answer) else i.answer() for i in items]

    def _plan(self, decided: list[Decided]) -> None:
        """Each decision's step, planned against the index plus the batch's earlier steps."""
        view: dict[RuleKey, Rule | None] = {}
        get = self.backend.committed().get
        for item in decided:
            key = item.key
            step = plan(item.decision, view[key] if key in view else get(key))
            if step.add is not None:
                view[step.add.key] = step.add
            elif step.delete is not None:
                view[step.delete] = None
            item.step = step

    def _commit_batch(self, decided: list[Decided], size: int) -> None:
        """Commit the batch's changes at once; a refused batch is retried one by one."""
        changes = [i.step for i in decided if isinstance(i.step, Step) and i.step.changes]
        error = self._commit(changes) if changes else None
        if isinstance(error, TransientBackendError):
            # One by one would wait for the same lock once per command: the batch waits whole.
            logger.log(
                logging.DEBUG if self.answers.kernel_was_busy else logging.WARNING,
                "the kernel is busy (%s): %d commands wait for the next try",
                error,
                size,
            )
            for item in decided:
                item.step = error
        elif error is not None:
            self._check_kernel()
            retrying = all(item.entry.id in self.answers.failing for item in decided)
            logger.log(
                logging.DEBUG if retrying else logging.WARNING,
                "batch of %d refused (%s); applying one by one",
                size,
                error,
            )
            for item in decided:
                item.step = self._apply_alone(item)

    def _settle(self, decided: list[Decided]) -> None:
        """Queue what the batch added with an expiry; measure the expiries it ended."""
        ended: list[int] = []
        for item in decided:
            step = item.step
            if isinstance(step, Step):
                if step.add is not None:
                    self.expiry.push(step.add)
                if step.ended_ms is not None:
                    ended.append(step.ended_ms)
        if ended:
            self.metrics.expired(ended, self.clock.now_ms())

    def _check_kernel(self) -> None:
        """After a refused batch: was the kernel changed behind our back (a hand flush)?

        Re-opening recreates missing chains, sets and tables and re-reads the index, so
        the batch is retried against the kernel as it is; a changed index asks the worker to
        reconcile at once instead of at the next interval.
        """
        before = dict(self.backend.committed().pairs())
        try:
            with self.kernel():
                self.backend.open()
        except BackendError as exc:
            logger.error("could not re-open the firewall after a refused batch: %s", exc)
            return
        if dict(self.backend.committed().pairs()) != before:
            logger.warning("the kernel's managed rules changed behind pushfw's back: reconciling")
            self.drifted = True
            self.rebuild_expiry()

    def _apply_alone(self, item: Decided) -> Step | BackendError:
        """Re-plan one decision against the kernel as it now stands and commit it alone."""
        step = plan(item.decision, self.backend.committed().get(item.key))
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
        def attempt() -> None:
            self._stage(steps)
            self.backend.commit()

        try:
            retry_busy(attempt)
        except BackendError as exc:
            return exc
        return None

    def _stage(self, steps: list[Step]) -> None:
        self.backend.discard()
        for step in steps:
            if step.add is not None:
                self.backend.add(step.add)
            elif step.delete is not None:
                self.backend.delete(step.delete)


def _log_batch(entries: list[Entry], final: list[Answer], started: float) -> None:
    """One INFO line per batch (DEBUG when all it did was echo expiries already logged)."""
    reported = [a for a in final if a.report]
    tally = Counter(a.status.value if a.status else "retry" for a in reported)
    # The scheduler's delete of a rule this host already removed on its own clock is
    # the usual end of a ban: the expiry was logged once already.
    echo = all(a.status is Status.UNCHANGED and a.is_expiry for a in reported)
    logger.log(
        logging.DEBUG if echo else logging.INFO,
        "batch of %d (%s..%s) in %.1f ms: %s",
        len(entries),
        entries[0].id,
        entries[-1].id,
        (time.perf_counter() - started) * 1000,
        ", ".join(f"{n} {s}" for s, n in sorted(tally.items())) or "none for this host",
    )
