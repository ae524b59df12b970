"""Rules in the worker's own iptables chains, through python-iptables (libiptc).

Each family (IPv4, IPv6) has a chain of pushfw's own in the filter table, jumped to once
from each hook chain. Accept rules sit at the top of the chain and drop rules below them,
so an allow always wins over a ban; watch rules (shadow mode) sit above both, with no
target, so they count every packet and evaluation goes on. Each rule carries a comment
(``pushfw`` or ``pushfw exp=<ms>``) so the index, and timed rules' expiry, can be rebuilt
from the kernel after a restart. libiptc writes the legacy x_tables; all calls happen on
one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pushfw.producer.contract import Action
from pushfw.worker.backends.base import Rule, RuleKey, no_wait_told, wall_ms
from pushfw.worker.backends.index import IndexedBackend
from pushfw.worker.backends.xtables import (
    CHECK_LOCK_TIMEOUT_S,
    blank_rule,
    chain_removed,
    commit_table,
    count_entries,
    ensure_chain,
    filter_table,
    iptables_variant,
    remove_chain,
    xtables_lock,
)
from pushfw.worker.backends.xtables import XTABLES_LOCK as XTABLES_LOCK
from pushfw.worker.errors import BackendError

logger = logging.getLogger(__name__)

COMMENT = "pushfw"
_TARGETS = {Action.ACCEPT: "ACCEPT", Action.DROP: "DROP", Action.WATCH: ""}
"""The target of each action's rules; a watch has none: it counts and the chain goes on."""
_ACTIONS = {target: action for action, target in _TARGETS.items()}


def _comment(rule: Rule) -> str:
    return COMMENT if rule.expires_ms is None else f"{COMMENT} exp={rule.expires_ms}"


def _parse_comment(text: str) -> tuple[bool, int | None]:
    if text == COMMENT:
        return True, None
    prefix = f"{COMMENT} exp="
    if text.startswith(prefix) and text[len(prefix) :].isdigit():
        return True, int(text[len(prefix) :])
    return False, None


_MATCH_HEADER = 32  # struct xt_entry_match: u16 size, char name[29], u8 revision
_COMMENT_LEN = 256  # struct xt_comment_info


class _RuleCodec:
    """Builds and reads pushfw's raw x_tables entries for one family.

    python-iptables' Rule objects cost about 0.3 ms each to build and compare, which made
    a batch of 2,500 expiries on a 10k-rule chain take over a second. Our rules have one
    shape (source, comment, ACCEPT/DROP/no target), so a template built once by python-iptables is
    patched per rule instead; the offsets are checked against python-iptables at start.
    """

    def __init__(self, iptc: Any, version: int) -> None:
        self.version = version
        width = 4 if version == 4 else 16
        self._src = slice(0, width)
        self._smsk = slice(2 * width, 3 * width)
        probe = "10.9.8.7/32" if version == 4 else "2001:db8::9:8:7/128"
        self._templates: dict[Action, bytes] = {}
        self._masks: dict[Action, Any] = {}
        for action in Action:
            ipt_rule = self._python_iptables_rule(iptc, probe, COMMENT, action)
            self._templates[action] = bytes(ipt_rule.rule)
            self._masks[action] = ipt_rule.mask
            entry_size = int(ipt_rule._entry_size())
        self._comment = slice(entry_size + _MATCH_HEADER, entry_size + _MATCH_HEADER + _COMMENT_LEN)
        self._check(iptc, probe)

    def _python_iptables_rule(self, iptc: Any, src: str, comment: str, action: Action) -> Any:
        ipt_rule = blank_rule(iptc, self.version)
        ipt_rule.src = src
        match = ipt_rule.create_match("comment")
        match.comment = comment
        ipt_rule.create_target(_TARGETS[action])
        return ipt_rule

    def _check(self, iptc: Any, probe: str) -> None:
        """The patched bytes must equal what python-iptables builds for the same rule."""
        net = ipaddress.ip_network(probe)
        rule = Rule(RuleKey(Action.DROP, net), 1_795_000_000_123)
        built = self._python_iptables_rule(iptc, str(net), _comment(rule), Action.DROP)
        if bytes(self.encode(rule)) != bytes(built.rule):
            raise BackendError("x_tables entry layout differs from the one pushfw expects")

    def encode(self, rule: Rule) -> Any:
        net = rule.key.network
        buf = bytearray(self._templates[rule.key.action])
        buf[self._src] = net.network_address.packed
        buf[self._smsk] = net.netmask.packed
        buf[self._comment] = _comment(rule).encode().ljust(_COMMENT_LEN, b"\0")
        return (ctypes.c_ubyte * len(buf)).from_buffer(buf)

    def mask(self, action: Action) -> Any:
        return self._masks[action]

    def decode(self, raw: bytes, target: bytes | None) -> Rule | None:
        """Our rule in ``raw`` (``target``: libiptc's name of its target, b"" for none), or
        None for a rule pushfw did not write."""
        action = _ACTIONS.get(target.decode()) if isinstance(target, bytes) else None
        if action is None or len(raw) != len(self._templates[action]):
            return None
        managed, expires_ms = _parse_comment(raw[self._comment].split(b"\0", 1)[0].decode())
        if not managed:
            return None
        cls = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        address = int.from_bytes(raw[self._src], "big")
        prefix = bin(int.from_bytes(raw[self._smsk], "big")).count("1")
        key = RuleKey(action, cls((address, prefix)))
        return Rule(key, expires_ms)


