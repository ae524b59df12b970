"""The union of named lists, as one set per action, family and prefix length holds it.

nftables matches every list of one action through shared sets (:mod:`.nftables`), so an
entry two lists hold is one element, which stays while either holds it and expires at the
later of their expiries (never, if either is permanent). The worker keeps each list's
entries packed and sorted (4 or 16 bytes each: a million IPv4 entries are 4 MB), and works
out what the shared sets must hold, and what changed, by merging these sorted runs:
no dict or set of a million objects is ever built.
"""

from __future__ import annotations

import abc
import bisect
import heapq
import ipaddress
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import itemgetter

from pushfw.producer.contract import Action
from pushfw.worker.backends.entries import Addresses

Group = tuple[int, int]
"""(IP version, prefix length): the entries one shared set holds."""

Op = tuple[Group, bytes, int | None, int | None]
"""One entry that changes in a shared set: (group, address, expiry before, expiry after)."""

ABSENT = -1
"""In a difference: the entry is not in the union on that side."""

_WIDTH = {4: 4, 6: 16}


@dataclass(frozen=True, slots=True)
class Held:
    """One list's entries as the worker loaded them: sorted packed addresses per group."""

    action: Action
    expires_ms: int | None
    groups: Mapping[Group, bytes]

    @classmethod
    def of(cls, action: Action, expires_ms: int | None, grouped: Mapping[Group, Addresses]) -> Held:
        groups = {}
        for group, addresses in grouped.items():
            if len(addresses):
                groups[group] = _sorted(addresses.packed(), _WIDTH[group[0]])
        return cls(action, expires_ms, groups)

    def size(self) -> int:
        return sum(len(packed) // _WIDTH[v] for (v, _), packed in self.groups.items())


class SharedLists:
    """What the list halves of the backends with shared sets (nftables, ipset) do alike."""

    _held: dict[str, Held]
    _marks: dict[str, Action]

    @abc.abstractmethod
    def _change(
        self, name: str, lists: dict[str, Held], action: Action | None, added: Held | None
    ) -> None:
        """Make the kernel hold ``lists`` (``name`` changed, now of ``action``, or removed)."""

    _unknown: set[str]

    @abc.abstractmethod
    def _settle(self, marks: dict[str, Action]) -> None:
        """Refill every action's shared sets from the loaded lists; ``marks`` the markers."""

    def settle(self) -> set[str]:
        """Forget the lists held before this start not loaded again: their markers go, and
        every entry no loaded list holds leaves the shared sets (it cannot be told from
        entries other lists dropped meanwhile). Returns their names."""
        gone = set(self._unknown)
        if gone:
            self._settle({n: a for n, a in self._marks.items() if n not in gone})
            self._unknown = set()
        return gone

    def remove_list(self, name: str) -> None:
        """Its entries out of the shared sets (those no other list holds), its marker gone."""
        if name not in self._marks and name not in self._held:
            return
        self._change(name, {n: h for n, h in self._held.items() if n != name}, None, None)

    @abc.abstractmethod
    def _element_counters(self) -> Iterator[tuple[Action, Group, bytes, int, int]]:
        """Each element of the live shared sets that matched packets: (action, group,
        packed address, packets, bytes), read from the kernel."""

    def held_entries(self) -> int:
        """How many entries the lists loaded since this start hold."""
        return sum(held.size() for held in self._held.values())

    def list_hits(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Each loaded list's entries that matched, found by a binary search of its sorted
        entries per counted element: the cost is the kernel's dump, not the lists' size."""
        found: dict[str, dict[str, tuple[int, int]]] = {name: {} for name in self._held}
        for action, group, key, packets, octets in self._element_counters():
            entry = ""
            for name, held in self._held.items():
                packed = held.groups.get(group) if held.action is action else None
                if packed is not None and _holds(packed, _WIDTH[group[0]], key):
                    entry = entry or f"{ipaddress.ip_address(key)}/{group[1]}"
                    found[name][entry] = (packets, octets)
        return found

    def _marks_after(self, name: str, action: Action | None) -> dict[str, Action]:
        """The markers once list ``name`` is of ``action`` (None: removed)."""
        marks = {n: a for n, a in self._marks.items() if n != name}
        if action is not None:
            marks[name] = action
        return marks


def _holds(packed: bytes, width: int, key: bytes) -> bool:
    """Is ``key`` among the sorted packed addresses?"""
    count = len(packed) // width
    at = bisect.bisect_left(range(count), key, key=lambda i: packed[i * width : (i + 1) * width])
    return at < count and packed[at * width : (at + 1) * width] == key


def _sorted(packed: bytes, width: int) -> bytes:
    """The addresses in ascending order, once each (big-endian bytes compare as the numbers
    do). The check holds no object per address: a sorted list's entries already are."""
    if all(a < b for a, b in itertools.pairwise(_keys(packed, width))):
        return packed
    return b"".join(sorted(set(_keys(packed, width))))


def _run(packed: bytes, width: int, expires_ms: int | None) -> Iterator[tuple[bytes, int | None]]:
    for start in range(0, len(packed), width):
        yield packed[start : start + width], expires_ms


def union(
    lists: Iterable[Held], action: Action, group: Group
) -> Iterator[tuple[bytes, int | None]]:
    """The entries of ``group`` that the lists of ``action`` hold, ascending, each with its
    expiry: None if a permanent list holds it, else the latest of its lists' expiries."""
    width = _WIDTH[group[0]]
    runs = [
        _run(held.groups[group], width, held.expires_ms)
        for held in lists
        if held.action is action and group in held.groups
    ]
    key: bytes | None = None
    expires: int | None = None
    for found, found_expires in heapq.merge(*runs, key=itemgetter(0)):
        if found == key:
            if expires is not None:
                expires = None if found_expires is None else max(expires, found_expires)
            continue
        if key is not None:
            yield key, expires
        key, expires = found, found_expires
    if key is not None:
        yield key, expires


def difference(
    old: Iterator[tuple[bytes, int | None]], new: Iterator[tuple[bytes, int | None]]
) -> Iterator[tuple[bytes, int | None, int | None]]:
    """(entry, expiry before, expiry after) of each entry that changed between two unions;
    :data:`ABSENT` on the side that does not hold it."""
    a, b = next(old, None), next(new, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield a[0], a[1], ABSENT
            a = next(old, None)
        elif a is None or b[0] < a[0]:
            yield b[0], ABSENT, b[1]
            b = next(new, None)
        else:
            if a[1] != b[1]:
                yield a[0], a[1], b[1]
            a, b = next(old, None), next(new, None)


def groups_of(lists: Iterable[Held], action: Action) -> set[Group]:
    """The groups the lists of ``action`` hold entries in: the shared sets they need."""
    return {group for held in lists if held.action is action for group in held.groups}


def _keys(packed: bytes, width: int) -> Iterator[bytes]:
    for start in range(0, len(packed), width):
        yield packed[start : start + width]


def _without(keys: Iterator[bytes], removed: Iterator[bytes]) -> Iterator[bytes]:
    """``keys`` less ``removed``, both ascending."""
    cut = next(removed, None)
    for key in keys:
        while cut is not None and cut < key:
            cut = next(removed, None)
        if key != cut:
            yield key


def changed(
    action: Action,
    expires_ms: int | None,
    base: Mapping[Group, bytes],
    add: Mapping[Group, Addresses],
    remove: Mapping[Group, Addresses],
) -> Held:
    """A list's entries (``base``) less ``remove``, plus ``add``, still sorted per group."""
    groups: dict[Group, bytes] = {}
    for group in sorted(set(base) | set(add)):
        width = _WIDTH[group[0]]
        gone = remove.get(group)
        removed = _keys(_sorted(gone.packed(), width), width) if gone is not None else iter(())
        kept = _without(_keys(base.get(group, b""), width), removed)
        more = add.get(group)
        added = _keys(_sorted(more.packed(), width), width) if more is not None else iter(())
        merged = bytearray()
        last = None
        for key in heapq.merge(kept, added):
            if key != last:
                merged += key
                last = key
        if merged:
            groups[group] = bytes(merged)
    return Held(action, expires_ms, groups)


def element_ops(
    action: Action, old: Iterable[Held], new: Iterable[Held], touched: list[Held], limit: int
) -> list[Op] | None:
    """What changes in the shared sets of ``action`` from the lists ``old`` to ``new``, in
    the groups of the ``touched`` lists (None: more than ``limit``: refill them instead)."""
    ops: list[Op] = []
    before, after = list(old), list(new)
    for group in sorted({g for h in touched for g in h.groups}):
        for key, was, will in difference(union(before, action, group), union(after, action, group)):
            ops.append((group, key, was, will))
            if len(ops) > limit:
                return None
    return ops
