"""Reconciliation: make the managed firewall exactly the ledger's active rules for this host.

Runs at start (also after a reboot emptied the kernel tables), periodically, and on
``pushfw-worker reconcile``. A host that joins late converges here from the ledger instead
of replaying history.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pushfw.producer.contract import Action
from pushfw.producer.records import RuleRecord
from pushfw.worker.backends.base import Backend, Rule, RuleKey

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    """What a reconcile changed."""

    added: int
    removed: int
    updated: int
    kept: int
    seconds: float

    @property
    def changed(self) -> int:
        return self.added + self.removed + self.updated


def desired_rules(
    records: Iterable[RuleRecord], host: str, labels: frozenset[str], now_ms: int
) -> dict[RuleKey, Rule]:
    """The rules this host should hold: active records that target it."""
    desired: dict[RuleKey, Rule] = {}
    for record in records:
        if record.active_at(now_ms) and record.targets(host, labels):
            key = RuleKey(Action(record.action), ipaddress.ip_network(record.network))
            desired[key] = Rule(key, record.expires_ms)
    return desired


def reconcile(backend: Backend, desired: dict[RuleKey, Rule], remove_extras: bool = True) -> Drift:
    """Add what is missing, fix expiries, remove managed extras (unless told not to); one commit.

    Raises:
        BackendError: the kernel refused the batch; nothing was changed.
    """
    started = time.perf_counter()
    current = backend.snapshot()
    added = updated = removed = 0
    for key, rule in desired.items():
        have = current.get(key)
        if have == rule:
            continue
        backend.add(rule)
        if have is None:
            added += 1
        else:
            updated += 1
    for key in current.keys() - desired.keys() if remove_extras else ():
        backend.delete(key)
        removed += 1
    if added or updated or removed:
        backend.commit()
    drift = Drift(
        added, removed, updated, len(desired) - added - updated, time.perf_counter() - started
    )
    if drift.changed:
        logger.warning(
            "reconcile repaired drift: %d added, %d removed, %d expiry fixed (%d kept) in %.2f s",
            added,
            removed,
            updated,
            drift.kept,
            drift.seconds,
        )
    else:
        logger.info(
            "reconcile: kernel matches the ledger (%d rules) in %.2f s", drift.kept, drift.seconds
        )
    return drift
