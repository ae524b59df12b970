"""I1 and I3 together: kill -9 under a mixed load, compared with a model of the stream.

Four hosts on one Redis, each in its own namespace: one per kernel backend (iptables,
nftables, ipset) with a consumer group, and a follower (nftables) that reads a replica after
the position it keeps in its state file. A producer sends inserts, deletes and re-inserts
with and without a ttl, IPv4 and IPv6, single addresses and networks, some targeted to one
host, while a random worker is SIGKILLed and restarted every few hundred ms, and now and
then the replica is frozen (SIGSTOP) for a moment or killed and restarted (the follower
reads on the primary meanwhile). Then every
kernel must hold exactly what the stream, applied in order, says it should: nothing lost,
nothing extra, nothing pending, no dead letter, and no worker death that the kill loop did
not cause.

``CHAOS_COMMANDS`` (default 3,000, small enough for CI), ``CHAOS_SEED`` and
``CHAOS_KILL_GAP_S`` (default 0.6) set a larger or another run; ``scripts/chaos`` runs
10,000 commands with a kill every 50-150 ms and prints the counts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, WorkerProcess, need, wait_for

CMD = "{pushfw}:cmd"
COMMANDS = int(os.environ.get("CHAOS_COMMANDS", "3000"))
SEED = int(os.environ.get("CHAOS_SEED", "20261201"))
KILL_GAP_S = float(os.environ.get("CHAOS_KILL_GAP_S", "0.6"))
"""A kill every 0.05 s to this many seconds (uniformly drawn)."""
SHORT_TTL_S = (1, 2)
LONG_TTL_S = 3600


@dataclass(frozen=True)
class Sent:
    """One command as the model reads it."""

    id: str
    action: str
    network: str
    insert: bool
    ttl_s: int | None
    target: str

    @property
    def expires_ms(self) -> int | None:
        return int(self.id.split("-")[0]) + self.ttl_s * 1000 if self.ttl_s else None


def rule_pool(rng: random.Random) -> list[tuple[str, str]]:
    """(action, network): v4 and v6 addresses and networks, drops and a few accepts."""
    nets = [f"198.18.{i // 200}.{i % 200 + 1}/32" for i in range(180)]
    nets += [f"198.19.{i}.0/24" for i in range(20)]
    nets += [f"2001:db8::{i:x}/128" for i in range(1, 80)]
    nets += [f"2001:db8:{i:x}::/48" for i in range(1, 20)]
    pool = [("drop", n) for n in nets]
    pool += [("accept", n) for n in rng.sample(nets, 30)]
    return pool


def make_commands(rng: random.Random, hosts: list[str]) -> list[dict[str, str]]:
    pool = rule_pool(rng)
    out = []
    for _ in range(COMMANDS):
        action, network = rng.choice(pool)
        insert = rng.random() < 0.65
        fields = {"op": f"{action}.{'insert' if insert else 'delete'}", "ip": network}
        if insert:
            kind = rng.random()
            if kind < 0.25:
                fields["ttl"] = str(rng.choice(SHORT_TTL_S))
            elif kind < 0.45:
                fields["ttl"] = str(LONG_TTL_S)
        if rng.random() < 0.2:
            fields["target"] = rng.choice(hosts)
        out.append(fields)
    return out


def push(server: RedisServer, commands: list[dict[str, str]], sent: list[Sent]) -> None:
    client = redis.Redis.from_url(server.url)
    for first in range(0, len(commands), 50):
        chunk: list[dict[Any, Any]] = commands[first : first + 50]
        pipe = client.pipeline(transaction=False)
        for fields in chunk:
            pipe.xadd(CMD, fields)
        for fields, eid in zip(chunk, pipe.execute(), strict=True):
            action, _, verb = fields["op"].partition(".")
            sent.append(
                Sent(
                    eid.decode(),
                    action,
                    str(ipaddress.ip_network(fields["ip"])),
                    verb == "insert",
                    int(fields["ttl"]) if "ttl" in fields else None,
                    fields.get("target", ""),
                )
            )
        time.sleep(0.1)
    client.close()


def model(sent: list[Sent], host: str, now_ms: int) -> dict[tuple[str, str], int | None]:
    """The rules ``host`` holds if every command is applied in stream order."""
    newest: dict[tuple[str, str], Sent] = {}
    for cmd in sent:
        newest[(cmd.action, cmd.network)] = cmd
    state: dict[tuple[str, str], int | None] = {}
    for key, cmd in newest.items():
        expires = cmd.expires_ms
        if cmd.insert and cmd.target in ("", host) and (expires is None or expires > now_ms):
            state[key] = expires
    return state


def settled(client: Any, groups: list[str], followers: Sequence[str] = ()) -> bool:
    """Every group and follower has carried out the whole stream (followers by the position
    their heartbeat carries)."""
    info = {g["name"].decode(): g for g in client.xinfo_groups(CMD)}
    if not all(
        name in info and info[name]["pending"] == 0 and info[name]["lag"] == 0 for name in groups
    ):
        return False
    newest = client.xrevrange(CMD, count=1)[0][0].decode()
    raws = client.hmget("{pushfw}:hosts", list(followers)) if followers else []
    beats = {name: json.loads(raw) for name, raw in zip(followers, raws, strict=True) if raw}
    return all(
        name in beats and beats[name]["position"] == newest and beats[name]["pending"] == 0
        for name in followers
    )


def fault_the_replica(replica: RedisServer, rng: random.Random) -> str:
    """Freeze the replica for a moment, or kill it and start it again (it syncs anew)."""
    assert replica.proc is not None
    if rng.random() < 0.7:
        replica.proc.send_signal(signal.SIGSTOP)
        time.sleep(rng.uniform(0.2, 1.5))
        replica.proc.send_signal(signal.SIGCONT)
        return "frozen"
    replica.stop(hard=True)
    time.sleep(rng.uniform(0.1, 1.0))
    replica.start()
    return "killed"


def test_i1_i3_kill9_under_a_mixed_load_matches_the_model_on_every_backend(
    make_netns: Callable[[], Netns],
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    replica_server: RedisServer,
    r: Any,
):
    for tool in ("nft", "ipset"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    rng = random.Random(SEED)
    backends = ("iptables", "nftables", "ipset", "nftables")
    namespaces = [make_netns() for _ in backends]
    workers = [
        spawn_worker(ns, backend=b, batch_size="50").start()
        for ns, b in zip(namespaces[:3], backends, strict=False)
    ]
    workers.append(
        spawn_worker(
            namespaces[3], backend="nftables", batch_size="50", read_url=replica_server.unix_url
        ).start()
    )
    hosts = [ns.name for ns in namespaces]
    kinds = ["iptables", "nftables", "ipset", "follower"]
    groups_of = ["ledger", *(f"host:{h}" for h in hosts[:3])]
    sent: list[Sent] = []
    sender = threading.Thread(
        target=push, args=(redis_server, make_commands(rng, hosts), sent), daemon=True
    )
    sender.start()
    kills, crashes, killed = 0, [], Counter[str]()
    replica_faults = Counter[str]()
    while sender.is_alive() or kills < 10:
        time.sleep(rng.uniform(0.05, KILL_GAP_S))
        if rng.random() < 0.06:
            replica_faults[fault_the_replica(replica_server, rng)] += 1
            continue
        worker = rng.choice(workers)
        assert worker.proc is not None
        if worker.proc.poll() is not None:  # died by itself: not the kill loop
            crashes.append(worker.proc.returncode)
        worker.kill9()
        kills += 1
        killed[kinds[workers.index(worker)]] += 1
        worker.start(wait=False)
    sender.join()
    wait_for(lambda: r.wait(1, 100) >= 1, 30, "the replica to be in sync again")
    for worker in workers:
        worker.wait_ready(timeout=60)
    wait_for(lambda: settled(r, groups_of, hosts[3:]), 60, "every group and the follower")
    last_short = max(
        (c.expires_ms for c in sent if c.ttl_s in SHORT_TTL_S and c.expires_ms), default=0
    )
    wait_for(lambda: time.time() * 1000 > last_short + 1500, 10, "the short bans to end")

    firewalls = [Firewall(ns, b) for ns, b in zip(namespaces, backends, strict=True)]
    kind_of = {id(fw): kind for fw, kind in zip(firewalls, kinds, strict=True)}
    diffs: dict[str, tuple[set[Any], set[Any]]] = {}

    def matches() -> bool:
        now_ms = int(time.time() * 1000)
        for fw, host in zip(firewalls, hosts, strict=True):
            want = set(model(sent, host, now_ms).items())
            have = set(fw.rules().items())
            diffs[kind_of[id(fw)]] = (want - have, have - want)
        return all(not lost and not extra for lost, extra in diffs.values())

    try:
        wait_for(matches, 20, "every kernel to match the model")
    finally:
        groups = {g["name"].decode(): int(g["pending"]) for g in r.xinfo_groups(CMD)}
        print(f"\nchaos: seed {SEED}, sent {len(sent)}, kills {kills} (gap <= {KILL_GAP_S} s)")
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(replica_faults.items()))
        print(f"chaos: replica {faults or 'never faulted'}")
        host_of = dict(zip(kinds, hosts, strict=True))
        for kind, (lost, extra) in diffs.items():
            host = host_of[kind]
            beat = json.loads(r.hget("{pushfw}:hosts", host) or "{}")
            pending = groups.get(f"host:{host}", beat.get("pending", 0))
            print(
                f"chaos: {kind:8} lost {len(lost)} extra {len(extra)} pending {pending} "
                f"(killed {killed[kind]} times)"
            )
        print(
            f"chaos: ledger pending {groups.get('ledger', 0)}, dead letters "
            f"{r.xlen('{pushfw}:dead')}, crashes {len(crashes)}"
        )
    for worker in workers:
        assert worker.proc is not None and worker.proc.poll() is None
    assert crashes == [], f"workers died by themselves with {crashes}"
    assert r.xlen("{pushfw}:dead") == 0
    assert settled(r, groups_of, hosts[3:]), "entries left pending"
