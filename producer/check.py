"""``pushfw status --check``: the fleet's health as one line and a Nagios exit code.

Cron, Nagios, Icinga and Sensu read a check by its exit status (0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN) and the first line it prints, so the state each host shows in
``pushfw status`` is mapped here to one of them, the worst host deciding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from pushfw.producer.client import is_stale
from pushfw.producer.records import HostStatus

__all__ = ["Check", "Severity", "check", "host_state"]


class Severity(IntEnum):
    """A check's result, valued as its exit status (the Nagios plugin convention)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


_CRITICAL_STATES = frozenset({"STALE", "STOPPED", "DUPLICATE", "LEDGER LOST", "MISSING"})
"""States in which commands do not reach the host's kernel whole, or its rules are wrong."""
_OK_STATES = frozenset({"ok", "starting"})


def host_state(h: HostStatus, now_ms: int) -> str:
    """What ``pushfw status`` shows as a host's STATE: what is wrong with it first.

    A worker that said it stopped is ``stopped`` for a restart's worth of heartbeats, then
    ``STOPPED``: not silent (STALE, where nothing is known), but no longer applying commands.
    """
    if is_stale(h, now_ms):
        return "STOPPED" if h.state == "stopped" else "STALE"
    if h.state != "running":
        return h.state
    if h.duplicate:
        return "DUPLICATE"  # two workers split its commands: nothing else it says is whole
    if h.ledger_lost:
        return "LEDGER LOST"
    return "DEGRADED" if h.problems else "ok"


def _checked_state(h: HostStatus | None, now_ms: int) -> str:
    """:func:`host_state`, but a start that keeps failing is no longer OK."""
    if h is None:
        return "MISSING"
    state = host_state(h, now_ms)
    return f"{state} with problems" if state == "starting" and h.problems else state


def _severity(state: str) -> Severity:
    if state in _CRITICAL_STATES:
        return Severity.CRITICAL
    return Severity.OK if state in _OK_STATES else Severity.WARNING


@dataclass(frozen=True)
class Check:
    """The outcome of one check: its severity and the line to print."""

    severity: Severity
    line: str


def check(hosts: Sequence[HostStatus], now_ms: int, wanted: Sequence[str] = ()) -> Check:
    """The fleet's health from its heartbeats at Redis's ``now_ms``.

    Args:
        hosts: every heartbeat.
        now_ms: Redis's clock.
        wanted: host names that must be there (none: every host that beats); a name
            without a heartbeat is ``MISSING``, a critical state.
    """
    known = {h.host: h for h in hosts}
    names = list(wanted) or sorted(known)
    if not names:
        return Check(Severity.UNKNOWN, "PUSHFW UNKNOWN: no host has sent a heartbeat | hosts=0")
    states = {n: _checked_state(known.get(n), now_ms) for n in names}
    worst = max((_severity(s) for s in states.values()), default=Severity.OK)
    bad = [f"{n} {s}" for n, s in states.items() if _severity(s) is not Severity.OK]
    counts = {sev: sum(_severity(s) is sev for s in states.values()) for sev in Severity}
    healthy = f"{counts[Severity.OK]} of {len(names)} hosts ok"
    perf = " ".join(f"{sev.name.lower()}={counts[sev]}" for sev in Severity if sev < 3)
    text = f"{', '.join(bad)}; {healthy}" if bad else healthy
    return Check(worst, f"PUSHFW {worst.name}: {text} | hosts={len(names)} {perf}")
