"""The Python producer: append commands to the stream and read what hosts did with them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
from pydantic import ValidationError
from redis.typing import EncodableT, FieldT

from pushfw.producer import functions
from pushfw.producer.connection import connect, redis_ms
from pushfw.producer.contract import Command, Result, parse_command, signature, targets
from pushfw.producer.entry_ids import before, entry_ms, entry_order
from pushfw.producer.keys import DEFAULT_PREFIX, Keys
from pushfw.producer.lists import ListContent, parse_list_command
from pushfw.producer.records import (
    HostStatus,
    IdsAhead,
    ListHits,
    ListRecord,
    RuleHits,
    RuleRecord,
)

__all__ = [
    "STALE_AFTER_BEATS",
    "DeadLetter",
    "Producer",
    "forget_host",
    "is_live",
    "is_stale",
    "reaches",
]

_Counts = TypeVar("_Counts", RuleHits, ListHits)

STALE_AFTER_BEATS = 3
"""Heartbeats a host may miss before ``pushfw status`` calls it STALE."""


@dataclass(frozen=True)
class DeadLetter:
    """A command a host gave up on, with its original fields."""

    id: str
    cmd: str
    host: str
    deliveries: int
    error: str
    fields: dict[str, str]


def _with_options(
    fields: dict[str, str], ttl_s: int | None, target: Iterable[str], reply: bool
) -> dict[str, str]:
    """A command's fields with its optional ones, as the wire spells them."""
    if reply:
        fields["reply"] = "1"
    if ttl_s is not None:
        fields["ttl"] = str(ttl_s)
    if names := ",".join(target):
        fields["target"] = names
    return fields


def forget_host(client: redis.Redis, keys: Keys, host: str) -> bool:
    """Destroy ``host``'s consumer group, heartbeat and hit counts; True if any existed.

    The stream is then trimmed without waiting for that host; if it comes back, it finds
    its group gone and starts from the ledger, as a new host does.
    """
    pipe = client.pipeline(transaction=True)
    pipe.hdel(keys.hosts, host)
    pipe.delete(keys.hits(host), keys.list_hits(host))
    pipe.exists(keys.cmd)
    deleted, _, stream = pipe.execute()
    destroyed = 0
    if stream:
        try:
            destroyed = int(client.xgroup_destroy(keys.cmd, Keys.host_group(host)))
        except redis.ResponseError as exc:  # no such group
            if "NOGROUP" not in str(exc) and "no such" not in str(exc).lower():
                raise
    return bool(deleted or destroyed)


def is_stale(host: HostStatus, now_ms: int) -> bool:
    """Whether ``host`` missed :data:`STALE_AFTER_BEATS` heartbeats by Redis's ``now_ms``."""
    return now_ms - host.last_seen_ms > STALE_AFTER_BEATS * host.interval_s * 1000


def is_live(host: HostStatus, now_ms: int) -> bool:
    """Whether ``host`` follows the stream now, so it will report on a new command."""
    return host.state != "stopped" and not is_stale(host, now_ms)


def reaches(target: Collection[str], host: HostStatus) -> bool:
    """Whether a command with ``target`` is meant for ``host``, as every worker decides it
    (:func:`.contract.targets`)."""
    return targets(target, host.host, host.labels)


