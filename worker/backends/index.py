"""The set backends' index of committed rules, packed in sorted integer arrays.

A dict of :class:`RuleKey` to :class:`Rule` made a host with a million rules hold a gigabyte
just to know what its kernel holds (docs/internals.md, "A host's work per command"). Keys and
rules are built again when asked for, so nothing outside this module sees the packing.
"""

from __future__ import annotations

import ipaddress
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, MutableMapping

from pushfw.producer.contract import Action, Network
from pushfw.worker.backends.base import (
    Backend,
    CommittedRules,
    Rule,
    RuleKey,
    no_wait_told,
    wall_ms,
)

__all__ = ["IndexedBackend", "RuleIndex", "unpacked"]

_MERGE_AT = 4096
"""Changes held apart before a merge, at least; a merge also waits for 1/16 of the arrays."""
_REMOVED = -1
"""The expiry a pending change records for a removed rule (0 means none)."""


def _network(packed: int, version: int) -> Network:
    if version == 4:
        return ipaddress.IPv4Network((packed >> 8, packed & 0xFF))
    return ipaddress.IPv6Network((packed >> 8, packed & 0xFF))


class _Run:
    """The IPv4 rules of one action: sorted packed keys with expiries, and pending changes."""

    def __init__(self) -> None:
        self.keys = array("Q")
        self.expiries = array("q")
        self.pending: dict[int, int] = {}
        self.size = 0

    def find(self, packed: int) -> int | None:
        """The expiry held for ``packed`` (0: none), or None when absent."""
        expiry = self.pending.get(packed)
        if expiry is not None:
            return None if expiry == _REMOVED else expiry
        at = bisect_left(self.keys, packed)
        if at < len(self.keys) and self.keys[at] == packed:
            return self.expiries[at]
        return None

    def put(self, packed: int, expiry: int, present: bool | None = None) -> None:
        """Hold ``packed`` with ``expiry`` (0: none), or remove it (:data:`_REMOVED`);
        ``present``: whether it is held now, when the caller just looked."""
        was = self.find(packed) is not None if present is None else present
        self.size += (expiry != _REMOVED) - was
        self.pending[packed] = expiry
        if len(self.pending) >= max(_MERGE_AT, len(self.keys) >> 4):
            self.merge()

    def merge(self) -> None:
        """Fold the pending changes into the arrays: one slice copy per run between them."""
        keys, expiries = array("Q"), array("q")
        start = 0
        for packed in sorted(self.pending):
            at = bisect_left(self.keys, packed, start)
            keys.extend(self.keys[start:at])
            expiries.extend(self.expiries[start:at])
            start = at + 1 if at < len(self.keys) and self.keys[at] == packed else at
            expiry = self.pending[packed]
            if expiry != _REMOVED:
                keys.append(packed)
                expiries.append(expiry)
        keys.extend(self.keys[start:])
        expiries.extend(self.expiries[start:])
        self.keys, self.expiries, self.pending = keys, expiries, {}

    def items(self) -> Iterator[tuple[int, int]]:
        self.merge()
        return zip(self.keys, self.expiries, strict=True)


