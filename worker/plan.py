"""Planning: what a decision of the gate takes, given the rule as the kernel holds it.

The gate (:mod:`pushfw.worker.decide`) says what must be true of a rule on this host; a plan
says which change, if any, makes it so, and what to report once that change is committed.
Pure functions: the applier plans a batch against its index plus the batch's own earlier
steps, and again against the kernel alone when a batch is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from pushfw.producer.contract import Status
from pushfw.worker.backends.base import Rule, RuleKey
from pushfw.worker.decide import Add, Decision, Report

__all__ = ["Step", "plan"]


@dataclass(frozen=True, slots=True)
class Step:
    """A decision planned against the rules as they stand: the change to stage, if any.

    ``status`` is what to report once the change (if any) is committed.
    """

    status: Status
    detail: str
    add: Rule | None = None
    delete: RuleKey | None = None
    ended_ms: int | None = None
    """The expiry a scheduler's delete ends (the expiry-lag metric counts it)."""

    @property
    def changes(self) -> bool:
        return self.add is not None or self.delete is not None


def plan(decision: Decision, current: Rule | None) -> Step:
    """What ``decision`` takes, given the rule of its key as it stands (None: absent)."""
    if isinstance(decision, Report):
        return Step(decision.status, decision.detail)
    if isinstance(decision, Add):
        rule = decision.rule
        if current is not None and current.expires_ms == rule.expires_ms:
            return Step(Status.UNCHANGED, "already present")
        return Step(Status.APPLIED, "inserted" if current is None else "renewed", add=rule)
    if current is None:
        if decision.status is Status.APPLIED:
            return Step(Status.UNCHANGED, "not present")
        return Step(decision.status, decision.detail)
    limit = decision.expiring_by
    if limit is not None:
        if current.expires_ms is None or current.expires_ms > limit:
            return Step(Status.UNCHANGED, "renewed since it expired")
        return Step(Status.APPLIED, "deleted", delete=decision.key, ended_ms=current.expires_ms)
    if decision.status is Status.APPLIED:
        return Step(Status.APPLIED, "deleted", delete=decision.key)
    detail = f"{decision.detail}; removed the rule" if decision.detail else "removed the rule"
    return Step(decision.status, detail, delete=decision.key)