@dataclass
class _Family:
    """One address family's table and chain; its rules are in the backend's packed index."""

    version: int
    iptc: Any
    codec: _RuleCodec
    size: int = 0
    """How many of the backend's index entries are of this family."""
    extra: int = 0
    """Entries of the chain beyond the index (rules pushfw did not write, duplicates)."""
    watches: int = 0
    """How many of this family's rules are watches: the chain's top, above the accepts."""

    def table(self) -> Any:
        return filter_table(self.iptc, self.version)


class IptablesBackend(IndexedBackend):
    """Managed chains in the legacy filter table, one commit per family and batch."""

    name = "iptables"

    def __init__(
        self,
        chain: str = "PUSHFW",
        hooks: Sequence[str] = ("INPUT",),
        lock_timeout_s: float = 5.0,
        *,
        clock: Callable[[], int] = wall_ms,
        lock_waited: Callable[[float], None] = no_wait_told,
    ) -> None:
        import iptc  # deferred: loading libiptc needs the iptables libraries installed

        super().__init__(clock=clock, lock_waited=lock_waited)
        self.chain = chain
        self.hooks = tuple(hooks)
        self.lock_timeout_s = lock_timeout_s
        self._families = {v: _Family(v, iptc, _RuleCodec(iptc, v)) for v in (4, 6)}
        self._iptc = iptc

    def open(self) -> None:
        if iptables_variant() == "nf_tables":
            logger.info(
                "host iptables is the nf_tables variant; pushfw writes the legacy tables "
                "(both filter packets): see its rules with iptables-legacy -S %s",
                self.chain,
            )
        for fam in self._families.values():
            with self._locked():
                table = fam.table()
                table.refresh()
                self._ensure_chain(fam, table)
                self._commit_table(table)
                found = self._read_index(fam, table)
            for key in [k for k in self._index if k.network.version == fam.version]:
                del self._index[key]
            for key, rule in found.items():
                self._index[key] = rule
            fam.size = len(found)
            fam.watches = sum(key.action is Action.WATCH for key in found)
        logger.info(
            "iptables chains ready: %s rules (IPv4 %d, IPv6 %d)",
            self.chain,
            self._families[4].size,
            self._families[6].size,
        )

    def _ensure_chain(self, fam: _Family, table: Any) -> None:
        ensure_chain(self._iptc, table, fam.version, self.chain, self.hooks)

    def _read_index(self, fam: _Family, table: Any) -> dict[RuleKey, Rule]:
        index: dict[RuleKey, Rule] = {}
        foreign = entries = 0
        entry = table.first_rule(self.chain)
        while entry:
            entries += 1
            raw = ctypes.string_at(ctypes.addressof(entry), entry.next_offset)
            target = table.get_target(entry)
            rule = fam.codec.decode(raw, target)
            if rule is None:
                foreign += 1
            else:
                index[rule.key] = rule
            entry = table.next_rule(entry)
        fam.extra = entries - len(index)
        if foreign:
            logger.warning(
                "chain %s (IPv%d) holds %d rules pushfw did not write; left alone",
                self.chain,
                fam.version,
                foreign,
            )
        return index

    def intact(self) -> bool:
        """Per family: the chain, each hook's jump, and as many entries as the index explains."""
        counts = count_entries(self._iptc, self.chain, self.hooks)
        return counts is None or all(
            counts[version] == fam.size + fam.extra for version, fam in self._families.items()
        )

    def hits(self) -> dict[RuleKey, tuple[int, int]]:
        """Each entry's counters, from one copy of each family's table (no Rule objects)."""
        found: dict[RuleKey, tuple[int, int]] = {}
        for fam in self._families.values():
            try:
                with xtables_lock(CHECK_LOCK_TIMEOUT_S, self.lock_waited):
                    table = fam.table()
                    table.refresh()
            except self._iptc.IPTCError as exc:
                raise BackendError(f"iptables: reading IPv{fam.version} counters: {exc}") from exc
            entry = table.first_rule(self.chain) if table.is_chain(self.chain) else None
            while entry:
                raw = ctypes.string_at(ctypes.addressof(entry), entry.next_offset)
                target = table.get_target(entry)
                rule = fam.codec.decode(raw, target)
                if rule is not None:  # a duplicate entry of one rule adds to its counts
                    packets, octets = found.get(rule.key, (0, 0))
                    counters = entry.counters
                    found[rule.key] = (packets + counters.pcnt, octets + counters.bcnt)
                entry = table.next_rule(entry)
        return found

    def commit(self) -> None:
        try:
            for fam in self._families.values():
                staged = [(k, r) for k, r in self._staged if k.network.version == fam.version]
                if staged:
                    self._commit_family(fam, staged)
        finally:
            self.discard()

    def _commit_family(self, fam: _Family, staged: list[tuple[RuleKey, Rule | None]]) -> None:
        """One family's changes in one table commit; the index is changed in place, and put
        back as it was if the commit fails."""
        undo: list[tuple[RuleKey, Rule | None]] = []
        try:
            with self._locked():
                table = fam.table()
                table.refresh()
                try:
                    self._stage_entries(table, fam, staged, undo)
                except self._iptc.IPTCError as exc:  # the chain vanished (iptables -X by hand)
                    with contextlib.suppress(self._iptc.IPTCError):
                        table.refresh()
                    raise BackendError(f"iptables: {exc} (chain {self.chain})") from exc
                self._commit_table(table)
        except BaseException:
            for key, old in reversed(undo):
                if old is None:
                    self._index.pop(key, None)
                else:
                    self._index[key] = old
            raise
        for key, old in _first_of_each(undo):
            change = (key in self._index) - (old is not None)
            fam.size += change
            fam.watches += change if key.action is Action.WATCH else 0

    def _stage_entries(
        self,
        table: Any,
        fam: _Family,
        staged: list[tuple[RuleKey, Rule | None]],
        undo: list[tuple[RuleKey, Rule | None]],
    ) -> None:
        codec = fam.codec
        watches = fam.watches
        for key, rule in staged:
            old = self._index.pop(key, None)
            undo.append((key, old))
            if old is not None:
                watches -= key.action is Action.WATCH
                with contextlib.suppress(self._iptc.IPTCError):
                    table.delete_entry(self.chain, codec.encode(old), codec.mask(old.key.action))
            if rule is not None:
                if rule.key.action is Action.DROP:
                    table.append_entry(self.chain, codec.encode(rule))
                elif rule.key.action is Action.WATCH:
                    table.insert_entry(self.chain, codec.encode(rule), 0)
                    watches += 1
                else:
                    self._insert_accept(table, codec.encode(rule), watches)
                self._index[rule.key] = rule

    def _insert_accept(self, table: Any, entry: Any, watches: int) -> None:
        """An accept goes below the watches (they count every packet) and above the drops."""
        try:
            table.insert_entry(self.chain, entry, watches)
        except self._iptc.IPTCError:  # fewer entries than watches: flushed by hand
            table.insert_entry(self.chain, entry, 0)

    def _commit_table(self, table: Any) -> None:
        commit_table(self._iptc, table)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return xtables_lock(self.lock_timeout_s, self.lock_waited)

    def uninstall(self) -> str:
        """Remove the jumps and the managed chains; other rules are left untouched."""
        found = []
        for fam in self._families.values():
            with self._locked():
                table = fam.table()
                table.refresh()
                if remove_chain(self._iptc, table, self.chain, self.hooks):
                    found.append(f"IPv{fam.version}")
                self._commit_table(table)
            fam.size = fam.watches = 0
        self._index.clear()
        return chain_removed(self.chain, found)


def _first_of_each(
    undo: list[tuple[RuleKey, Rule | None]],
) -> Iterator[tuple[RuleKey, Rule | None]]:
    """Each key's state before the batch: its first undo entry."""
    seen: set[RuleKey] = set()
    for key, old in undo:
        if key not in seen:
            seen.add(key)
            yield key, old
