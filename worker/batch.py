"""One record per entry of a batch, from the gate's decision to the answer this host gives.

An entry the gate never sees (trimmed, malformed, a list) is an :class:`Answer` at once; a
command for the gate is a :class:`Decided`, which the commit fills with its :class:`Step` (or
the error that refused it) and then turns into its answer. Nothing travels in parallel lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from pushfw.producer.contract import Status
from pushfw.producer.lists import ListCommand
from pushfw.producer.wire import ParsedCommand
from pushfw.worker.backends.base import RuleKey
from pushfw.worker.decide import Decision, Delete, Request
from pushfw.worker.errors import BackendError, PermanentBackendError, TransientBackendError
from pushfw.worker.plan import Step
from pushfw.worker.stream import Entry

__all__ = ["Answer", "Decided", "Item"]


@dataclass(slots=True)
class Answer:
    """What this host answers for one entry; ``status`` None: leave it pending, retry later.

    Never changed once built (a dead letter is a new one, made with ``replace``); not frozen
    only because one is built per command on the hot path, where frozen costs 1 us each.
    """

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

    @property
    def is_expiry(self) -> bool:
        """The scheduler's delete (``origin ttl``)."""
        cmd = self.command
        return cmd is not None and cmd.origin == "ttl" and not cmd.is_insert

    @property
    def wants_result(self) -> bool:
        """Results on request: for commands that ask, and always for rejected and failed ones."""
        if self.status in (Status.REJECTED, Status.FAILED):
            return True
        return self.command is not None and self.command.wants_result


@dataclass(slots=True)
class Decided:
    """One entry with the gate's decision for it, and then the step planned and committed."""

    entry: Entry
    request: Request
    decision: Decision
    step: Step | BackendError | None = None

    @property
    def key(self) -> RuleKey:
        return self.request.key

    def answer(self) -> Answer:
        """The answer once the batch is committed (status None: left pending for a retry)."""
        decision, request, step = self.decision, self.request, self.step
        report = not isinstance(decision, Delete) or decision.report
        request_id = request.command.request_id if request.command is not None else ""
        if isinstance(step, BackendError):
            return Answer(
                self.entry,
                None,
                str(step),
                request_id,
                request.command,
                report,
                permanent=isinstance(step, PermanentBackendError),
                busy=isinstance(step, TransientBackendError),
            )
        assert step is not None
        return Answer(self.entry, step.status, step.detail, request_id, request.command, report)


Item = Answer | Decided
"""An entry of a batch: answered already, or decided and waiting for its commit."""
