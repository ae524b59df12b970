"""Rules in the worker's own iptables chains, through python-iptables (libiptc).

Each family (IPv4, IPv6) has a chain of pushfw's own in the filter table, jumped to once
from each hook chain. Accept rules sit at the top of the chain and drop rules below them,
so an allow always wins over a ban. Each rule carries a comment (``pushfw`` or
``pushfw exp=<ms>``) so the index, and timed rules' expiry, can be rebuilt from the kernel
after a restart. libiptc writes the legacy x_tables; all calls happen on one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pushfw.producer.contract import Action
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.errors import BackendError, TransientBackendError

logger = logging.getLogger(__name__)

COMMENT = "pushfw"
XTABLES_LOCK = "/run/xtables.lock"
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR})
_libc = ctypes.CDLL(None)
_libc.__errno_location.restype = ctypes.POINTER(ctypes.c_int)


def _c_errno() -> int:
    """The C errno libiptc left behind; python-iptables only reports it as text."""
    return int(_libc.__errno_location()[0])


def iptables_variant() -> str:
    """``nf_tables`` or ``legacy``: which x_tables the host's ``iptables`` command edits."""
    path = shutil.which("iptables")
    if path and "nft" in os.path.basename(os.path.realpath(path)):
        return "nf_tables"
    return "legacy"


def filter_table(iptc: Any, version: int) -> Any:
    """One family's filter table with autocommit off (one commit per batch)."""
    cls = iptc.Table if version == 4 else iptc.Table6
    table = cls(cls.FILTER)
    table.autocommit = False
    return table


def blank_rule(iptc: Any, version: int) -> Any:
    """An empty rule of one family."""
    return iptc.Rule() if version == 4 else iptc.Rule6()


@contextlib.contextmanager
def xtables_lock(timeout_s: float) -> Iterator[None]:
    """Hold the xtables lock that iptables-legacy binaries take, so we never race them."""
    try:
        fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TransientBackendError("xtables lock is held by another process") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def commit_table(iptc: Any, table: Any) -> None:
    """Commit ``table``; a concurrent writer (EAGAIN, EBUSY, EINTR) is a transient error."""
    try:
        table.commit()
    except iptc.IPTCError as exc:
        code = _c_errno()
        with contextlib.suppress(iptc.IPTCError):
            table.refresh()
        if code in _TRANSIENT_ERRNOS:
            raise TransientBackendError(f"iptables commit: {exc}") from exc
        raise BackendError(f"iptables commit: {exc}") from exc


def ensure_chain(iptc: Any, table: Any, version: int, chain: str, hooks: Sequence[str]) -> None:
    """Create ``chain`` if missing and jump to it once from the top of each hook chain."""
    if not table.is_chain(chain):
        table.create_chain(chain)
    for hook in hooks:
        hook_chain = iptc.Chain(table, hook)
        if not any(r.target.name == chain for r in hook_chain.rules):
            jump = blank_rule(iptc, version)
            jump.create_target(chain)
            hook_chain.insert_rule(jump)


def remove_chain(iptc: Any, table: Any, chain: str, hooks: Sequence[str]) -> None:
    """Delete the jumps to ``chain`` from the hook chains, then the chain with its rules."""
    for hook in hooks:
        hook_chain = iptc.Chain(table, hook)
        for ipt_rule in list(hook_chain.rules):
            if ipt_rule.target.name == chain:
                hook_chain.delete_rule(ipt_rule)
    if table.is_chain(chain):
        managed = iptc.Chain(table, chain)
        managed.flush()
        managed.delete()


def _comment(rule: Rule) -> str:
    return COMMENT if rule.expires_ms is None else f"{COMMENT} exp={rule.expires_ms}"


def _parse_comment(text: str) -> tuple[bool, int | None]:
    if text == COMMENT:
        return True, None
    prefix = f"{COMMENT} exp="
    if text.startswith(prefix) and text[len(prefix) :].isdigit():
        return True, int(text[len(prefix) :])
    return False, None


