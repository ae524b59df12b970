"""Reconciliation: make the managed firewall exactly the ledger's active rules for this host.

Runs at start (also after a reboot emptied the kernel tables), after every Redis
reconnect, periodically, and on ``pushfw-worker reconcile``. Every record goes through the
same gate as a stream entry (:mod:`pushfw.worker.decide`). A host that joins late
converges here from the ledger instead of replaying history.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain, islice

from pushfw.producer.contract import Action
from pushfw.producer.records import RuleRecord
from pushfw.worker.backends.base import Backend, CommittedRules, Rule, RuleKey
from pushfw.worker.backends.index import RuleIndex, unpacked
from pushfw.worker.decide import Add, Delete, Policy, decide_record
from pushfw.worker.errors import BackendError, TransientBackendError

logger = logging.getLogger(__name__)

ACCEPT, DROP, WATCH = Action.ACCEPT, Action.DROP, Action.WATCH
_COMMIT_CHUNK = 50_000
"""Changes per kernel commit. A reboot's million adds in one nftables transaction would
hold the whole transaction in the worker's memory (libnftables), as a list load did."""


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


def desired_rules(
    records: Iterable[RuleRecord],
    policy: Policy,
    now_ms: int,
    verified: Mapping[str, RuleRecord] | None = None,
) -> Desired:
    """Ask the gate about every record: reconcile installs only what the stream path would.

    ``verified``: the ledger's held records by rule id, the state a host with
    ``require_signature`` takes where it refuses the newest record
    (:func:`~pushfw.worker.decide.decide_record`).
    """
    present, absent = RuleIndex(), RuleIndex()
    held: set[RuleKey] = set()
    unmet = dict(verified or {})
    for record in chain(records, [None]):
        if record is None:  # then the held records of rules the ledger forgot
            decided = [decide_record(None, r, policy, now_ms) for r in unmet.values()]
        else:
            decided = [decide_record(record, unmet.pop(record.rule_id, None), policy, now_ms)]
        for found in decided:
            if found is None:
                continue
            key, decision = found
            if isinstance(decision, Add):
                present[decision.rule.key] = decision.rule
            elif isinstance(decision, Delete):
                absent[decision.key] = Rule(decision.key, None)
            else:
                held.add(key)
    return Desired(present, absent, frozenset(held))


def reconcile(backend: Backend, desired: Desired, remove_extras: bool = True) -> Drift:
    """Add what is missing, fix expiries, remove what must go; one commit when the kernel agrees.

    Rules the ledger does not speak of are removed too, unless ``remove_extras`` is False
    (the ledger is not known to be the one this host converged with). A change the kernel
    refuses (a network a set type cannot hold, a full set) is isolated by halving the batch,
    so it costs only itself: every other change is made and the refused ones are reported.

    The changes are committed :data:`_COMMIT_CHUNK` at a time, in an order that never
    drops what the end state accepts (:func:`_changes`); a kernel that agrees costs a pass
    over integers and no commit.

    Raises:
        TransientBackendError: the kernel was busy (xtables lock); the chunks before it
            were made, nothing of it.
    """
    started = time.perf_counter()
    held_before = len(backend.committed())
    made: Counter[str] = Counter()
    refused: list[tuple[RuleKey, BackendError]] = []
    for chunk in _batched(_changes(backend, desired, remove_extras), _COMMIT_CHUNK):
        refused_now = dict(_commit(backend, [(key, rule) for key, rule, _ in chunk]))
        refused += refused_now.items()
        for key, rule, replacing in chunk:
            if key not in refused_now:
                made["removed" if rule is None else "updated" if replacing else "added"] += 1
    added, removed, updated = made["added"], made["removed"], made["updated"]
    drift = Drift(
        added,
        removed,
        updated,
        held_before - updated - removed,
        time.perf_counter() - started,
        tuple((key, str(exc)) for key, exc in refused),
    )
    for key, error in drift.refused[:10]:
        logger.error("reconcile: the kernel refused %s: %s", key, error)
    return drift


_Change = tuple[RuleKey, Rule | None, bool]
"""A rule to set (None: to remove), and whether the kernel holds it with another expiry."""


def _changes(backend: Backend, desired: Desired, remove_extras: bool) -> Iterator[_Change]:
    """What the kernel lacks or must lose, made as it is read: accepts added or renewed
    first, then drops removed, drops added, and accepts removed, so that no packet the
    end state accepts meets a drop between two chunks; watches (no verdict) come last."""
    index = backend.committed()
    phases = ((ACCEPT, True), (DROP, False), (DROP, True), (ACCEPT, False))
    for action, adding in (*phases, (WATCH, True), (WATCH, False)):
        if adding:
            yield from _missing(index, desired, action)
        else:
            yield from _extras(index, desired, action, remove_extras)


def _missing(index: CommittedRules, desired: Desired, action: Action) -> Iterator[_Change]:
    for version, packed, expiry in desired.present.packed_of(action):
        have = index.expiry_of(action, version, packed)
        if have != expiry:
            rule = unpacked(action, version, packed, expiry)
            yield rule.key, rule, have is not None


def _extras(
    index: CommittedRules, desired: Desired, action: Action, remove_extras: bool
) -> Iterator[_Change]:
    """The kernel's rules of ``action`` the ledger does not hold, one at a time."""
    keys = (
        unpacked(action, version, packed, expiry).key
        for version, packed, expiry in index.packed_of(action)
        if desired.present.expiry_of(action, version, packed) is None
    )
    for key in keys:
        if key in desired.held:
            continue
        if remove_extras or key in desired.absent:
            yield key, None, False


def _batched(changes: Iterator[_Change], size: int) -> Iterator[list[_Change]]:
    while chunk := list(islice(changes, size)):
        yield chunk


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