class RuleIndex(MutableMapping[RuleKey, Rule]):
    """What the kernel holds, rule by rule, as a mapping from key to rule (see the module).

    A backend hands it out read-only, as :class:`~.base.CommittedRules`.
    """

    def __init__(self) -> None:
        self._v4 = {action: _Run() for action in Action}
        self._v6: dict[Action, dict[int, int]] = {action: {} for action in Action}

    def get(self, key: RuleKey, default: Rule | None = None) -> Rule | None:  # type: ignore[override]
        if key.network.version == 4:
            expiry = self._v4[key.action].find(key.packed)
        else:
            expiry = self._v6[key.action].get(key.packed)
        return default if expiry is None else Rule(key, expiry or None)

    def __getitem__(self, key: RuleKey) -> Rule:
        rule = self.get(key)
        if rule is None:
            raise KeyError(key)
        return rule

    def __contains__(self, key: object) -> bool:
        return isinstance(key, RuleKey) and self.get(key) is not None

    def __setitem__(self, key: RuleKey, rule: Rule) -> None:
        if rule.key is not key and rule.key != key:
            raise ValueError(f"rule {rule.key} filed under {key}")
        expiry = rule.expires_ms or 0
        if key.network.version == 4:
            self._v4[key.action].put(key.packed, expiry)
        else:
            self._v6[key.action][key.packed] = expiry

    def __delitem__(self, key: RuleKey) -> None:
        if self.pop(key) is None:
            raise KeyError(key)

    def __len__(self) -> int:
        return sum(run.size for run in self._v4.values()) + sum(map(len, self._v6.values()))

    def __iter__(self) -> Iterator[RuleKey]:
        for key, _ in self.pairs():
            yield key

    def pairs(self) -> Iterator[tuple[RuleKey, Rule]]:
        """Every key with its rule, built as it goes (IPv4 first, in address order)."""
        for version, packed_items in self._packed():
            for action, packed, expiry in packed_items:
                key = RuleKey(action, _network(packed, version))
                yield key, Rule(key, expiry or None)

    def _packed(self) -> Iterator[tuple[int, Iterator[tuple[Action, int, int]]]]:
        yield (
            4,
            (
                (action, packed, expiry)
                for action, run in self._v4.items()
                for packed, expiry in run.items()
            ),
        )
        yield (
            6,
            (
                (action, packed, expiry)
                for action, rules in self._v6.items()
                for packed, expiry in list(rules.items())
            ),
        )

    def pop(self, key: RuleKey, default: Rule | None = None) -> Rule | None:  # type: ignore[override]
        """Remove ``key`` and return its rule, or ``default`` if absent (one lookup)."""
        rule = self.get(key)
        if rule is None:
            return default
        if key.network.version == 4:
            self._v4[key.action].put(key.packed, _REMOVED, present=True)
        else:
            del self._v6[key.action][key.packed]
        return rule

    def clear(self) -> None:
        self._v4 = {action: _Run() for action in Action}
        self._v6 = {action: {} for action in Action}

    def count(self, action: Action) -> int:
        """How many rules of ``action`` it holds, without building them."""
        return self._v4[action].size + len(self._v6[action])

    def counts(self) -> dict[Action, int]:
        """How many rules of each action it holds: a million rules are never built to be
        counted (the rules gauge reads this at every heartbeat)."""
        return {action: self.count(action) for action in Action}

    def timed(self) -> Iterator[Rule]:
        """Only the timed rules are built: permanent ones are skipped as integers."""
        for action in Action:
            for version, packed, expiry in self.packed_of(action):
                if expiry:
                    yield unpacked(action, version, packed, expiry)

    def packed_of(self, action: Action) -> Iterator[tuple[int, int, int]]:
        """``(version, packed key, expiry or 0)`` of every rule of ``action``, none built:
        a pass over a million rules compares integers, not networks."""
        for packed, expiry in self._v4[action].items():
            yield 4, packed, expiry
        for packed, expiry in list(self._v6[action].items()):
            yield 6, packed, expiry

    def expiry_of(self, action: Action, version: int, packed: int) -> int | None:
        """The expiry (0: none) held for a packed key, or None when absent."""
        if version == 4:
            return self._v4[action].find(packed)
        return self._v6[action].get(packed)


def unpacked(action: Action, version: int, packed: int, expiry: int) -> Rule:
    """The rule a packed entry of :meth:`RuleIndex.packed_of` stands for."""
    return Rule(RuleKey(action, _network(packed, version)), expiry or None)


class IndexedBackend(Backend):
    """A backend whose index is a :class:`RuleIndex` and whose staged changes are one list.

    Subclasses fill ``_index`` in :meth:`open`, and in :meth:`commit` apply ``_staged``
    (``(key, rule)`` to add or replace, ``(key, None)`` to delete) and update ``_index``.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], int] = wall_ms,
        lock_waited: Callable[[float], None] = no_wait_told,
    ) -> None:
        super().__init__(clock=clock, lock_waited=lock_waited)
        self._index = RuleIndex()
        self._staged: list[tuple[RuleKey, Rule | None]] = []

    def close(self) -> None:
        """Forget staged changes; never touch the kernel."""
        self.discard()

    def committed(self) -> CommittedRules:
        """The packed index itself, read-only for the caller."""
        return self._index

    def add(self, rule: Rule) -> None:
        self._staged.append((rule.key, rule))

    def delete(self, key: RuleKey) -> None:
        self._staged.append((key, None))

    def discard(self) -> None:
        self._staged.clear()
