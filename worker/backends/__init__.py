"""Firewall backends behind one small batch interface; pick one with :func:`make_backend`."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence

from pushfw.producer.contract import Network
from pushfw.worker.backends.base import Backend, Rule, RuleKey, no_wait_told, wall_ms
from pushfw.worker.errors import ConfigError

__all__ = ["Backend", "Rule", "RuleKey", "choose_backend", "make_backend"]

logger = logging.getLogger(__name__)


def _nftables_usable() -> str | None:
    """Why nftables cannot be used here, or None if it can."""
    try:
        import nftables
    except (ImportError, OSError) as exc:
        return f"libnftables is not loadable ({exc})"
    nft = nftables.Nftables()
    rc, _, error = nft.cmd("list tables")
    return None if rc == 0 else f"nft refused ({str(error).strip()[:120]})"


def _ipset_usable() -> str | None:
    path = shutil.which("ipset")
    if path is None:
        return "the ipset command is not installed"
    probe = subprocess.run([path, "list", "-n"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"ipset refused ({probe.stderr.strip()[:120]})"


def choose_backend() -> tuple[str, str]:
    """What ``auto`` picks on this host, and why: nftables where usable, else ipset, else
    iptables. The worker logs it at start; ``pushfw-worker check-config`` prints it."""
    why_not_nft = _nftables_usable()
    if why_not_nft is None:
        return "nftables", "libnftables works here"
    why_not_ipset = _ipset_usable()
    if why_not_ipset is None:
        return "ipset", f"not nftables: {why_not_nft}"
    return "iptables", f"not nftables: {why_not_nft}; not ipset: {why_not_ipset}"


def make_backend(
    name: str,
    *,
    chain: str = "PUSHFW",
    hooks: Sequence[str] = ("INPUT",),
    memory_fail: Iterable[Network] = (),
    set_size: int = 1_000_000,
    clock: Callable[[], int] = wall_ms,
    lock_waited: Callable[[float], None] = no_wait_told,
) -> Backend:
    """Build the backend called ``name`` (not yet opened); ``auto`` picks one.

    ``clock`` is Redis's clock in ms (kernel timeouts are counted from it); ``lock_waited``
    is told each wait for a lock another process held. Both go to the backend's
    constructor: nothing sets them on it later.
    """
    if name == "auto":
        name, why = choose_backend()
        logger.info("backend auto: %s (%s)", name, why)
    match name:
        case "memory":
            from pushfw.worker.backends.memory import MemoryBackend

            return MemoryBackend(fail_networks=memory_fail)
        case "iptables":
            from pushfw.worker.backends.iptables import IptablesBackend

            return IptablesBackend(chain=chain, hooks=hooks, clock=clock, lock_waited=lock_waited)
        case "ipset":
            from pushfw.worker.backends.ipset import IpsetBackend

            return IpsetBackend(
                chain=chain, hooks=hooks, maxelem=set_size, clock=clock, lock_waited=lock_waited
            )
        case "nftables":
            from pushfw.worker.backends.nftables import NftablesBackend

            return NftablesBackend(table=chain.lower(), hooks=hooks, set_size=set_size, clock=clock)
        case _:
            raise ConfigError(
                f"unknown backend {name!r} (expected auto, nftables, ipset, iptables or memory)"
            )
