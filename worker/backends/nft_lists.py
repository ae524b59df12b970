"""Named lists in the nftables backend: the lists of one action share a set per family and
prefix length (:mod:`.union`), and a refill fills the other slot and swaps it in.

A marker set per loaded list (``mark_<action>_<name>``) says in the kernel which lists are
held, so a restart knows them; the rules matching the shared sets are written by the
backend's schema with the rules' own. The layout and why: docs/internals.md.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pushfw.producer.contract import Action
from pushfw.worker.backends.base import BlockList
from pushfw.worker.backends.entries import list_entries
from pushfw.worker.backends.union import (
    ABSENT,
    Group,
    Held,
    Op,
    SharedLists,
    changed,
    element_ops,
    groups_of,
    union,
)
from pushfw.worker.errors import BackendError, PermanentBackendError

logger = logging.getLogger(__name__)

Json = dict[str, Any]

_LIST_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")
UNION = re.compile(
    r"lists_(?P<action>drop|accept|watch)(?P<version>[46])_(?P<prefix>\d{1,3})(?P<slot>b?)"
)
_MARK = re.compile(rf"mark_(?P<action>drop|accept|watch)_(?P<name>{_LIST_NAME.pattern})")
LIST_SET = re.compile(  # a list's own set, before lists shared sets: removed at open
    rf"list_(?P<action>drop|accept|watch)_(?P<name>{_LIST_NAME.pattern})(?P<version>[46])"
    rf"_(?P<prefix>\d{{1,3}})(?P<slot>b?)"
)


def union_set_name(action: Action, version: int, prefixlen: int, slot: str = "") -> str:
    """The shared set holding the /``prefixlen`` entries of one family of the lists of
    ``action``; ``slot`` ("" or "b") alternates between refills."""
    return f"lists_{action.value}{version}_{prefixlen}{slot}"


def mark_name(action: Action, name: str) -> str:
    """The empty set whose name says that list ``name`` of ``action`` is loaded."""
    return f"mark_{action.value}_{name}"


def marks_in(set_names: Iterable[str]) -> dict[str, Action]:
    found = (_MARK.fullmatch(n) for n in set_names)
    return {p["name"]: Action(p["action"]) for p in found if p}


def _action_of(name: str) -> Action:
    parsed = UNION.fullmatch(name)
    assert parsed is not None
    return Action(parsed["action"])


def _checked_list_name(name: str) -> str:
    if not _LIST_NAME.fullmatch(name):
        raise PermanentBackendError(f"list name {name[:40]!r}: use {_LIST_NAME.pattern}")
    return name


class NftLists(SharedLists):
    """The list half of :class:`~.nftables.NftablesBackend`: its shared sets and markers."""

    table: str
    hooks: list[str]
    _sets: set[str]
    _chains: set[str]

    list_chunk = 50_000
    """A change of more elements refills the action's shared sets in the other slot, a
    transaction of this many at a time, and swaps them in with one more: libnftables holds
    a whole transaction in the worker's memory (a million elements in one took 581 MB)."""

    def _forget_lists(self) -> None:
        """No list held: the state of a fresh start, or after an uninstall."""
        self._held: dict[str, Held] = {}
        """The entries of each list loaded since this start."""
        self._marks: dict[str, Action] = {}
        """The lists whose marker set is in the kernel, and their action."""
        self._unknown: set[str] = set()
        """Lists the kernel held at start that have not been loaded again since."""
        self._slot: dict[Action, str] = dict.fromkeys(Action, "")
        self._union: dict[Action, set[Group]] = {a: set() for a in Action}
        """Per action, the groups whose shared set (in its live slot) the rules match."""

    @abc.abstractmethod
    def _run(self, commands: list[Json]) -> Any:
        """Run one nft transaction (the backend's)."""

    @abc.abstractmethod
    def _t(self, **fields: Any) -> Json:
        """An object of the backend's table."""

    @abc.abstractmethod
    def _set_names(self) -> set[str]:
        """The names of the table's sets."""

    @abc.abstractmethod
    def _matched_sets(self) -> set[str]:
        """The sets the table's rules look up."""

    @abc.abstractmethod
    def _empty(self, name: str) -> bool:
        """Does the kernel's set hold no element?"""

    @abc.abstractmethod
    def _timeout_s(self, expires_ms: int) -> int:
        """The kernel timeout for an expiry."""

    @abc.abstractmethod
    def _hook_commands(self) -> list[Json]:
        """Each hook's base chain, created if missing, and emptied."""

    @abc.abstractmethod
    def _schema_commands(
        self, sets: set[str], unions: dict[Action, list[str]] | None = None
    ) -> list[Json]:
        """Rule sets, base chains and their rules, rewritten as one transaction."""

    def _open_lists(self, names: set[str]) -> list[str]:
        """Take the lists' state from the set names; returns the list sets to delete: a
        slot no rule matches (a refill cut short), and sets of one list each (before lists
        shared sets: those lists are loaded again, as after a reboot)."""
        self._marks = marks_in(names)
        self._held = {  # an open again (a reconcile) keeps what this process loaded
            n: held for n, held in self._held.items() if self._marks.get(n) is held.action
        }
        self._unknown = set(self._marks) - set(self._held)
        slots: dict[tuple[Action, str], set[Group]] = {}
        for name in names:
            if parsed := UNION.fullmatch(name):
                group = (int(parsed["version"]), int(parsed["prefix"]))
                slots.setdefault((Action(parsed["action"]), parsed["slot"]), set()).add(group)
        matched: set[str] | None = None
        stale = sorted(n for n in names if LIST_SET.fullmatch(n))
        for action in Action:
            found = [slot for slot in ("", "b") if (action, slot) in slots]
            live = found[0] if found else ""
            if len(found) == 2:
                if matched is None:
                    matched = self._matched_sets()
                if any(union_set_name(action, *g, "b") in matched for g in slots[(action, "b")]):
                    live = "b"
                gone = "" if live == "b" else "b"
                stale += sorted(union_set_name(action, *g, gone) for g in slots[(action, gone)])
            self._slot[action] = live
            self._union[action] = slots.get((action, live), set())
            if action not in self._marks.values():  # entries of no list that is held
                stale += sorted(union_set_name(action, *g, live) for g in self._union[action])
                self._union[action] = set()
        return stale

    def list_names(self) -> set[str]:
        """The lists whose marker set exists, less those with entries in a shared set that
        holds nothing now (flushed by hand): each is a list to load again."""
        try:
            emptied = self._emptied_groups()
        except OSError as exc:
            logger.debug("nftables list sets not checked for elements: %s", exc)
            emptied = set()
        return {
            name
            for name, action in marks_in(self._set_names()).items()
            if not any(
                (held.action, group) in emptied
                for held in [self._held.get(name)]
                if held is not None and held.action is action
                for group in held.groups
            )
        }

    def _emptied_groups(self) -> set[tuple[Action, Group]]:
        """The live shared sets the loaded lists fill that hold no element in the kernel."""
        wanted = {(a, g) for a in Action for g in groups_of(self._held.values(), a)}
        return {
            (action, group)
            for action, group in sorted(wanted & self._live_groups())
            if self._empty(union_set_name(action, *group, self._slot[action]))
        }

    def _element_counters(self) -> Iterator[tuple[Action, Group, bytes, int, int]]:
        """One listing per live shared set; elements that matched nothing are skipped."""
        for action, group in sorted(self._live_groups()):
            name = union_set_name(action, *group, self._slot[action])
            listing = self._run([{"list": {"set": self._t(name=name)}}]) or {}
            family = socket.AF_INET if group[0] == 4 else socket.AF_INET6
            for item in listing.get("nftables", []):
                for raw in item.get("set", {}).get("elem", []):
                    elem = raw.get("elem") if isinstance(raw, dict) else None
                    if not isinstance(elem, dict):
                        continue  # an element without a counter, in JSON a bare address
                    counter = elem.get("counter")
                    if isinstance(counter, dict) and counter.get("packets"):
                        key = socket.inet_pton(family, str(elem["val"]))
                        yield action, group, key, int(counter["packets"]), int(counter["bytes"])

    def _live_groups(self) -> set[tuple[Action, Group]]:
        return {(a, g) for a, groups in self._union.items() for g in groups}

    def load_list(self, spec: BlockList, networks: Iterable[str]) -> None:
        """The list's entries into its action's shared sets, what only its old content held
        out, and its marker set made: one transaction as packets see it (a change of more
        than :attr:`list_chunk` elements refills the shared sets in the other slot)."""
        name = _checked_list_name(spec.name)
        started = time.monotonic()
        held = Held.of(spec.action, spec.expires_ms, list_entries(networks))
        self._change(name, {**self._held, name: held}, spec.action, held)
        logger.info(
            "nftables list %s (%s): %d entries loaded in %.2f s",
            name,
            spec.action.value,
            held.size(),
            time.monotonic() - started,
        )

    def change_list(self, spec: BlockList, add: Sequence[str], remove: Sequence[str]) -> None:
        """The list's new content is its old one, less ``remove``, plus ``add``."""
        name = _checked_list_name(spec.name)
        loaded = self._marks.get(name)
        if loaded is not None and loaded is not spec.action:
            raise PermanentBackendError(
                f"list {name} is loaded as {loaded.value}, not {spec.action.value}: "
                "load it again to change its action"
            )
        old = self._held.get(name)
        if old is None and loaded is not None:
            raise PermanentBackendError(f"list {name} was loaded before this start: load it whole")
        base = old.groups if old is not None else {}
        held = changed(spec.action, spec.expires_ms, base, list_entries(add), list_entries(remove))
        self._change(name, {**self._held, name: held}, spec.action, held)

    def _change(
        self, name: str, lists: dict[str, Held], action: Action | None, added: Held | None
    ) -> None:
        """Make the kernel hold ``lists`` (``name`` changed, now of ``action``, or removed)."""
        marks = self._marks_after(name, action)
        if self._unknown - {name}:  # what the other lists held before this start is unknown
            self._add_only(name, lists, marks, added)
        elif name in self._unknown:  # the last list held before this start: settle
            self._apply(lists, marks, set(Action), {})
        else:
            self._apply(lists, marks, *self._plan(name, lists))
        self._unknown.discard(name)

    def _settle(self, marks: dict[str, Action]) -> None:
        self._apply(dict(self._held), marks, set(Action), {})

    def _plan(
        self, name: str, lists: dict[str, Held]
    ) -> tuple[set[Action], dict[Action, list[Op] | None]]:
        """The actions whose shared sets are refilled, and the element changes of the others
        (None: too many, refilled too); a set emptied by hand is refilled."""
        touched = [h for h in (self._held.get(name), lists.get(name)) if h is not None]
        emptied = {a for a, _ in self._emptied_groups()}
        rebuild = {h.action for h in touched} & emptied
        ops: dict[Action, list[Op] | None] = {}
        for act in {h.action for h in touched} - rebuild:
            ops[act] = element_ops(
                act, self._held.values(), lists.values(), touched, self.list_chunk
            )
        rebuild |= {a for a, found in ops.items() if found is None}
        return rebuild, ops

    def _apply(
        self,
        lists: dict[str, Held],
        marks: dict[str, Action],
        rebuild: set[Action],
        ops: dict[Action, list[Op] | None],
    ) -> None:
        """Refill the actions of ``rebuild``, change the elements of the others and commit;
        a refused change refills its action's sets instead."""
        slots = {a: self._fill(a, lists) for a in sorted(rebuild)}
        changes = {a: o for a, o in ops.items() if o and a not in rebuild}
        try:
            self._commit_lists(lists, marks, changes, slots)
        except BackendError as exc:
            if not changes:
                raise
            # an element deleted by hand (or timed out) fails the whole transaction: refill
            logger.warning("nftables lists: change refused (%s); refilling the sets", exc)
            slots = {a: self._fill(a, lists) for a in sorted(set(changes) | set(slots))}
            self._commit_lists(lists, marks, {}, slots)

    def _add_only(
        self, name: str, lists: dict[str, Held], marks: dict[str, Action], added: Held | None
    ) -> None:
        """Add the list's entries to the live shared sets and delete nothing: lists held
        before this start may hold anything there until each is loaded again."""
        self._commit_lists(lists, marks, {}, {}, keep_sets=True)  # sets, rules, marker
        if added is None:
            return
        for group, packed in sorted(added.groups.items()):
            target = union_set_name(added.action, *group, self._slot[added.action])
            width = 4 if group[0] == 4 else 16
            step = self.list_chunk * width  # a chunk per transaction, its strings made then
            for first in range(0, len(packed), step):
                elems = [
                    self._list_elem(group, packed[i : i + width], added.expires_ms)
                    for i in range(first, min(first + step, len(packed)), width)
                ]
                self._run([{"add": {"element": self._t(name=target, elem=elems)}}])

    def _fill(self, action: Action, lists: dict[str, Held]) -> str:
        """Fill the shared sets of ``action`` in the slot no rule matches, a chunk per
        transaction; returns that slot. On a refusal they are deleted and the live slot stays."""
        slot = "" if self._slot[action] else "b"
        stale = sorted(
            n
            for n in self._set_names()
            if (p := UNION.fullmatch(n)) and p["action"] == action.value and p["slot"] == slot
        )
        groups = sorted(groups_of(lists.values(), action))
        names = [union_set_name(action, *g, slot) for g in groups]
        try:
            cmds = [{"delete": {"set": self._t(name=n)}} for n in stale]
            self._run(cmds + [{"add": {"set": self._list_set(n)}} for n in names])
            for group, set_name_ in zip(groups, names, strict=True):
                chunk: list[Any] = []
                for key, expires in union(lists.values(), action, group):
                    chunk.append(self._list_elem(group, key, expires))
                    if len(chunk) >= self.list_chunk:
                        self._run([{"add": {"element": self._t(name=set_name_, elem=chunk)}}])
                        chunk = []
                if chunk:
                    self._run([{"add": {"element": self._t(name=set_name_, elem=chunk)}}])
        except BackendError:
            with contextlib.suppress(BackendError):
                self._run([{"delete": {"set": self._t(name=n)}} for n in names])
            raise
        return slot

    def _list_elem(self, group: Group, key: bytes, expires_ms: int | None) -> Any:
        address = socket.inet_ntop(socket.AF_INET if group[0] == 4 else socket.AF_INET6, key)
        if expires_ms is None:
            return address
        return {"elem": {"val": address, "timeout": self._timeout_s(expires_ms)}}

    def _commit_lists(
        self,
        lists: dict[str, Held],
        marks: dict[str, Action],
        ops: dict[Action, list[Op]],
        slots: dict[Action, str],
        keep_sets: bool = False,
    ) -> None:
        """One transaction: element changes in the live sets, the shared sets of each action
        in ``slots`` swapped in, markers made and deleted, and the rules written again."""
        union_groups = {
            a: (self._union[a] if keep_sets else set()) | groups_of(lists.values(), a)
            for a in Action
        }
        new_slot = {a: slots.get(a, self._slot[a]) for a in Action}
        live = {union_set_name(a, *g, self._slot[a]) for a, g in self._live_groups()}
        wanted = {union_set_name(a, *g, new_slot[a]) for a, gs in union_groups.items() for g in gs}
        cmds: list[Json] = [{"add": {"table": {"family": "inet", "name": self.table}}}]
        cmds += [  # a rebuilt slot's sets were made by its fill
            {"add": {"set": self._list_set(n)}}
            for n in sorted(wanted - live)
            if _action_of(n) not in slots
        ]
        cmds += self._element_commands(ops, wanted)
        cmds += self._hook_commands()  # no rule may hold a set while it is deleted
        cmds += [
            {"flush": {"chain": self._t(name=c)}} for c in sorted(self._chains - set(self.hooks))
        ]
        cmds += [{"delete": {"set": self._t(name=n)}} for n in sorted(live - wanted)]
        cmds += self._marker_commands(marks)
        unions = {
            a: sorted(union_set_name(a, *g, new_slot[a]) for g in gs)
            for a, gs in union_groups.items()
        }
        try:
            self._run(cmds + self._schema_commands(self._sets, unions))
        except BackendError:
            for action in slots:  # the filled slot: no rule matches it
                with contextlib.suppress(BackendError):
                    self._run([{"delete": {"set": self._t(name=n)}} for n in unions[action]])
            raise
        self._held, self._marks = lists, marks
        self._slot = new_slot
        self._union = union_groups

    def _element_commands(self, ops: dict[Action, list[Op]], wanted: set[str]) -> list[Json]:
        """The element changes in the live sets that stay: one command per set and verb, so
        thousands stay a few commands; deletes first (a changed expiry is a delete and an add)."""
        deletes: dict[str, list[Any]] = {}
        adds: dict[str, list[Any]] = {}
        for action, found in ops.items():
            for group, key, before, after in found:
                target = union_set_name(action, *group, self._slot[action])
                if target not in wanted:
                    continue  # the set goes: its elements with it
                if before != ABSENT:
                    deletes.setdefault(target, []).append(self._list_elem(group, key, None))
                if after != ABSENT:
                    adds.setdefault(target, []).append(self._list_elem(group, key, after))
        return [
            {"delete": {"element": self._t(name=n, elem=e)}} for n, e in sorted(deletes.items())
        ] + [{"add": {"element": self._t(name=n, elem=e)}} for n, e in sorted(adds.items())]

    def _marker_commands(self, marks: dict[str, Action]) -> list[Json]:
        """The marker sets of ``marks`` made, and those of lists no longer held so deleted."""
        return [
            {"add": {"set": self._t(name=mark_name(a, n), type="ipv4_addr")}}
            for n, a in sorted(marks.items())
            if self._marks.get(n) is not a
        ] + [
            {"delete": {"set": self._t(name=mark_name(a, n))}}
            for n, a in sorted(self._marks.items())
            if marks.get(n) is not a
        ]

    def _list_set(self, name: str) -> Json:
        """A shared list set: addresses with a timeout and a counter each."""
        parsed = UNION.fullmatch(name)
        version = parsed["version"] if parsed else "4"
        spec = self._t(name=name, type=f"ipv{version}_addr", flags=["timeout"])
        spec["stmt"] = [{"counter": None}]
        return spec
