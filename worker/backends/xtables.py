"""The x_tables plumbing both iptables-based backends share, over python-iptables (libiptc).

The xtables lock the iptables binaries take, a table commit that tells a busy kernel from a
refusal, and the managed chain with its jumps from the hook chains: created, counted cheaply
(for the heartbeat's check) and removed. The iptables and ipset backends build on these.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pushfw.worker.errors import BackendError, ConfigError, TransientBackendError

logger = logging.getLogger(__name__)

XTABLES_LOCK = "/run/xtables.lock"
CHECK_LOCK_TIMEOUT_S = 0.5  # a heartbeat's check skips a busy table rather than wait as commits do
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
def xtables_lock(timeout_s: float, waited: Callable[[float], None] | None = None) -> Iterator[None]:
    """Hold the xtables lock that iptables-legacy binaries take, so we never race them.

    ``waited`` hears how long another holder kept us waiting (also when we gave up).
    """
    try:
        fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        yield
        return
    try:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - started > timeout_s:
                    if waited is not None:
                        waited(time.monotonic() - started)
                    raise TransientBackendError("xtables lock is held by another process") from None
                time.sleep(0.01)
        if waited is not None and time.monotonic() - started >= 0.01:
            waited(time.monotonic() - started)
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
        if not table.is_chain(hook):
            raise ConfigError(
                f"hooks: chain {hook} does not exist in the legacy iptables filter table that "
                "this backend writes (a chain Docker made with iptables-nft lives in nf_tables); "
                "create it there, or use PUSHFW_BACKEND=nftables with PUSHFW_HOOKS=FORWARD"
            )
        hook_chain = iptc.Chain(table, hook)
        if not any(r.target.name == chain for r in hook_chain.rules):
            jump = blank_rule(iptc, version)
            jump.create_target(chain)
            hook_chain.insert_rule(jump)


def _jumps_to(table: Any, hook: str, chain: str) -> bool:
    target = chain.encode()
    entry = table.first_rule(hook)
    while entry:
        if table.get_target(entry) == target:
            return True
        entry = table.next_rule(entry)
    return False


def chain_entries(table: Any, chain: str, hooks: Sequence[str]) -> int | None:
    """How many entries ``chain`` holds; None if it, or a hook chain's jump to it, is gone.

    Walks libiptc's copy of the table entry by entry, building no python-iptables Rule
    (about 0.3 ms each): a few milliseconds for 10k entries.
    """
    if not table.is_chain(chain) or not all(_jumps_to(table, hook, chain) for hook in hooks):
        return None
    count = 0
    entry = table.first_rule(chain)
    while entry:
        count += 1
        entry = table.next_rule(entry)
    return count


def count_entries(iptc: Any, chain: str, hooks: Sequence[str]) -> dict[int, int | None] | None:
    """:func:`chain_entries` per family, read now; None when the kernel cannot be read now.

    Waits for the xtables lock only briefly: a busy table is checked at the next heartbeat.
    """
    counts: dict[int, int | None] = {}
    for version in (4, 6):
        try:
            with xtables_lock(CHECK_LOCK_TIMEOUT_S):
                table = filter_table(iptc, version)
                table.refresh()
                counts[version] = chain_entries(table, chain, hooks)
        except (TransientBackendError, iptc.IPTCError) as exc:
            logger.debug("IPv%d filter table not checked: %s", version, exc)
            return None
    return counts


def remove_chain(iptc: Any, table: Any, chain: str, hooks: Sequence[str]) -> bool:
    """Delete the jumps to ``chain`` from the hook chains, then the chain with its rules.

    Returns whether there was anything of pushfw's to remove.
    """
    found = False
    for hook in hooks:
        if not table.is_chain(hook):
            continue
        hook_chain = iptc.Chain(table, hook)
        for ipt_rule in list(hook_chain.rules):
            if ipt_rule.target.name == chain:
                hook_chain.delete_rule(ipt_rule)
                found = True
    if table.is_chain(chain):
        managed = iptc.Chain(table, chain)
        managed.flush()
        managed.delete()
        found = True
    return found


def chain_removed(chain: str, families: Sequence[str]) -> str:
    """What an uninstall says it did with the managed chain, for the families that had it."""
    if not families:
        return f"no chain {chain} or jump to it was present"
    return f"removed chain {chain} and its jumps ({' and '.join(families)})"
