"""Named lists in the ipset backend: the lists of one action share a ``hash:net`` set per
family (:mod:`.union`); a change is applied in place, or the shared set is refilled in a
temporary one and swapped in.

An empty marker set per loaded list (``<prefix>-m<a|d>-<name>``) says in the kernel which
lists are held, so a restart knows them. The layout and why: docs/internals.md.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain

from pushfw.producer.contract import Action
from pushfw.worker.backends.base import BlockList
from pushfw.worker.backends.entries import gc_paused, list_entries
from pushfw.worker.backends.ipset_cmd import FAMILIES, SET_NAME_MAX, kernel_timeout_s, parse_save
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

LIST_ACTIONS = {Action.WATCH: "w", Action.ACCEPT: "a", Action.DROP: "d"}
"""Each action's letter in its shared sets' and markers' names."""
_LETTERS = {letter: action for action, letter in LIST_ACTIONS.items()}
LIST_NAME = r"[a-z][a-z0-9_]{0,15}"
LIST_MAXELEM_MIN = 65536


class IpsetLists(SharedLists):
    """The list half of :class:`~.ipset.IpsetBackend`: its shared sets and markers."""

    set_prefix: str
    clock: Callable[[], int]
    _mark: re.Pattern[str]
    _lists_sets: dict[tuple[Action, int], str]
    """Per action and family, the ``hash:net`` set the lists of that action share."""

    def _forget_lists(self) -> None:
        """No list held: the state of a fresh start, or after an uninstall."""
        self._held: dict[str, Held] = {}
        """The entries of each list loaded since this start."""
        self._marks: dict[str, Action] = {}
        """The lists whose marker set is in the kernel, and their action."""
        self._unknown: set[str] = set()
        """Lists the kernel held at start that have not been loaded again since."""

    @abc.abstractmethod
    def _run(self, *args: str, stdin: str | None = None) -> str:
        """Run ``ipset`` (the backend's)."""

    @abc.abstractmethod
    def _restore(self, lines: Iterable[str]) -> None:
        """``ipset -exist restore`` fed ``lines``."""

    @abc.abstractmethod
    def _headers(self) -> dict[str, int]:
        """Each of pushfw's sets and its element count."""

    @abc.abstractmethod
    def _write_rules(self, warn: bool = False) -> None:
        """The managed chain's rules matching the sets, written again."""

    def _element_counters(self) -> Iterator[tuple[Action, Group, bytes, int, int]]:
        """One ``ipset save`` per live shared set; elements that matched nothing are skipped."""
        live = set(self._marks.values())
        for (action, version), set_name in sorted(self._lists_sets.items()):
            if action not in live:
                continue
            # most entries of a large list match nothing: skip their lines before parsing
            lines = self._run("save", set_name).splitlines()
            saved = "\n".join(line for line in lines if " packets 0 " not in line)
            with gc_paused():
                counted = [
                    (e.network, e.counters)
                    for e in parse_save(saved, set_name, version)
                    if e.counters is not None and e.counters[0]
                ]
            for net, (packets, octets) in counted:
                group = (version, net.prefixlen)
                yield action, group, net.network_address.packed, packets, octets

    list_chunk = 50_000
    """A change of more elements refills the action's shared sets (a temporary set filled
    in one streamed restore, then swapped in) instead of adding and deleting in place."""

    def _mark_name(self, action: Action, name: str) -> str:
        """The empty set whose name says that list ``name`` of ``action`` is loaded."""
        if not re.fullmatch(LIST_NAME, name):
            raise PermanentBackendError(f"list name {name[:40]!r}: use {LIST_NAME}")
        mark = f"{self.set_prefix}-m{LIST_ACTIONS[action]}-{name}"
        if len(mark) > SET_NAME_MAX:
            raise PermanentBackendError(
                f"ipset name {mark} is longer than {SET_NAME_MAX} characters: "
                f"shorten the set prefix {self.set_prefix!r} or the list's name"
            )
        return mark

    def _marks_in(self, set_names: Iterable[str]) -> dict[str, Action]:
        found = (self._mark.fullmatch(n) for n in set_names)
        return {p["name"]: _LETTERS[p["action"]] for p in found if p}

    def list_names(self) -> set[str]:
        """The lists whose marker set exists, less those with entries in a shared set that
        holds nothing now (flushed by hand): each is a list to load again."""
        held = self._headers()
        emptied = self._emptied(held)
        return {
            name
            for name, action in self._marks_in(held).items()
            if not any(
                (action, version) in emptied
                for h in [self._held.get(name)]
                if h is not None
                for version, _ in h.groups
            )
        }

    def _emptied(self, held: Mapping[str, int]) -> set[tuple[Action, int]]:
        """The shared sets the loaded lists fill that hold no entry in the kernel."""
        return {
            (action, version)
            for action in LIST_ACTIONS
            for version, _ in groups_of(self._held.values(), action)
            if held.get(self._lists_sets[(action, version)], 0) == 0
        }

    def load_list(self, spec: BlockList, networks: Iterable[str]) -> None:
        """The list's entries into its action's shared sets, what only its old content held
        out, and its marker set made."""
        self._mark_name(spec.action, spec.name)
        started = time.monotonic()
        held = Held.of(spec.action, spec.expires_ms, list_entries(networks))
        self._change(spec.name, {**self._held, spec.name: held}, spec.action, held)
        logger.info(
            "ipset list %s (%s): %d entries loaded in %.2f s",
            spec.name,
            spec.action.value,
            held.size(),
            time.monotonic() - started,
        )

    def change_list(self, spec: BlockList, add: Sequence[str], remove: Sequence[str]) -> None:
        """The list's new content is its old one, less ``remove``, plus ``add``."""
        old = self._held.get(spec.name)
        if self._marks.get(spec.name) is not spec.action or old is None:
            raise PermanentBackendError(
                f"list {spec.name} is not loaded as {spec.action.value} by this worker: "
                "load it first"
            )
        held = changed(
            spec.action, spec.expires_ms, old.groups, list_entries(add), list_entries(remove)
        )
        self._change(spec.name, {**self._held, spec.name: held}, spec.action, held)

    def _change(
        self, name: str, lists: dict[str, Held], action: Action | None, added: Held | None
    ) -> None:
        """Make the kernel hold ``lists`` (``name`` changed, now of ``action``, or removed)."""
        marks = self._marks_after(name, action)
        if action is not None:
            present = set(self._run("list", "-n").split())
            self._restore(  # the shared sets, made with the action's first list
                f"create {shared} hash:net family {family} "
                f"timeout 0 counters maxelem {LIST_MAXELEM_MIN}\n"
                for version, family in ((4, "inet"), (6, "inet6"))
                if (shared := self._lists_sets[(action, version)]) not in present
            )
        rebuild: set[Action] = set()
        ops: dict[Action, list[Op]] = {}
        if self._unknown - {name}:  # what the other lists held before this start is unknown
            if added is not None:
                self._add_only(added)
        elif name in self._unknown:  # the last list held before this start: settle
            rebuild = set(LIST_ACTIONS)  # the actions it has sets for
        else:
            touched = [h for h in (self._held.get(name), lists.get(name)) if h is not None]
            emptied = {a for a, _ in self._emptied(self._headers())}
            rebuild = {h.action for h in touched} & emptied
            for act in {h.action for h in touched} - rebuild:
                found = element_ops(
                    act, self._held.values(), lists.values(), touched, self.list_chunk
                )
                if found is None or not self._has_room(act, found):
                    rebuild.add(act)
                elif found:
                    ops[act] = found
        for act in sorted(rebuild):
            self._refill(act, lists)
        self._commit_lists(lists, marks, ops)
        self._unknown.discard(name)

    def _settle(self, marks: dict[str, Action]) -> None:
        lists = dict(self._held)
        for act in sorted(LIST_ACTIONS):
            self._refill(act, lists)
        self._commit_lists(lists, marks, {})

    def _add_only(self, added: Held) -> None:
        """Add the list's entries to the live shared sets and delete nothing: lists held
        before this start may hold anything there until each is loaded again."""
        now_ms = self.clock()
        timeout_s = 0 if added.expires_ms is None else kernel_timeout_s(added.expires_ms, now_ms)
        for version in (4, 6):
            target = self._lists_sets[(added.action, version)]
            groups = {g: p for g, p in added.groups.items() if g[0] == version}
            count = sum(len(p) // _WIDTH[version] for p in groups.values())
            if count and not self._room(target, count):
                raise PermanentBackendError(
                    f"set {target} is full until every list held before this start is loaded again"
                )
            self._restore(
                f"add {target} {_address(g, key)}/{g[1]} timeout {timeout_s}\n"
                for g, packed in sorted(groups.items())
                for key in _keys(packed, _WIDTH[version])
            )

    def _has_room(self, action: Action, ops: list[Op]) -> bool:
        """Can the live shared sets take these changes without passing their ``maxelem``?"""
        for version in (4, 6):
            adds = sum(1 for g, _, before, _a in ops if g[0] == version and before == ABSENT)
            if adds and not self._room(self._lists_sets[(action, version)], adds):
                return False
        return True

    def _room(self, set_name: str, adding: int) -> bool:
        header = self._run("list", "-t", set_name)
        words = dict(re.findall(r"^(Header|Number of entries): (.*)$", header, re.MULTILINE))
        options = words.get("Header", "").split()
        maxelem = int(options[options.index("maxelem") + 1]) if "maxelem" in options else 0
        return int(words.get("Number of entries", "0")) + adding <= maxelem

    def _commit_lists(
        self,
        lists: dict[str, Held],
        marks: dict[str, Action],
        ops: dict[Action, list[Op]],
    ) -> None:
        """One restore: markers made, element changes in the live shared sets; then the
        chain's rules for the actions that have lists, and markers deleted."""
        now_ms = self.clock()
        lines = [
            f"create {self._mark_name(a, n)} hash:net family inet maxelem 1\n"
            for n, a in sorted(marks.items())
            if self._marks.get(n) is not a
        ]
        for action, found in ops.items():
            for group, key, _before, after in found:
                target = self._lists_sets[(action, group[0])]
                entry = f"{_address(group, key)}/{group[1]}"
                if after == ABSENT:
                    lines.append(f"del {target} {entry}\n")
                    continue
                timeout_s = 0 if after is None else kernel_timeout_s(after, now_ms)
                lines.append(f"add {target} {entry} timeout {timeout_s}\n")  # -exist: renews
        self._restore(lines)
        before = dict(self._marks)
        self._held, self._marks = lists, marks
        if set(before.values()) != set(marks.values()):
            self._write_rules()
        for n, a in sorted(before.items()):
            if marks.get(n) is not a:
                self._run("-exist", "destroy", self._mark_name(a, n))

    def _refill(self, action: Action, lists: dict[str, Held]) -> None:
        """Fill temporary sets with exactly the union of the lists of ``action`` in one
        streamed restore and swap them in: packets meet the old content or the new."""
        now_ms = self.clock()
        present = set(self._run("list", "-n").split())
        fill: list[Iterable[str]] = []
        swap: list[str] = []
        for version in (4, 6):
            live = self._lists_sets[(action, version)]
            temp = f"{live}+"
            groups = sorted(g for g in groups_of(lists.values(), action) if g[0] == version)
            count = sum(
                len(h.groups.get(g, b"")) // _WIDTH[version]
                for h in lists.values()
                if h.action is action
                for g in groups
            )
            maxelem = max(LIST_MAXELEM_MIN, 1 << (2 * count - 1).bit_length())
            family = "inet" if version == 4 else "inet6"
            fill.append(
                f"create {temp} hash:net family {family} timeout 0 counters maxelem {maxelem}\n"
            )
            fill.append(_union_lines(temp, lists, action, groups, now_ms))
            swap.append(
                f"swap {temp} {live}\ndestroy {temp}\n"
                if live in present
                else f"rename {temp} {live}\n"
            )
        for version in (4, 6):
            self._run("-exist", "destroy", f"{self._lists_sets[(action, version)]}+")
        try:
            self._restore(chain(*fill, swap))
        except BackendError:
            for version in (4, 6):
                with contextlib.suppress(BackendError):
                    self._run("-exist", "destroy", f"{self._lists_sets[(action, version)]}+")
            raise


_WIDTH = {4: 4, 6: 16}


def _keys(packed: bytes, width: int) -> Iterator[bytes]:
    for start in range(0, len(packed), width):
        yield packed[start : start + width]


def _address(group: Group, key: bytes) -> str:
    return socket.inet_ntop(FAMILIES[group[0]][0], key)


def _union_lines(
    set_name: str, lists: dict[str, Held], action: Action, groups: list[Group], now_ms: int
) -> Iterator[str]:
    """The restore lines adding the union of the lists' groups, made as they are read."""
    for group in groups:
        for key, expires_ms in union(lists.values(), action, group):
            timeout_s = 0 if expires_ms is None else kernel_timeout_s(expires_ms, now_ms)
            yield f"add {set_name} {_address(group, key)}/{group[1]} timeout {timeout_s}\n"
