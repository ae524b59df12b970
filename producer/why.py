"""``pushfw why ADDRESS``: every rule and list entry covering an address, and each host's part.

The answer is read from what the workers publish: the ledger's rules (``{pushfw}:rules``),
its lists (``{pushfw}:lists``) and their content, read and checked as strictly as a worker
reads it (:func:`pushfw.producer.lists.read_content`), the hosts' heartbeats and the results
stream. A host's part in one cover is told only as far as the host reports it: a host
reports how many entries of a list it refused, never which, so ``why`` says that much.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pushfw.producer.client import Producer, is_live, reaches
from pushfw.producer.contract import Result, Status
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.lists import read_content, record_text
from pushfw.producer.records import HostStatus, ListRecord, RuleRecord
from pushfw.producer.render import as_table, iso_ms

__all__ = [
    "Cover",
    "HostPart",
    "HostView",
    "Why",
    "as_data",
    "cover_rows",
    "host_rows",
    "iso_ms",
    "parse_address",
    "summary",
    "text",
    "why",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

COVER_COLUMNS = [
    "kind",
    "name",
    "network",
    "action",
    "reason",
    "origin",
    "expires_in",
    "target",
    "set_at_utc",
]
"""The covers' table; a time says its zone (UTC) in its header, as ``pushfw list``'s do."""
HOST_COLUMNS = ["host", "verdict", "cover", "state", "detail"]
HOLDS = "holds"
REFUSED = "refused"
NOT_TARGETED = "not targeted"
NOT_YET = "not yet"
UNCERTAIN = "uncertain"


def parse_address(raw: str) -> Address:
    """One IP address; raises ValueError with a one-line reason."""
    try:
        return ipaddress.ip_address(raw.strip())
    except ValueError:
        raise ValueError(f"{raw[:60]!r} is not an IP address (like 203.0.113.9)") from None


def _order(entry_id: str) -> tuple[int, int]:
    """An entry id's order; an id that does not parse (a heartbeat is input) orders first."""
    try:
        return entry_order(entry_id)
    except ValueError:
        return (0, 0)


@dataclass(frozen=True, slots=True)
class Cover:
    """One rule, or one entry of a list, that covers the address."""

    kind: str
    """``rule`` or ``list``."""
    name: str
    """The rule's id (``drop 192.0.2.0/24``) or the list's name."""
    network: str
    action: str
    reason: str
    origin: str
    expires_ms: int | None
    target: tuple[str, ...]
    set_by: str
    """The ledger's command id for this state: a host's results and progress refer to it."""
    version: str = ""
    """A list's version (the hash of its content)."""

    @property
    def label(self) -> str:
        return f"rule {self.name}" if self.kind == "rule" else f"list {self.name} {self.network}"


@dataclass(frozen=True, slots=True)
class HostPart:
    """What one host reports about one cover: ``state`` is one of ``holds``, ``refused``,
    ``not targeted``, ``not yet``, or ``uncertain`` (the host holds the list less some
    refused entries and does not say which); ``detail`` says what the host reported."""

    cover: Cover
    state: str
    detail: str = ""


