"""A fleet on one Redis: what a command costs the primary when 1,000 hosts follow the stream.

Simulated hosts read their group, decide and acknowledge with the worker's own stream code,
without a kernel: each reads with :meth:`CommandStream.read`, parses through the worker's
:class:`ParsedEntries` (once per process, as a worker parses once), checks its target,
and writes a result entry if the command asks for one (or was rejected) and XACKs with
:meth:`CommandStream.finish`, one MULTI per batch. Hosts beat every 5 s. These bursts are
timed, each in a Redis of its own:

- ``on request``: commands without ``reply`` (results on request: hosts only count them);
- ``on request, followers``: the same, read by followers off a replica;
- ``every command``: each command asks (``reply 1``), i.e. one result entry per host per
  command, as every command cost before results were on request;
- a list: one ``list.load`` of a million entries (``--list-entries``), for which every host
  fetches the list's packed content once.

A third burst is the first one read by followers (``read_url``): the simulated hosts read
a replica with ``XREAD`` after a position of their own, take Redis's clock from the primary
per batch, beat with their position and share the ledger's fold (at most every 0.5 s per
host once it is caught up), as a follower worker does.

Per burst: seconds until every host is done, Redis CPU seconds per command (``INFO cpu``)
on the primary and on the replica, Redis memory, and PING latency (p50/p99) on the primary
during the burst against idle.

    python -m bench.fleet                          # 1,000 hosts, 10,000 and 1,000 commands
    python -m bench.fleet --hosts 200 --commands 5000 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from bench.readcost import redis_cpu_s
from pushfw.producer.client import Producer
from pushfw.producer.connection import untyped
from pushfw.producer.contract import CommandRejected
from pushfw.producer.keys import Keys
from pushfw.producer.lists import ListContent, is_list_entry, parse_list_command
from pushfw.producer.records import HostStatus
from pushfw.worker.ledger import Ledger
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.stream import (
    CommandStream,
    Entry,
    ParsedEntries,
    entries_from_reply,
    queue_answers,
)
from testbed.redis_server import RedisServer

KEYS = Keys()
_BATCH = 1000
_DEFAULTS = WorkerSettings.model_fields
_RESULTS_MAXLEN = int(_DEFAULTS["results_maxlen"].default)
_DEAD_MAXLEN = int(_DEFAULTS["dead_maxlen"].default)


def _address(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


def _host_names(n: int) -> list[str]:
    return [f"sim{i:04d}" for i in range(n)]


def _answers(
    host: str, entries: list[Entry], parsed: ParsedEntries
) -> list[dict[FieldT, EncodableT]]:
    """The result entries one host writes for a batch: asked for, or rejected."""
    out: list[dict[FieldT, EncodableT]] = []
    for entry in entries:
        if entry.fields is None or is_list_entry(entry.fields):
            continue  # the worker writes a list's result only when asked, like a rule's
        try:
            cmd = parsed.parse(entry)
        except CommandRejected as exc:
            out.append(_result(entry.id, host, "rejected", str(exc)))
            continue
        if (not cmd.target or host in cmd.target) and cmd.wants_result:
            out.append(_result(entry.id, host, "applied", "inserted", cmd.request_id))
    return out


def _result(
    cmd_id: str, host: str, status: str, detail: str, request_id: str = ""
) -> dict[FieldT, EncodableT]:
    """A result entry's fields, as the worker writes them."""
    return {
        "cmd": cmd_id,
        "request_id": request_id,
        "host": host,
        "status": status,
        "detail": detail,
    }


def _fetch_lists(client: redis.Redis, entries: list[Entry]) -> None:
    """A host's read of every list version its batch loads: one GET of the packed content."""
    for entry in entries:
        if entry.fields is None or not is_list_entry(entry.fields):
            continue
        cmd = parse_list_command(entry.fields)
        blob: Any = client.get(KEYS.list_content(cmd.name, cmd.version))
        if blob is None or len(blob) < 5 * cmd.size:
            raise RuntimeError(f"list {cmd.name} version {cmd.version}: content missing")


