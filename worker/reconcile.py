"""Reconciliation: make the managed firewall exactly the ledger's active rules for this host.

Runs at start (also after a reboot emptied the kernel tables), after every Redis
reconnect, periodically, and on ``pushfw-worker reconcile``. Every record goes through the
same gate as a stream entry (:mod:`pushfw.worker.decide`). A host that joins late
converges here from the ledger instead of replaying history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pushfw.producer.records import RuleRecord
from pushfw.producer.render import plural
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.backends.index import RuleIndex
from pushfw.worker.decide import Add, Delete, Policy, decide, request_from_record
from pushfw.worker.errors import BackendError, TransientBackendError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    """What a reconcile changed."""

    added: int
    removed: int
    updated: int
    kept: int
    seconds: float
    refused: tuple[tuple[RuleKey, str], ...] = ()
    """Changes the kernel refused (rule, error); every other change was made."""

    @property
    def changed(self) -> int:
        return self.added + self.removed + self.updated


@dataclass(frozen=True)
class Desired:
    """What the ledger says of this host's kernel, rule by rule, through the gate.

    ``present``: rules that must be there, with their expiry; ``absent``: rules that must
    not be; ``held``: rules whose newest command this host refuses as a whole (a signature
    it cannot verify), which keep the state they have, as on the stream path. ``present``
    and ``absent`` are packed (:class:`RuleIndex`, 16 bytes a rule): a dict of a million
    rules was most of a gigabyte at every reconcile.
    """

    present: RuleIndex
    absent: RuleIndex
    held: frozenset[RuleKey]


def desired_rules(records: Iterable[RuleRecord], policy: Policy, now_ms: int) -> Desired:
    """Ask the gate about every record: reconcile installs only what the stream path would."""
    present, absent = RuleIndex(), RuleIndex()
    held: set[RuleKey] = set()
    for record in records:
        request = request_from_record(record)
        if request is None:
            continue
        decision = decide(request, policy, now_ms)
        if isinstance(decision, Add):
            present[decision.rule.key] = decision.rule
        elif isinstance(decision, Delete):
            absent[decision.key] = Rule(decision.key, None)
        else:
            held.add(request.key)
    return Desired(present, absent, frozenset(held))


def reconcile(backend: Backend, desired: Desired, remove_extras: bool = True) -> Drift:
    """Add what is missing, fix expiries, remove what must go; one commit when the kernel agrees.

    Rules the ledger does not speak of are removed too, unless ``remove_extras`` is False
    (the ledger is not known to be the one this host converged with). A change the kernel
    refuses (a network a set type cannot hold, a full set) is isolated by halving the batch,
    so it costs only itself: every other change is made and the refused ones are reported.

    Raises:
        TransientBackendError: the kernel was busy (xtables lock); nothing was changed.
    """
    started = time.perf_counter()
    held_before = backend.size()
    changes: list[tuple[RuleKey, Rule | None]] = []
    replacing: set[RuleKey] = set()  # changes of a rule the kernel holds with another expiry
    for key, rule in desired.present.pairs():
        have = backend.get(key)
        if have != rule:
            changes.append((key, rule))
            if have is not None:
                replacing.add(key)
    for key, _ in backend.committed():  # one rule at a time: no dict of the whole kernel
        if key in desired.present or key in desired.held:
            continue
        if remove_extras or key in desired.absent:
            changes.append((key, None))
    refused = dict(_commit(backend, changes)) if changes else {}
    made = [(key, rule) for key, rule in changes if key not in refused]
    updated = sum(1 for key, rule in made if rule is not None and key in replacing)
    added = sum(1 for _, rule in made if rule is not None) - updated
    removed = sum(1 for _, rule in made if rule is None)
    kept = held_before - updated - removed
    drift = Drift(
        added,
        removed,
        updated,
        kept,
        time.perf_counter() - started,
        tuple((key, str(exc)) for key, exc in refused.items()),
    )
    for key, error in drift.refused[:10]:
        logger.error("reconcile: the kernel refused %s: %s", key, error)
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
            "reconcile: kernel matches the ledger (%s) in %.2f s",
            plural(drift.kept, "rule"),
            drift.seconds,
        )
    return drift


def _commit(
    backend: Backend, changes: list[tuple[RuleKey, Rule | None]]
) -> list[tuple[RuleKey, BackendError]]:
    """Commit ``changes``; on a refusal, each half on its own, down to the refused changes."""
    for key, rule in changes:
        if rule is None:
            backend.delete(key)
        else:
            backend.add(rule)
    try:
        backend.commit()
    except TransientBackendError:
        backend.discard()
        raise
    except BackendError as exc:
        backend.discard()
        if len(changes) == 1:
            return [(changes[0][0], exc)]
        half = len(changes) // 2
        return _commit(backend, changes[:half]) + _commit(backend, changes[half:])
    return []