@dataclass(slots=True)
class HostView:
    host: str
    live: bool
    state: str
    """The heartbeat's state: ``starting``, ``running`` or ``stopped``."""
    parts: list[HostPart] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The action this host applies to the address, accept over drop (``none``: neither);
        ``drop or none`` where an uncertain list entry could decide it."""
        certain = _winner(p.cover for p in self.parts if p.state == HOLDS)
        possible = _winner(p.cover for p in self.parts if p.state in (HOLDS, UNCERTAIN))
        if certain == possible:
            return certain or "none"
        return f"{certain or 'none'} or {possible}"


@dataclass(slots=True)
class Why:
    address: str
    covers: list[Cover]
    hosts: list[HostView]
    problems: list[str]
    """What could not be read (a list whose content is gone or not in the importer's format)."""

    @property
    def wins(self) -> Cover | None:
        """The cover that decides where both reach a host: an accept before any drop."""
        return next((c for c in self.covers if c.action == "accept"), None) or next(
            iter(self.covers), None
        )


def _winner(covers: Iterable[Cover]) -> str | None:
    actions = {c.action for c in covers}
    return "accept" if "accept" in actions else "drop" if "drop" in actions else None


def _rule_covers(rules: list[RuleRecord], address: Address, problems: list[str]) -> list[Cover]:
    found = []
    for rec in rules:
        try:
            net = ipaddress.ip_network(rec.network, strict=False)
        except ValueError:
            problems.append(f"rule {rec.rule_id[:80]!r}: its network does not parse")
            continue
        if net.version == address.version and address in net:
            found.append(
                Cover(
                    "rule",
                    rec.rule_id,
                    str(net),
                    rec.action,
                    rec.reason,
                    rec.origin or "producer",
                    rec.expires_ms,
                    tuple(rec.target),
                    rec.id,
                )
            )
    return found


def _list_covers(producer: Producer, address: Address, problems: list[str]) -> list[Cover]:
    found = []
    at = int(address)
    for rec in producer.lists():
        try:
            content = read_content(producer.client, producer.keys, rec.name, rec.version, rec.size)
        except ValueError as exc:
            problems.append(f"list {rec.name}: content unreadable: {exc}")
            continue
        if content is None:
            problems.append(f"list {rec.name}: content of version {rec.version} is gone")
            continue
        for entry in content.overlapping(address.version, at, at):
            found.append(_list_cover(rec, record_text(entry)))
    return found


def _list_cover(rec: ListRecord, network: str) -> Cover:
    return Cover(
        "list",
        rec.name,
        network,
        rec.action,
        rec.reason,
        "list",
        rec.expires_ms,
        tuple(rec.target),
        rec.id,
        rec.version,
    )


def _refusal(results: list[Result], host: str) -> Result | None:
    return next(
        (r for r in results if r.host == host and r.status in (Status.REJECTED, Status.FAILED)),
        None,
    )


def _answered(results: list[Result], host: str) -> bool:
    """Whether this host's result says it carried the command out: the result is written
    before the heartbeat that would say so (up to a read's block later), and ``--wait``
    returns on the result."""
    return any(r.host == host and r.status in (Status.APPLIED, Status.UNCHANGED) for r in results)


def _taken(host: HostStatus, cmd_id: str) -> bool:
    """Whether this host has carried out ``cmd_id``: it answered it or a newer command, or
    its startup reconcile (which loads the whole ledger) came after it. A stopped worker
    leaves its kernel as it was, so its last heartbeat still tells."""
    order = _order(cmd_id)
    if host.state == "starting":
        return False
    seen = [host.done_id, host.position]
    return host.started_ms > order[0] or any(s and _order(s) >= order for s in seen)


def _rule_part(cover: Cover, host: HostStatus, results: list[Result]) -> HostPart:
    if not reaches(cover.target, host):
        return HostPart(cover, NOT_TARGETED)
    refused = _refusal(results, host.host)
    if refused is not None:
        return HostPart(cover, REFUSED, f"{refused.status.value}: {refused.detail}")
    if _answered(results, host.host) or _taken(host, cover.set_by):
        return HostPart(cover, HOLDS)
    return HostPart(cover, NOT_YET, "has not carried out the command yet")


def _list_part(cover: Cover, host: HostStatus, results: list[Result]) -> HostPart:
    if not reaches(cover.target, host):
        return HostPart(cover, NOT_TARGETED)
    held = host.lists.get(cover.name)
    refused = _refusal(results, host.host)
    if held is None or held.version != cover.version:
        older = "" if held is None else f"; holds an older version ({held.version[:12]})"
        if refused is not None:
            return HostPart(cover, REFUSED, f"the list: {refused.detail}{older}")
        return HostPart(cover, NOT_YET, f"does not hold this version{older}")
    if held.refused:
        return HostPart(
            cover,
            UNCERTAIN,
            f"holds this version less {held.refused} refused "
            f"{'entry' if held.refused == 1 else 'entries'}, and does not say which",
        )
    return HostPart(cover, HOLDS)


def why(producer: Producer, address: Address) -> Why:
    """Every cover of ``address`` in the ledger, accept first, and each host's part in it."""
    problems: list[str] = []
    covers = _rule_covers(producer.rules(), address, problems)
    covers += _list_covers(producer, address, problems)
    covers.sort(key=lambda c: (c.action != "accept", c.kind, c.name, c.network))
    now_ms = producer.now_ms()
    results: dict[str, list[Result]] = {c.set_by: [] for c in covers}
    for result in producer.results_of(list(results)):
        results[result.cmd].append(result)
    views = []
    for host in producer.hosts():
        view = HostView(host.host, is_live(host, now_ms), host.state)
        for cover in covers:
            part = _rule_part if cover.kind == "rule" else _list_part
            view.parts.append(part(cover, host, results[cover.set_by]))
        views.append(view)
    return Why(str(address), covers, views, problems)


def as_data(answer: Why) -> dict[str, object]:
    """The answer for scripts: times as ISO 8601 UTC and epoch ms."""

    def cover(c: Cover) -> dict[str, object]:
        return {
            "kind": c.kind,
            "name": c.name,
            "network": c.network,
            "action": c.action,
            "reason": c.reason,
            "origin": c.origin,
            "expires_at": None if c.expires_ms is None else iso_ms(c.expires_ms),
            "expires_ms": c.expires_ms,
            "target": list(c.target),
            "set_by": c.set_by,
            "set_at": iso_ms(_order(c.set_by)[0]),
            **({"version": c.version} if c.version else {}),
        }

    wins = answer.wins
    return {
        "address": answer.address,
        "wins": None if wins is None else cover(wins),
        "covers": [cover(c) for c in answer.covers],
        "hosts": [
            {
                "host": v.host,
                "live": v.live,
                "state": v.state,
                "verdict": v.verdict,
                "covers": [
                    {"kind": p.cover.kind, "name": p.cover.name, "network": p.cover.network}
                    | {"state": p.state, "detail": p.detail}
                    for p in v.parts
                ],
            }
            for v in answer.hosts
        ],
        "problems": answer.problems,
    }


def summary(answer: Why) -> str:
    """The first line a person reads: what covers the address and which action wins."""
    if not answer.covers:
        return f"{answer.address}: no rule or list entry covers it"
    wins = answer.wins
    assert wins is not None
    actions = {c.action for c in answer.covers}
    over = " over drop" if actions == {"accept", "drop"} else ""
    count = len(answer.covers)
    return (
        f"{answer.address}: {count} {'cover' if count == 1 else 'covers'}; "
        f"{wins.action} wins{over}: {wins.label}"
    )


def cover_rows(
    answer: Why, span: Callable[[int], str], when: Callable[[str], str], now_ms: int
) -> list[dict[str, object]]:
    """The covers as table rows; ``span`` and ``when`` write a time left and an entry id's
    time as ``pushfw list`` does."""
    return [
        {
            "kind": c.kind,
            "name": c.name if c.kind == "list" else "-",
            "network": c.network,
            "action": c.action,
            "reason": c.reason,
            "origin": c.origin,
            "expires_in": "never" if c.expires_ms is None else span(c.expires_ms - now_ms),
            "target": ",".join(c.target) or "*",
            "set_at_utc": when(c.set_by),
        }
        for c in answer.covers
    ]


def host_rows(answer: Why) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for view in answer.hosts:
        host = view.host if view.live else f"{view.host} ({view.state})"
        for part in view.parts:
            rows.append(
                {
                    "host": host,
                    "verdict": view.verdict,
                    "cover": part.cover.label,
                    "state": part.state,
                    "detail": part.detail,
                }
            )
    return rows


def text(answer: Why, span: Callable[[int], str], when: Callable[[str], str], now_ms: int) -> str:
    """The answer for people: the summary line, the covers, then each host's part."""
    lines = [summary(answer)]
    if answer.covers:
        lines.append(as_table(cover_rows(answer, span, when, now_ms), COVER_COLUMNS))
        hosts = host_rows(answer)
        lines.append(as_table(hosts, HOST_COLUMNS) if hosts else "no host has sent a heartbeat")
    return "\n".join(lines)