def _serve_one(stream: CommandStream, parsed: ParsedEntries) -> bool:
    """One batch of one host: read, decide, write results and XACK in one MULTI."""
    entries = stream.read(">", _BATCH, None)
    if not entries:
        return False
    _fetch_lists(stream.client, entries)
    answers = _answers(stream.consumer, entries, parsed)
    stream.finish([e.id for e in entries], answers, [], _RESULTS_MAXLEN, _DEAD_MAXLEN)
    return True


def _beat(client: redis.Redis, hosts: list[str], positions: dict[str, str] | None = None) -> None:
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        position = (positions or {}).get(host, "")
        status = HostStatus(host=host, last_seen_ms=now_ms, position=position)
        pipe.hset(KEYS.hosts, host, status.model_dump_json())
    pipe.execute()


def _simulate(url: str, hosts: list[str], stop_at: float) -> None:
    """One process's share of the fleet: round-robin over its hosts until ``stop_at``."""
    client = redis.Redis.from_url(url)
    parsed = ParsedEntries()
    streams = [CommandStream(client, KEYS, Keys.host_group(host), host) for host in hosts]
    next_beat = 0.0
    while time.time() < stop_at:
        busy = [_serve_one(stream, parsed) for stream in streams]
        if time.time() >= next_beat:
            _beat(client, hosts)
            next_beat = time.time() + 5
        if not any(busy):
            time.sleep(0.01)
    client.close()


def _follow_one(
    replica: redis.Redis,
    primary: redis.Redis,
    ledger: Ledger,
    host: str,
    position: list[str],
    parsed: ParsedEntries,
) -> int:
    """One batch of one follower (``read_url``): XREAD on the replica after its position,
    Redis's clock from the primary (as the applier's clock read does), results on the
    primary only when due; the position is the follower's own. Returns entries read."""
    reply: Any = replica.xread({KEYS.cmd: position[0]}, count=_BATCH)
    if not reply:
        return 0
    entries = entries_from_reply(reply[0][1])
    primary.time()
    _fetch_lists(replica, entries)
    answers = _answers(host, entries, parsed)
    if answers:  # as a follower's stream finishes a batch: results on the primary
        pipe = primary.pipeline(transaction=True)
        queue_answers(pipe, KEYS, answers, [], _RESULTS_MAXLEN, _DEAD_MAXLEN)
        pipe.execute()
    position[0] = entries[-1].id
    return len(entries)


def _simulate_followers(
    url: str, replica_url: str, hosts: list[str], stop_at: float, read: Any, first: int
) -> None:
    """One process's share of a fleet of followers; ``read[first + i]`` counts the entries
    host ``i`` of the share has read. Each host asks for its share of the ledger's fold at
    most every 0.5 s, as a follower does, with the worker's own :class:`Ledger`."""
    primary = redis.Redis.from_url(url)
    replica = redis.Redis.from_url(replica_url)
    parsed = ParsedEntries()
    newest: Any = replica.xrevrange(KEYS.cmd, count=1)
    positions = {host: [newest[0][0].decode() if newest else "0-0"] for host in hosts}
    ledgers = {host: Ledger(primary, KEYS, host, _BATCH) for host in hosts}
    fold_at = dict.fromkeys(hosts, 0.0)
    next_beat = 0.0
    while time.time() < stop_at:
        busy = False
        for i, host in enumerate(hosts):
            got = _follow_one(replica, primary, ledgers[host], host, positions[host], parsed)
            read[first + i] += got
            busy = busy or bool(got)
            if time.monotonic() >= fold_at[host] and ledgers[host].fold_new() < _BATCH:
                fold_at[host] = time.monotonic() + 0.5
        if time.time() >= next_beat:
            _beat(primary, hosts, {h: p[0] for h, p in positions.items()})
            next_beat = time.time() + 5
        if not busy:
            time.sleep(0.01)
    primary.close()
    replica.close()


class _Pinger(threading.Thread):
    """PING every 10 ms from a connection of its own; latencies in ms."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            started = time.perf_counter()
            self.client.ping()
            self.latencies.append((time.perf_counter() - started) * 1000)


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50_ms": values[0] if values else 0.0, "p99_ms": values[0] if values else 0.0}
    cuts = statistics.quantiles(values, n=100)
    return {"p50_ms": statistics.median(values), "p99_ms": cuts[98]}


def _command_costs(client: redis.Redis, commands: int) -> list[dict[str, Any]]:
    """The primary's busiest commands in the burst (``INFO commandstats``), per command sent."""
    raw: Any = client.info("commandstats")
    rows = [
        {
            "command": name.removeprefix("cmdstat_"),
            "calls_per_command": int(row["calls"]) / commands,
            "us_per_command": float(row["usec"]) / commands,
        }
        for name, row in raw.items()
    ]
    return sorted(rows, key=lambda row: -row["us_per_command"])[:8]


