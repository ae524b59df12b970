"""One worker, three Redis topologies started by the test: TLS, Sentinel, a 3-master Cluster."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from pushfw.producer import Producer
from pushfw.producer.connection import connect, parse_target
from pushfw.producer.lists import ListContent
from pushfw.worker import Worker, WorkerSettings
from pushfw.worker.backends.memory import MemoryBackend
from tests.conftest import REDIS_SERVER, need, wait_for


def free_port(also_plus: int = 0) -> int:
    """A free port (and, for cluster nodes, its bus port ``+also_plus`` free as well)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + also_plus > 65535:
            continue
        if also_plus:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + also_plus))
                except OSError:
                    continue
        return port


def serve(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [REDIS_SERVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=10)


def run_worker(url: str, host: str = "h1") -> tuple[Worker, threading.Thread]:
    settings = WorkerSettings(redis_url=url, host_name=host, backend="memory", block_ms=100)
    worker = Worker(settings, backend=MemoryBackend())
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def exercise(url: str) -> None:
    """Push through ``url`` like a producer, let a worker apply, expire and report."""
    producer = Producer.from_url(url)
    worker, thread = run_worker(url)
    try:
        wait_for(
            lambda: any(h.state == "running" for h in producer.hosts()),
            what="the worker to follow the stream",
        )
        drop = producer.drop("192.0.2.1", reason="topology")
        timed = producer.drop("192.0.2.2", ttl_s=1)
        assert [r.status.value for r in producer.wait(drop)] == ["applied"]
        assert [r.status.value for r in producer.wait(timed)] == ["applied"]
        wait_for(  # the ledger folds after the applier answers: it follows, it does not lead
            lambda: {r.network for r in producer.rules()} >= {"192.0.2.1/32"},
            what="the ledger to fold the drop",
        )

        def expired_by_scheduler() -> bool:
            rows: Any = producer.client.xrange(producer.keys.cmd)
            return any(f.get("origin") == "ttl" for _, f in rows)

        wait_for(expired_by_scheduler, timeout=10, what="the scheduler's ttl delete")
        wait_for(lambda: len(worker.backend.committed()) == 1, what="the local expiry")
        out = subprocess.run(
            [sys.executable, "-m", "pushfw.producer", "--redis-url", url, "list", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "192.0.2.1/32" in out.stdout and "192.0.2.2" not in out.stdout

        # list content read raw by a producer's decoding client, on every topology
        feed = producer.load_list("feed", ListContent.of(["198.51.100.0/24"]))
        assert [r.status.value for r in producer.wait(feed)] == ["applied"]
        why_cmd = ["why", "198.51.100.7", "--json"]
        why = subprocess.run(
            [sys.executable, "-m", "pushfw.producer", "--redis-url", url, *why_cmd],
            capture_output=True,
            text=True,
            check=True,
        )
        covers = [(c["kind"], c["network"]) for c in json.loads(why.stdout)["covers"]]
        assert covers == [("list", "198.51.100.0/24")], why.stderr
    finally:
        worker.request_stop()
        thread.join(timeout=15)
        producer.client.close()


@pytest.fixture
def redis_binary() -> None:
    need(Path(REDIS_SERVER).exists(), "redis-server is not installed")


def test_url_forms_are_parsed() -> None:
    sentinel = parse_target("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/mymaster/2")
    assert sentinel.topology == "sentinel"
    assert sentinel.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (sentinel.service, sentinel.db, sentinel.password) == ("mymaster", 2, "pw")
    cluster = parse_target("rediss+cluster://u:p@[::1]:7000,h2:7001/")
    assert cluster.topology == "cluster" and cluster.tls
    assert cluster.hosts == (("::1", 7000), ("h2", 7001))
    with pytest.raises(ValueError, match="service name"):
        parse_target("redis+sentinel://h:26379")
    with pytest.raises(ValueError, match="scheme"):
        parse_target("http://h")


def test_tls(redis_binary: None, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    port = free_port()
    proc = serve(
        "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--tls-cert-file", str(tmp_path / "cert.pem"),
        "--tls-key-file", str(tmp_path / "key.pem"),
        "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
        wait_for(lambda: _pings(url), what="the TLS server")
        exercise(url)
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_timeout=2).ping()  # plain text is refused
    finally:
        stop([proc])


def _pings(url: str) -> bool:
    try:
        client = connect(url, decode_responses=True, socket_timeout=2)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


def test_sentinel(redis_binary: None, tmp_path: Path) -> None:
    master, sentinel = free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor pushfw-main 127.0.0.1 {master} 1\n"
    )
    procs = [serve("--port", str(master), "--bind", "127.0.0.1", "--save", "")]
    procs.append(
        subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    )
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel}/pushfw-main/0"
        wait_for(lambda: _pings(url), timeout=20, what="sentinel to know its master")
        exercise(url)
        direct = redis.Redis(port=master)
        assert direct.hget("{pushfw}:rules", "drop 192.0.2.1/32"), "the master sentinel named"
        direct.close()
    finally:
        stop(procs)


@pytest.fixture
def cluster(redis_binary: None, tmp_path: Path) -> Iterator[str]:
    ports = [free_port(also_plus=10000) for _ in range(3)]
    procs = [
        serve(
            "--port",
            str(p),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(tmp_path / f"nodes-{p}.conf"),
            "--dir",
            str(tmp_path),
        )
        for p in ports
    ]
    try:
        for p in ports:
            wait_for(partial(_pings, f"redis://127.0.0.1:{p}/0"), what=f"node {p}")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

        def healthy() -> bool:
            info = redis.Redis(port=ports[0]).cluster("info")
            return b"cluster_state:ok" in info if isinstance(info, bytes) else "ok" in str(info)

        wait_for(healthy, timeout=30, what="cluster_state:ok")
        yield f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/"
    finally:
        stop(procs)


def test_cluster_of_three_masters(cluster: str) -> None:
    exercise(cluster)
    client = connect(cluster, decode_responses=True)
    assert client.hget("{pushfw}:rules", "drop 192.0.2.1/32")
    client.close()