class Producer:
    """Sends commands; every method validates before any I/O.

    Args:
        client: a redis-py client created with ``decode_responses=True``.
        prefix: the key prefix the workers use.
        hmac_key: the key shared with the workers; when set, every command carries ``ts``
            (this host's clock, unix ms) and ``sig`` (see :func:`~.contract.signature`).

    Every sending method takes ``reply`` (default True): ask each host for a result entry,
    which :meth:`wait` reads. Bulk senders pass False; hosts then only count the command in
    their heartbeats (results of rejected and failed commands are written anyway).
    """

    def __init__(
        self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, hmac_key: str | None = None
    ) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._hmac_key = hmac_key.encode("utf-8") if hmac_key else None

    @classmethod
    def from_url(
        cls, url: str, prefix: str = DEFAULT_PREFIX, hmac_key: str | None = None
    ) -> Producer:
        return cls(connect(url, decode_responses=True), prefix, hmac_key)

    def send(self, command: Command) -> str:
        """XADD one command (signed if a key is set); returns its entry id.

        https://redis.io/commands/xadd/
        """
        return cast(str, self.client.xadd(self.keys.cmd, self._wire(command.to_fields())))

    def _wire(self, wire: dict[str, str]) -> dict[FieldT, EncodableT]:
        """The stream fields, with ``ts`` and ``sig`` when a key is set."""
        if self._hmac_key is not None:
            wire["ts"] = str(time.time_ns() // 1_000_000)
            wire["sig"] = signature(wire, self._hmac_key)
        return {k: v for k, v in wire.items()}

    def load_list(
        self,
        name: str,
        content: ListContent,
        *,
        action: str = "drop",
        ttl_s: int | None = None,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Store ``content`` as a version of list ``name`` and send one ``list.load`` for it.

        The content is stored first, through the ``list_store`` Redis Function (once, no
        expiry: see :func:`pushfw.producer.functions.store_list`), then the command is sent,
        so a host never reads a command whose content was not stored. Returns the command's
        entry id.

        Raises:
            redis.ResponseError: the content key holds something else, or the Functions
                are not loaded and this user may not load them.
        """
        fields = {"op": "list.load", "name": name, "version": content.version, "action": action}
        fields.update(size=str(content.size), reason=reason, request_id=request_id)
        cmd = parse_list_command(_with_options(fields, ttl_s, target, reply))
        key = self.keys.list_content(cmd.name, cmd.version)
        functions.store_list(self.client, key, content.to_bytes(), self.keys.prefix)
        return cast(str, self.client.xadd(self.keys.cmd, self._wire(cmd.to_fields())))

    def delete_list(
        self, name: str, *, target: Iterable[str] = (), reason: str = "", reply: bool = True
    ) -> str:
        """Remove list ``name`` from every host (or the targeted ones); returns the entry id."""
        fields = {"op": "list.delete", "name": name, "reason": reason}
        cmd = parse_list_command(_with_options(fields, None, target, reply))
        return cast(str, self.client.xadd(self.keys.cmd, self._wire(cmd.to_fields())))

    def lists(self) -> list[ListRecord]:
        """The lists the ledger holds, by name (removed and expired ones left out)."""
        now_ms = self.now_ms()
        raw = cast(dict[str, str], self.client.hgetall(self.keys.lists))
        records = (ListRecord.model_validate_json(v) for v in raw.values())
        return sorted((r for r in records if r.active_at(now_ms)), key=lambda r: r.name)

    def _command(
        self,
        op: str,
        ip: str,
        ttl_s: int | None,
        target: Iterable[str],
        reason: str,
        request_id: str,
        reply: bool,
    ) -> str:
        fields = {"op": op, "ip": ip, "reason": reason, "request_id": request_id}
        return self.send(parse_command(_with_options(fields, ttl_s, target, reply)))

    def drop(
        self,
        ip: str,
        *,
        ttl_s: int | None = None,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Ban ``ip`` (an address or network), for ``ttl_s`` seconds or for good."""
        return self._command("drop.insert", ip, ttl_s, target, reason, request_id, reply)

    def accept(
        self,
        ip: str,
        *,
        ttl_s: int | None = None,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Allow ``ip``; an accept wins over any drop."""
        return self._command("accept.insert", ip, ttl_s, target, reason, request_id, reply)

    def undrop(
        self,
        ip: str,
        *,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Lift a ban."""
        return self._command("drop.delete", ip, None, target, reason, request_id, reply)

    def unaccept(
        self,
        ip: str,
        *,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Withdraw an allow."""
        return self._command("accept.delete", ip, None, target, reason, request_id, reply)

    def watch(
        self,
        ip: str,
        *,
        ttl_s: int | None = None,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Count ``ip``'s packets without dropping or accepting them (shadow mode)."""
        return self._command("watch.insert", ip, ttl_s, target, reason, request_id, reply)

    def unwatch(
        self,
        ip: str,
        *,
        target: Iterable[str] = (),
        reason: str = "",
        request_id: str = "",
        reply: bool = True,
    ) -> str:
        """Stop watching ``ip``."""
        return self._command("watch.delete", ip, None, target, reason, request_id, reply)

    def wait(self, cmd_id: str, expect: int = 1, timeout_s: float = 10.0) -> list[Result]:
        """Block until ``expect`` hosts reported on ``cmd_id`` or the timeout passes."""
        found: dict[str, Result] = {}
        cursor = before(cmd_id)
        now_ms = self.now_ms()
        if entry_ms(cmd_id) > now_ms:
            # an id ahead of Redis's clock (a producer chose one): results get ids behind it
            cursor = f"{now_ms - 60_000}-0"
        deadline = time.monotonic() + timeout_s
        while len(found) < expect:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            block_ms = min(left_ms, 1000)  # stay well inside the client's socket timeout
            reply = cast(
                list[Any], self.client.xread({self.keys.results: cursor}, count=500, block=block_ms)
            )
            for entry_id, fields in reply[0][1] if reply else []:
                cursor = entry_id
                if fields.get("cmd") == cmd_id:
                    result = Result.from_entry(entry_id, fields)
                    found[result.host] = result
        return list(found.values())

    def results(self, count: int = 20, cmd_id: str | None = None) -> list[Result]:
        """The newest results, newest first; with ``cmd_id``, every result of that command.

        A command's results come after it, so they are read from its id on, in pages: the
        whole results stream is searched, not only its newest entries.
        """
        if cmd_id is None:
            rows = cast(list[Any], self.client.xrevrange(self.keys.results, count=count))
            return [Result.from_entry(eid, fields) for eid, fields in rows]
        return self.results_of([cmd_id])[::-1][:count]

    def results_of(self, cmd_ids: Collection[str]) -> list[Result]:
        """Every result of these commands, oldest first, in one pass over the results
        stream from the oldest command on (``pushfw why`` asks for several at once)."""
        if not cmd_ids:
            return []
        oldest = min(cmd_ids, key=entry_order)
        start = oldest if entry_order(oldest)[0] <= self.now_ms() else "-"  # "-": an id ahead
        wanted = set(cmd_ids)
        found: list[Result] = []
        while True:
            page = cast(list[Any], self.client.xrange(self.keys.results, start, "+", 1000))
            found.extend(
                Result.from_entry(eid, fields)
                for eid, fields in page
                if fields.get("cmd") in wanted
            )
            if len(page) < 1000:
                break
            start = f"({page[-1][0]}"
        return found

    def progress(self, cmd_id: str) -> dict[str, str]:
        """Where each host's group stands with ``cmd_id``: ``done``, ``pending`` or ``not read``.

        Read from the groups themselves, so it answers also for commands that asked for no
        result entry (a producer ACL user may not read them: NoPermissionError). A follower
        (no group) is ``done`` or ``not done`` by the position its last heartbeat carried.
        """
        try:
            groups = cast(list[Any], self.client.xinfo_groups(self.keys.cmd))
        except redis.exceptions.NoPermissionError:
            raise
        except redis.ResponseError:  # no command stream yet
            return {}
        order = entry_order(cmd_id)
        out: dict[str, str] = {}
        for group in groups:
            name = str(group["name"])
            if not name.startswith("host:"):
                continue
            if entry_order(str(group["last-delivered-id"])) < order:
                out[name.removeprefix("host:")] = "not read"
                continue
            held = cast(
                list[Any], self.client.xpending_range(self.keys.cmd, name, cmd_id, cmd_id, 1)
            )
            out[name.removeprefix("host:")] = "pending" if held else "done"
        for host in self.hosts():  # followers have no group: their heartbeat says
            if host.position:
                out[host.host] = "done" if entry_order(host.position) >= order else "not done"
        return out

    def unfolded(self) -> int | None:
        """Commands on the stream the ledger does not hold yet: not delivered to the
        ``ledger`` group (its lag) or read and not acknowledged (its pending). Until a worker
        folds them, ``pushfw list`` and ``lists`` cannot show them. None: this Redis user may
        not run XINFO (the producer ACL), or the lag is unknown."""
        try:
            groups = cast(list[Any], self.client.xinfo_groups(self.keys.cmd))
        except redis.exceptions.NoPermissionError:
            return None
        except redis.ResponseError:  # no command stream yet
            return 0
        for group in groups:
            if str(group["name"]) == Keys.LEDGER_GROUP:
                lag = group.get("lag")
                return None if lag is None else int(lag) + int(group["pending"])
        return int(self.client.xlen(self.keys.cmd))  # no worker ever folded one

    def dead(self, count: int = 20) -> list[DeadLetter]:
        """The newest dead letters, newest first."""
        rows = cast(list[Any], self.client.xrevrange(self.keys.dead, count=count))
        meta = {"cmd", "host", "deliveries", "error"}
        return [
            DeadLetter(
                id=eid,
                cmd=fields.get("cmd", ""),
                host=fields.get("host", ""),
                deliveries=int(fields.get("deliveries", "0") or 0),
                error=fields.get("error", ""),
                fields={k: v for k, v in fields.items() if k not in meta},
            )
            for eid, fields in rows
        ]

    def now_ms(self) -> int:
        """Redis's clock, which stamps entry ids and so measures every expiry."""
        return redis_ms(self.client)

    def rules(self, host: str | None = None) -> list[RuleRecord]:
        """Active rules in the ledger (for one host if given), by network."""
        now_ms = self.now_ms()
        labels: frozenset[str] = frozenset()
        if host is not None:
            known = {h.host: h for h in self.hosts()}
            labels = frozenset(known[host].labels) if host in known else frozenset()
        records = (
            RuleRecord.model_validate_json(raw)
            for _, raw in self.client.hscan_iter(self.keys.rules, count=1000)
        )
        active = [
            rec
            for rec in records
            if rec.active_at(now_ms) and (host is None or rec.targets(host, labels))
        ]
        return sorted(active, key=lambda rec: (rec.action, rec.network))

    def ids_ahead(self) -> IdsAhead | None:
        """Commands added with ids ahead of Redis's clock, as the workers counted them."""
        raw = cast(dict[str, str], self.client.hgetall(self.keys.ahead))
        return IdsAhead.model_validate(raw) if raw else None

    def hosts(self) -> list[HostStatus]:
        """Every host that has sent a heartbeat, by name."""
        raw = cast(dict[str, str], self.client.hgetall(self.keys.hosts))
        return sorted(
            (HostStatus.model_validate_json(v) for v in raw.values()), key=lambda h: h.host
        )

    def hits(self, hosts: Iterable[str]) -> dict[str, dict[str, RuleHits]]:
        """Each host's published hit counts: host -> rule id -> counts (its busiest rules)."""
        return self._per_host(hosts, self.keys.hits, RuleHits)

    def list_hits(self, hosts: Iterable[str]) -> dict[str, dict[str, ListHits]]:
        """Each host's published list counts: host -> list name -> counts and busiest entries."""
        return self._per_host(hosts, self.keys.list_hits, ListHits)

    def _per_host(
        self, hosts: Iterable[str], key_of: Callable[[str], str], model: type[_Counts]
    ) -> dict[str, dict[str, _Counts]]:
        """One hash per host, field -> ``model``: one ``HGETALL`` per host in one round trip.
        A value that is not a valid ``model`` is left out, never trusted (workers write
        these hashes; Redis is input).
        https://redis.io/commands/hgetall/
        """
        names = list(hosts)
        pipe = self.client.pipeline(transaction=False)
        for host in names:
            pipe.hgetall(key_of(host))
        replies = cast(list[dict[str, str]], pipe.execute())
        found: dict[str, dict[str, _Counts]] = {}
        for host, reply in zip(names, replies, strict=True):
            found[host] = {}
            for field, raw in reply.items():
                with contextlib.suppress(ValidationError):
                    found[host][field] = model.model_validate_json(raw)
        return found