def _start_replica(primary: redis.Redis, server: RedisServer) -> redis.Redis:
    server.workdir.mkdir()
    server.start()
    while primary.wait(1, 100) < 1:
        time.sleep(0.05)
    return redis.Redis.from_url(server.unix_url)


def _group_hosts(
    client: redis.Redis, url: str, shares: list[list[str]], stop_at: float
) -> list[multiprocessing.Process]:
    """Hosts with a consumer group each, created at the stream's end."""
    pipe = client.pipeline(transaction=False)
    for name in (n for share in shares for n in share):
        pipe.xgroup_create(KEYS.cmd, Keys.host_group(name), id="$")
    pipe.execute()
    return [
        multiprocessing.Process(target=_simulate, args=(url, share, stop_at)) for share in shares
    ]


def burst(
    hosts: int,
    commands: int,
    reply: bool,
    processes: int,
    list_entries: int = 0,
    followers: bool = False,
) -> dict[str, Any]:
    """One burst in a Redis of its own; returns its figures.

    With ``list_entries``, the burst is one ``list.load`` of that many entries instead of
    ``commands`` single commands: every host fetches the list's content once. With
    ``followers``, the hosts read a replica of their own Redis after a position, as
    ``read_url`` workers do, and share the ledger's fold (the group bursts leave the
    ledger unfolded: their figures are the hosts' reads alone)."""
    with tempfile.TemporaryDirectory(prefix="pushfw-fleet-") as tmp:
        server = RedisServer(Path(tmp) / "primary")
        server.workdir.mkdir()
        server.start()
        url = server.unix_url
        client = redis.Redis.from_url(url)
        replica_server = RedisServer(Path(tmp) / "replica", replica_of=server.port)
        replica: redis.Redis | None = None
        try:
            client.xgroup_create(KEYS.cmd, Keys.LEDGER_GROUP, id="$", mkstream=True)
            names = _host_names(hosts)
            size = -(-hosts // processes)
            shares = [names[first : first + size] for first in range(0, hosts, size)]
            stop_at = time.time() + 3600
            read = multiprocessing.Array("q", hosts, lock=False)
            if followers:
                replica = _start_replica(client, replica_server)
                procs = [
                    multiprocessing.Process(
                        target=_simulate_followers,
                        args=(url, replica_server.unix_url, share, stop_at, read, i * size),
                    )
                    for i, share in enumerate(shares)
                ]
            else:
                procs = _group_hosts(client, url, shares, stop_at)
            pinger = _Pinger(url)
            pinger.start()
            time.sleep(1.0)
            idle = _percentiles(pinger.latencies)
            pinger.latencies.clear()
            for proc in procs:
                proc.start()
            time.sleep(1.0)  # the hosts' first beats
            used_before = int(client.info("memory")["used_memory"])
            client.config_resetstat()
            cpu_before = redis_cpu_s(client)
            replica_before = redis_cpu_s(replica) if replica is not None else 0.0
            content = ListContent.of(_address(i) for i in range(list_entries))
            started = time.perf_counter()
            if list_entries:
                producer = Producer(redis.Redis.from_url(url, decode_responses=True))
                producer.load_list("fleet", content, reply=False)
                producer.client.close()
                commands = 1
            pipe = client.pipeline(transaction=False)
            for i in range(0 if list_entries else commands):
                fields = {"op": "drop.insert", "ip": _address(i)}
                if reply:
                    fields["reply"] = "1"
                untyped(pipe).xadd(KEYS.cmd, fields)
                if len(pipe) >= 1000:
                    pipe.execute()
            pipe.execute()
            while not (
                all(n >= commands for n in read) if followers else _fleet_done(client, names)
            ):
                time.sleep(0.05 if followers else 0.5)
            seconds = time.perf_counter() - started
            cpu = redis_cpu_s(client) - cpu_before
            replica_cpu = redis_cpu_s(replica) - replica_before if replica is not None else 0.0
            used_after = int(client.info("memory")["used_memory"])
            pinger.stop.set()
            pinger.join(timeout=5)
            during = _percentiles(pinger.latencies)
            for proc in procs:
                proc.terminate()
                proc.join(timeout=10)
            return {
                "hosts": hosts,
                "commands": commands,
                "list_entries": list_entries,
                "results": (
                    f"{list_entries:,}-entry list"
                    if list_entries
                    else "every command"
                    if reply
                    else "on request"
                )
                + (", followers" if followers else ""),
                "seconds": seconds,
                "commands_per_s": commands / seconds,
                "redis_cpu_s": cpu,
                "redis_cpu_ms_per_command": cpu / commands * 1000,
                "replica_cpu_ms_per_command": replica_cpu / commands * 1000,
                "redis_memory_delta_mb": (used_after - used_before) / 2**20,
                "results_entries": int(client.xlen(KEYS.results)),
                "ping_idle": idle,
                "ping_during": during,
                "primary_commands": _command_costs(client, commands),
            }
        finally:
            client.close()
            if replica is not None:
                replica.close()
            replica_server.stop()
            server.stop()


def _fleet_done(client: redis.Redis, names: list[str]) -> bool:
    """Every simulated host's group has delivered and acknowledged the whole stream."""
    rows: Any = client.xinfo_groups(KEYS.cmd)
    mine = {r["name"].decode(): r for r in rows if r["name"].decode().startswith("host:")}
    return len(mine) == len(names) and all(
        int(r["lag"] or 0) == 0 and int(r["pending"]) == 0 for r in mine.values()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--commands", type=int, default=10_000, help="the on-request burst")
    parser.add_argument(
        "--commands-with-results", type=int, default=1000, help="the every-command burst"
    )
    parser.add_argument(
        "--list-entries", type=int, default=1_000_000, help="a list burst (0: none)"
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--no-followers", action="store_true", help="skip the bursts read by followers"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for reply, commands in ((False, args.commands), (True, args.commands_with_results)):
        label = "every command" if reply else "on request"
        print(
            f"fleet: {args.hosts} hosts, {commands} commands, results {label} ...", file=sys.stderr
        )
        rows.append(burst(args.hosts, commands, reply, args.processes))
        if not reply and not args.no_followers:
            print(
                f"fleet: {args.hosts} followers on a replica, {commands} commands ...",
                file=sys.stderr,
            )
            rows.append(burst(args.hosts, commands, False, args.processes, followers=True))
    if args.list_entries:
        print(
            f"fleet: {args.hosts} hosts, one {args.list_entries:,}-entry list ...", file=sys.stderr
        )
        rows.append(burst(args.hosts, 0, False, args.processes, args.list_entries))
        if not args.no_followers:
            print(
                f"fleet: {args.hosts} followers, one {args.list_entries:,}-entry list ...",
                file=sys.stderr,
            )
            rows.append(
                burst(args.hosts, 0, False, args.processes, args.list_entries, followers=True)
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'BURST':29} {'HOSTS':>5} {'CMDS':>6} {'SECONDS':>8} {'CMD/S':>8} "
        f"{'REDIS_CPU_MS/CMD':>16} {'REPLICA_MS/CMD':>14} {'RESULT_ENTRIES':>14} {'MEM_MB':>7} "
        f"{'PING_P99_IDLE':>13} {'PING_P99_BURST':>14}"
    )
    for row in rows:
        print(
            f"{row['results']:29} {row['hosts']:>5} {row['commands']:>6} {row['seconds']:>8.1f} "
            f"{row['commands_per_s']:>8.0f} {row['redis_cpu_ms_per_command']:>16.3f} "
            f"{row['replica_cpu_ms_per_command']:>14.3f} "
            f"{row['results_entries']:>14} {row['redis_memory_delta_mb']:>7.1f} "
            f"{row['ping_idle']['p99_ms']:>13.2f} {row['ping_during']['p99_ms']:>14.2f}"
        )
    for row in rows:
        costs = ", ".join(
            f"{c['command']} {c['us_per_command']:.1f} us ({c['calls_per_command']:.2f} calls)"
            for c in row["primary_commands"][:5]
        )
        print(f"primary per command, {row['results']}: {costs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
