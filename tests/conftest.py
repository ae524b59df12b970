"""Real parts for every test: a redis-server on a free port and network namespaces.

The Redis server listens on TCP 127.0.0.1 (for the test process) and on a unix socket,
which workers inside network namespaces reach because the file system is shared.
Tests that need root or ``ip netns`` skip with the reason, except under ``CI=true``,
where a missing capability fails the run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from pushfw.producer import Producer
from pushfw.worker import Worker, WorkerSettings
from pushfw.worker.backends.iptables import XTABLES_LOCK
from pushfw.worker.backends.memory import MemoryBackend
from testbed.env import clean_env
from testbed.netns import Netns
from testbed.redis_server import REDIS_SERVER, RedisServer
from testbed.worker import WorkerProcess

__all__ = ["REDIS_SERVER", "Netns", "RedisServer", "WorkerProcess"]  # the testbed's, re-exported


def need(condition: bool, reason: str) -> None:
    """Skip when a capability is missing; under CI=true that is a failure instead."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def state_dir() -> Iterator[Path]:
    """Workers built from the environment remember their ledger generation here, never in
    /var/lib/pushfw of the machine running the tests."""
    with tempfile.TemporaryDirectory(prefix="pushfw-state-") as tmp:
        os.environ["PUSHFW_STATE_DIR"] = tmp
        yield Path(tmp)
        os.environ.pop("PUSHFW_STATE_DIR", None)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    need(os.path.exists(REDIS_SERVER), "redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="pushfw-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        yield server
        server.stop()


@pytest.fixture(scope="session")
def replica_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A replica of the session's Redis, for followers (``read_url``)."""
    with tempfile.TemporaryDirectory(prefix="pushfw-replica-") as tmp:
        server = RedisServer(Path(tmp), replica_of=redis_server.port)
        server.start()
        primary = redis.Redis.from_url(redis_server.url)
        try:
            wait_for(lambda: primary.wait(1, 100) >= 1, 20, "the replica to connect")
        finally:
            primary.close()
        yield server
        server.stop()


def synced(primary: redis.Redis) -> None:
    """Wait until every connected replica holds everything written to ``primary`` so far
    (``WAIT 1`` would return on the session's replica while a test's own one still lags)."""
    replicas = max(1, int(primary.info("replication")["connected_slaves"]))
    acked = primary.wait(replicas, 10_000)
    assert acked >= replicas, f"{acked} of {replicas} replicas acknowledged the writes"


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, with AOF, that the test may restart."""
    need(os.path.exists(REDIS_SERVER), "redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="pushfw-aof-") as tmp:
        server = RedisServer(Path(tmp), appendonly=True)
        server.start()
        yield server
        server.stop()


@pytest.fixture
def volatile_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own without persistence: a restart comes back empty."""
    need(os.path.exists(REDIS_SERVER), "redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="pushfw-volatile-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        yield server
        server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A bytes client on a freshly flushed server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def producer(r: redis.Redis, redis_server: RedisServer) -> Iterator[Producer]:
    prod = Producer.from_url(redis_server.url)
    yield prod
    prod.client.close()


_ns_counter = itertools.count()


def _can_netns() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = f"pfw-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


@pytest.fixture(scope="session")
def netns_capable() -> bool:
    return _can_netns()


@pytest.fixture
def make_netns(netns_capable: bool) -> Iterator[Callable[[], Netns]]:
    """Create network namespaces (loopback up); every one is deleted at teardown."""
    need(netns_capable, "needs root and 'ip netns' (network namespaces)")
    need(shutil.which("iptables-legacy") is not None, "iptables (legacy tools) is not installed")
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(f"pfw-{os.getpid()}-{next(_ns_counter)}")
        made.append(ns)
        ns.create()
        return ns

    yield make
    for ns in made:
        ns.delete()


@pytest.fixture
def netns(make_netns: Callable[[], Netns]) -> Netns:
    return make_netns()


def _kernel_backend(name: str) -> str:
    tool = {"iptables": "iptables-legacy", "nftables": "nft", "ipset": "ipset"}[name]
    need(shutil.which(tool) is not None, f"{tool} is not installed")
    return name


@pytest.fixture(params=["iptables", "nftables", "ipset"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each kernel backend in turn; a test taking it runs once per backend."""
    return _kernel_backend(str(request.param))


@pytest.fixture(params=["nftables", "ipset"])
def set_backend(request: pytest.FixtureRequest) -> str:
    """Each backend whose kernel objects carry timeouts and a size (sets)."""
    return _kernel_backend(str(request.param))


@pytest.fixture
def spawn_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers in namespaces; every one still running is killed at teardown.

    The workers of one test share a state directory of that test's own.
    """
    state_dir = tmp_path_factory.mktemp("state")
    started: list[WorkerProcess] = []

    def spawn(ns: Netns, server: RedisServer | None = None, **settings: str) -> WorkerProcess:
        defaults = {"redis_url": (server or redis_server).unix_url, "backend": "iptables"}
        env = clean_env(
            **{**defaults, "host_name": ns.name, "state_dir": str(state_dir), **settings}
        )
        log_path = state_dir / f"{ns.name}-{len(started)}.log"
        worker = WorkerProcess(ns, env, log_path, watch_url=(server or redis_server).unix_url)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        if worker.proc is not None:
            worker.kill9()


@pytest.fixture
def private_xtables_lock(tmp_path: Path) -> Path:
    """A lock file of this test's own, for :attr:`WorkerProcess.xtables_lock`."""
    Path(XTABLES_LOCK).touch(exist_ok=True)  # the mount point; iptables makes it too
    lock = tmp_path / "xtables.lock"
    lock.touch()
    return lock


_MEMORY_WORKERS: list[Worker] = []


@pytest.fixture(autouse=True)
def _stop_memory_workers() -> Iterator[None]:
    """Stop every in-process worker's scheduler thread when its test ends, passed or failed:
    a thread left running would claim the next test's expiries on the shared Redis."""
    yield
    while _MEMORY_WORKERS:
        worker = _MEMORY_WORKERS.pop()
        worker.request_stop()
        worker.scheduler.close()


def memory_worker(
    server: RedisServer, host: str = "h1", backend: MemoryBackend | None = None, **overrides: Any
) -> Worker:
    """An in-process worker on the memory backend, quick to retry and to notice new entries.

    ``backend``: the "kernel" of an earlier worker, as a restarted process finds it. Its
    scheduler thread is stopped when the test ends (:func:`_stop_memory_workers`)."""
    settings: dict[str, Any] = {
        "block_ms": 50,
        "retry_base_ms": 5,
        "retry_max_ms": 20,
        "state_dir": tempfile.mkdtemp(prefix="state-", dir=server.workdir),
    }
    settings.update(overrides)
    config = WorkerSettings(redis_url=server.url, host_name=host, backend="memory", **settings)
    worker = Worker(config, backend=backend or MemoryBackend(config.fail_networks))
    _MEMORY_WORKERS.append(worker)
    return worker


class Run(Protocol):
    """The ``pushfw`` fixture: the CLI with these arguments, run to completion."""

    def __call__(
        self,
        *args: str,
        url: str | None = ...,
        env: dict[str, str] | None = ...,
        timeout: float = ...,
    ) -> subprocess.CompletedProcess[str]: ...


def run_pushfw(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m pushfw.producer ARGS`` with no PUSHFW_* settings from the outer world."""
    return subprocess.run(
        [sys.executable, "-m", "pushfw.producer", *args],
        capture_output=True,
        text=True,
        env={**clean_env(), **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def pushfw_cli(
    server: RedisServer, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``pushfw`` CLI against ``server`` as an operator would, to completion."""
    return run_pushfw("--redis-url", server.url, *args, cwd=cwd)


@pytest.fixture
def pushfw(r: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> Run:
    """Run the CLI against the session's (flushed) redis-server unless told otherwise."""

    def run(
        *args: str,
        url: str | None = redis_server.url,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["--redis-url", url] if url is not None else []
        return run_pushfw(*prefix, *args, cwd=tmp_path, env=env, timeout=timeout)

    return run


def wait_for(predicate: Callable[[], object], timeout: float = 15, what: str = "condition") -> None:
    """Poll until ``predicate()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


_KERNEL_FIXTURES = frozenset({"netns_capable", "make_netns", "netns", "spawn_worker"})
_SLOW_MODULES = frozenset(
    {
        "test_backend_contract",  # every backend's kernel, each in a mount namespace
        "test_backend_lists",  # the same for lists, with a 120k-entry load
        "test_bench",  # the quick benchmark
        "test_chaos",  # kill -9 under load
        "test_duplicate_hosts",  # pairs of worker processes that wait out each other's beats
        "test_outages",  # a redis-server stopped, frozen and emptied under a worker
        "test_crowdsec",  # a LAPI and the bridge's processes
        "test_fail2ban",  # the real fail2ban-server, 5,000 bans
        "test_follower",  # a replica and follower processes
        "test_ipset_backend",  # the ipset tool in mount namespaces
        "test_package",  # scripts/package builds a .deb; dpkg installs and purges it
        "test_topologies",  # TLS, Sentinel and Cluster servers
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tier the suite: ``root`` for tests that need network namespaces (by the fixtures they
    use), ``slow`` for the modules that start servers, fleets or kernels of their own.
    ``scripts/test --quick`` leaves both out; ``scripts/test`` (and CI) runs everything."""
    for item in items:
        if _KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
        if item.path.stem in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