@dataclass
class _Family:
    """One address family's table, chain and index of managed rules."""

    version: int
    iptc: Any
    index: dict[RuleKey, Rule] = field(default_factory=dict)
    staged: list[tuple[str, Rule]] = field(default_factory=list)

    def table(self) -> Any:
        return filter_table(self.iptc, self.version)

    def new_rule(self, rule: Rule) -> Any:
        ipt_rule = blank_rule(self.iptc, self.version)
        ipt_rule.src = str(rule.key.network)
        match = ipt_rule.create_match("comment")
        match.comment = _comment(rule)
        ipt_rule.create_target("ACCEPT" if rule.key.action is Action.ACCEPT else "DROP")
        return ipt_rule


class IptablesBackend(Backend):
    """Managed chains in the legacy filter table, one commit per family and batch."""

    name = "iptables"

    def __init__(
        self,
        chain: str = "PUSHFW",
        hooks: Sequence[str] = ("INPUT",),
        lock_timeout_s: float = 5.0,
    ) -> None:
        import iptc  # deferred: loading libiptc needs the iptables libraries installed

        self.chain = chain
        self.hooks = tuple(hooks)
        self.lock_timeout_s = lock_timeout_s
        self._families = {4: _Family(4, iptc), 6: _Family(6, iptc)}
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
                fam.index = self._read_index(fam, table)
        logger.info(
            "iptables chains ready: %s rules (IPv4 %d, IPv6 %d)",
            self.chain,
            len(self._families[4].index),
            len(self._families[6].index),
        )

    def _ensure_chain(self, fam: _Family, table: Any) -> None:
        ensure_chain(self._iptc, table, fam.version, self.chain, self.hooks)

    def _read_index(self, fam: _Family, table: Any) -> dict[RuleKey, Rule]:
        index: dict[RuleKey, Rule] = {}
        for ipt_rule in self._iptc.Chain(table, self.chain).rules:
            comments = [m.comment for m in ipt_rule.matches if m.name == "comment"]
            managed, expires_ms = _parse_comment(comments[0] if comments else "")
            target = ipt_rule.target.name
            if not managed or target not in ("ACCEPT", "DROP"):
                logger.warning("chain %s holds a rule pushfw did not write; left alone", self.chain)
                continue
            network = ipaddress.ip_network(ipt_rule.src, strict=False)
            key = RuleKey(Action.ACCEPT if target == "ACCEPT" else Action.DROP, network)
            index[key] = Rule(key, expires_ms)
        return index

    def close(self) -> None:
        self.discard()

    def snapshot(self) -> dict[RuleKey, Rule]:
        return {**self._families[4].index, **self._families[6].index}

    def get(self, key: RuleKey) -> Rule | None:
        return self._families[key.network.version].index.get(key)

    def size(self) -> int:
        return sum(len(fam.index) for fam in self._families.values())

    def add(self, rule: Rule) -> None:
        self._families[rule.key.network.version].staged.append(("add", rule))

    def delete(self, key: RuleKey) -> None:
        self._families[key.network.version].staged.append(("delete", Rule(key)))

    def discard(self) -> None:
        for fam in self._families.values():
            fam.staged.clear()

    def commit(self) -> None:
        try:
            for fam in self._families.values():
                if fam.staged:
                    self._commit_family(fam)
        finally:
            self.discard()

    def _commit_family(self, fam: _Family) -> None:
        index = dict(fam.index)
        with self._locked():
            table = fam.table()
            table.refresh()
            chain = self._iptc.Chain(table, self.chain)
            for kind, rule in fam.staged:
                old = index.pop(rule.key, None)
                if old is not None:
                    with contextlib.suppress(self._iptc.IPTCError):
                        chain.delete_rule(fam.new_rule(old))
                if kind == "add":
                    if rule.key.action is Action.ACCEPT:
                        chain.insert_rule(fam.new_rule(rule))
                    else:
                        chain.append_rule(fam.new_rule(rule))
                    index[rule.key] = rule
            self._commit_table(table)
        fam.index = index

    def _commit_table(self, table: Any) -> None:
        commit_table(self._iptc, table)

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return xtables_lock(self.lock_timeout_s)

    def uninstall(self) -> str:
        """Remove the jumps and the managed chains; other rules are left untouched."""
        for fam in self._families.values():
            with self._locked():
                table = fam.table()
                table.refresh()
                remove_chain(self._iptc, table, self.chain, self.hooks)
                self._commit_table(table)
            fam.index = {}
        return f"removed chain {self.chain} and its jumps (IPv4 and IPv6)"
