"""The worker's own Redis stays protected as its addresses change: DNS, Sentinel, Cluster.

Only the OS resolver is replaced (for the DNS flip); Redis, Sentinel and Cluster are real
servers. They listen on distinct loopback addresses (127.0.0.2, ...) so a test can tell an
address the URL names from one that only the sentinels or the cluster report.
"""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import redis

from pushfw.producer.connection import connect
from pushfw.worker import protect
from pushfw.worker.protect import LOOPBACK, Protection, redis_networks
from tests.conftest import REDIS_SERVER, RedisServer, need, wait_for
from tests.test_topologies import _pings, free_port, serve, stop

NAME = "redis.pushfw.test"


class Resolver:
    """Stands in for getaddrinfo: ``answers[name]`` is what the DNS says right now."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if not self.answers.get(host):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in self.answers[host]
        ]


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_name_is_protected_once_it_resolves_and_stays(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dns = Resolver()
    monkeypatch.setattr(protect, "getaddrinfo", dns)
    first, mapped, later = (ip_network(a) for a in ("198.51.100.7", "198.51.100.8", "198.51.100.9"))

    protection = Protection.build(["203.0.113.0/24"], f"redis://{NAME}:6379/0")
    assert protection.covering(first) is None
    assert protection.covering(ip_network("203.0.113.5")) == ip_network("203.0.113.0/24")
    assert not protection.refresh(), "still nothing to protect"
    assert warnings_about(caplog, NAME) == 1, "a failing name warns once, not per refresh"

    dns.answers[NAME] = ["198.51.100.7", "::ffff:198.51.100.8"]
    assert protection.refresh()
    assert protection.covering(first) == first
    assert protection.covering(mapped) == mapped, "an IPv4-mapped answer protects the IPv4"
    assert protection.covering(ip_network("198.51.100.0/24")) == first, "a wider drop too"
    assert protection.redis_addresses == (first, mapped)
    assert not protection.refresh(), "the same answer again adds nothing"

    dns.answers[NAME] = ["198.51.100.9"]
    assert protection.refresh()
    dns.answers[NAME] = []
    assert not protection.refresh()
    assert {first, mapped, later} <= {protection.covering(n) for n in (first, mapped, later)}
    assert protection.covering(ip_network("::1")) == LOOPBACK[1]
    assert warnings_about(caplog, NAME) == 2, "it warns again after it had resolved"


def test_the_peer_of_a_plain_client_is_protected(r: redis.Redis, redis_server: RedisServer) -> None:
    protection = Protection(LOOPBACK)
    r.ping()
    assert not protection.refresh(r), "127.0.0.1 was already protected as loopback"
    assert protection.redis_addresses == (ip_network("127.0.0.1"),)
    unix = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    unix.ping()
    assert not Protection(LOOPBACK).refresh(unix)
    unix.close()


@pytest.fixture
def sentinel_url(tmp_path: Path) -> Iterator[str]:
    """A master on 127.0.0.2, its replica on 127.0.0.3, one sentinel on 127.0.0.1."""
    need(Path(REDIS_SERVER).exists(), "redis-server is not installed")
    master, replica, port = free_port(), free_port(), free_port()
    procs = [serve("--port", str(master), "--bind", "127.0.0.2", "--save", "")]
    procs.append(
        serve("--port", str(replica), "--bind", "127.0.0.3", "--save", "",
              "--replicaof", "127.0.0.2", str(master), "--replica-announce-ip", "127.0.0.3")
    )  # fmt: skip
    try:
        direct = redis.Redis("127.0.0.2", master, decode_responses=True)
        wait_for(lambda: _replica_count(direct) == 1, what="the replica to sync")
        direct.close()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor pushfw-main 127.0.0.2 {master} 1\n"
        )
        procs.append(
            subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        )
        sentinel = redis.Redis("127.0.0.1", port, decode_responses=True)
        wait_for(lambda: _pings(f"redis://127.0.0.1:{port}"), what="the sentinel")
        wait_for(lambda: sentinel.sentinel_slaves("pushfw-main"), what="the sentinel's replicas")
        sentinel.close()
        yield f"redis+sentinel://127.0.0.1:{port}/pushfw-main/0"
    finally:
        stop(procs)


def _replica_count(client: redis.Redis) -> int:
    try:
        return int(client.info("replication").get("connected_slaves", 0))
    except redis.ConnectionError:
        return 0


def test_sentinel_master_and_replicas_are_protected(sentinel_url: str) -> None:
    sentinel, master, replica = (ip_network(f"127.0.0.{i}") for i in (1, 2, 3))
    assert redis_networks(sentinel_url) == [sentinel], "the URL names only the sentinel"

    protection = Protection.build([], sentinel_url)
    assert set(protection.redis_addresses) == {sentinel, master, replica}
    client = connect(sentinel_url, decode_responses=True)
    client.ping()
    assert not protection.refresh(client), "the socket's peer is the master already known"
    client.close()


def test_unreachable_sentinels_are_tolerated(caplog: pytest.LogCaptureFixture) -> None:
    protection = Protection.build([], f"redis+sentinel://127.0.0.1:{free_port()}/pushfw-main")
    assert protection.redis_addresses == (ip_network("127.0.0.1"),)
    assert not protection.refresh()
    assert warnings_about(caplog, "sentinels") == 1


@pytest.fixture
def spread_cluster(tmp_path: Path) -> Iterator[str]:
    """Three masters on 127.0.0.21-23; the URL names only the first.

    tests/test_topologies.py's ``cluster`` puts every node on 127.0.0.1, where an address
    the client learns cannot be told from the one the URL names.
    """
    need(Path(REDIS_SERVER).exists(), "redis-server is not installed")
    nodes = [(f"127.0.0.{21 + i}", free_port(also_plus=10000)) for i in range(3)]
    procs = [
        serve("--port", str(port), "--bind", ip, "--cluster-announce-ip", ip, "--save", "",
              "--appendonly", "no", "--cluster-enabled", "yes", "--dir", str(tmp_path),
              "--cluster-config-file", str(tmp_path / f"nodes-{port}.conf"))
        for ip, port in nodes
    ]  # fmt: skip
    try:
        for ip, port in nodes:
            wait_for(partial(_pings, f"redis://{ip}:{port}/0"), what=f"node {ip}:{port}")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{ip}:{port}" for ip, port in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        first = redis.Redis(*nodes[0], decode_responses=True)
        wait_for(lambda: first.cluster("info")["cluster_state"] == "ok", what="cluster_state:ok")
        first.close()
        yield f"redis+cluster://{nodes[0][0]}:{nodes[0][1]}/"
    finally:
        stop(procs)


def test_cluster_nodes_are_protected(spread_cluster: str) -> None:
    protection = Protection.build([], spread_cluster)
    assert protection.redis_addresses == (ip_network("127.0.0.21"),)
    client = connect(spread_cluster, decode_responses=True)
    assert client.ping()
    assert not protection.refresh(client), "all of 127.0.0.0/8 was protected already"
    expected = {ip_network(f"127.0.0.{i}") for i in (21, 22, 23)}
    assert set(protection.redis_addresses) == expected
    client.close()
