"""Firewall backends behind one small batch interface; pick one with :func:`open_backend`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pushfw.producer.contract import Network
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.errors import ConfigError

__all__ = ["Backend", "Rule", "RuleKey", "make_backend"]


def make_backend(
    name: str,
    *,
    chain: str = "PUSHFW",
    hooks: Sequence[str] = ("INPUT",),
    memory_fail: Iterable[Network] = (),
) -> Backend:
    """Build the backend called ``name`` (not yet opened)."""
    match name:
        case "memory":
            from pushfw.worker.backends.memory import MemoryBackend

            return MemoryBackend(fail_networks=memory_fail)
        case "iptables":
            from pushfw.worker.backends.iptables import IptablesBackend

            return IptablesBackend(chain=chain, hooks=hooks)
        case _:
            raise ConfigError(f"unknown backend {name!r} (expected iptables or memory)")
