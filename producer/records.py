"""What the workers keep in Redis besides streams: ledger records and host heartbeats.

Both are JSON values in hashes, read by ``pushfw list`` / ``pushfw status`` and by every
worker; the models here are the one definition of their shape.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["HostStatus", "RuleRecord", "rule_id"]


def rule_id(action: str, network: str) -> str:
    """A rule's identity in the ledger: one action for one network, e.g. ``drop 192.0.2.1/32``."""
    return f"{action} {network}"


class RuleRecord(BaseModel):
    """The newest command for one rule (a tombstone when ``deleted``).

    ``id`` is the stream entry id that set this state; folds compare it so that an older
    command arriving late never overwrites a newer one.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    action: str
    network: str
    expires_ms: int | None = None
    target: list[str] = []
    reason: str = ""
    origin: str = ""
    deleted: bool = False

    @property
    def rule_id(self) -> str:
        return rule_id(self.action, self.network)

    def targets(self, host: str, labels: frozenset[str]) -> bool:
        return not self.target or any(t == host or t in labels for t in self.target)

    def active_at(self, now_ms: int) -> bool:
        return not self.deleted and (self.expires_ms is None or self.expires_ms > now_ms)


class HostStatus(BaseModel):
    """One worker's heartbeat in ``{pushfw}:hosts``."""

    model_config = ConfigDict(frozen=True)

    host: str
    labels: list[str] = []
    version: str = ""
    backend: str = ""
    last_seen_ms: int
    started_ms: int = 0
    rules: int = 0
    lag: int | None = None
    pending: int = 0
    interval_s: float = 5.0
    state: str = "running"
    """``starting`` until the first reconcile is done, then ``running``."""
