"""The throwaway world a benchmark run lives in: a network namespace, a redis-server, workers.

The namespace and the server are the tests' own (:mod:`testbed`).

Everything here is created by the run and removed by it, also on errors and on SIGTERM:
the namespace is deleted (after killing what the run started in it), the redis-server is
stopped and its directory removed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

import testbed.netns
from pushfw.producer.connection import redis_ms, text
from pushfw.producer.keys import Keys
from testbed.env import clean_env
from testbed.redis_server import REDIS_SERVER, RedisServer
from testbed.worker import WorkerExited, WorkerProcess

CHAIN = "PUSHFW"
BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
"""RFC 2544's benchmarking range: every address the run pushes comes from here."""
MAX_ADDRESSES = BENCH_NET.num_addresses - 2
WIDE_NET = ipaddress.IPv4Network("100.64.0.0/10")
"""Shared address space (RFC 6598), for the one job too large for the benchmarking range."""
ROOT = Path(__file__).resolve().parent.parent


def address(i: int) -> str:
    """The ``i``-th host address of the benchmarking range."""
    if not 0 <= i < MAX_ADDRESSES:
        raise ValueError(f"address index {i} is outside 0..{MAX_ADDRESSES - 1}")
    return str(BENCH_NET.network_address + 1 + i)


def wide_address(i: int) -> str:
    """The ``i``-th host address of the shared address space (up to about 4 million)."""
    if not 0 <= i < WIDE_NET.num_addresses - 2:
        raise ValueError(f"address index {i} is outside {WIDE_NET}")
    return str(WIDE_NET.network_address + 1 + i)


def backend_missing(backend: str) -> str | None:
    """Why this machine cannot run the backend's worker, or None if it can."""
    tools = {"nftables": ("nft",), "ipset": ("ipset",)}.get(backend, ())
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if backend == "nftables":
        try:
            import nftables  # noqa: F401
        except (ImportError, OSError) as exc:
            return f"the nftables Python binding does not load ({exc})"
    return None


class BenchError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""


class Progress:
    """Progress lines on stderr, stamped with the time since the run started."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[bench {self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def clock_offset_ms(client: redis.Redis) -> float:
    """Redis's clock minus this process's wall clock, from the midpoint of a TIME call."""
    before = time.time()
    server = redis_ms(client)
    after = time.time()
    return server - (before + after) / 2 * 1000


class Netns(testbed.netns.Netns):
    """The run's namespace; a command that fails is a :class:`BenchError` saying what failed."""

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = super().run(*args, check=False, timeout=timeout, stdin=stdin, env=env)
        if check and proc.returncode != 0:
            raise BenchError(
                f"{' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr.strip()[:500]}"
            )
        return proc


class WorkerProc(WorkerProcess):
    """A worker of the run (:class:`testbed.worker.WorkerProcess`) for one backend; a worker
    that dies or does not start is a :class:`BenchError` with the end of its log."""

    def __init__(
        self, env: BenchEnv, backend: str, settings: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(
            env.ns,
            env.worker_env(backend, settings),
            env.tmp / f"worker-{backend}-{time.monotonic_ns()}.log",
            watch_url=env.server.unix_url,
        )
        self.bench = env
        self.backend = backend

    def start(self, *extra: str, wait: bool = True, timeout: float = 60) -> WorkerProc:
        self.bench.workers.append(self)
        try:
            super().start(*extra, wait=wait, timeout=timeout)
        except WorkerExited as exc:
            raise BenchError(str(exc)) from None
        return self

    def alive(self) -> bool:
        """True while it runs; a worker that died is an error, with its log."""
        if super().alive():
            return True
        code = self.proc.returncode if self.proc else None
        raise BenchError(f"the {self.backend} worker exited ({code}):\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        code = super().stop(sig, timeout) if self.proc is not None else 0
        with contextlib.suppress(ValueError):
            self.bench.workers.remove(self)
        return code

    def warnings(self) -> dict[str, int]:
        """WARNING and ERROR lines of its (JSON) log so far, counted by message: the text
        before its first " (", digits as N (e.g. "could not remove N expired rules")."""
        counts: dict[str, int] = {}
        for line in self.log.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("level") not in ("WARNING", "ERROR"):
                continue
            message = str(record.get("message", ""))
            key = re.sub(r"\d+", "N", message.split(" (", 1)[0])[:80]
            counts[key] = counts.get(key, 0) + 1
        return counts


class BenchEnv:
    """The namespace, the redis-server, a client on it, and the workers started so far."""

    def __init__(self, tmp: Path, ns: Netns, server: RedisServer, progress: Progress) -> None:
        self.tmp = tmp
        self.ns = ns
        self.server = server
        self.progress = progress
        self.keys = Keys()
        self.host = ns.name
        self.group = Keys.host_group(self.host)
        self.client = redis.Redis(unix_socket_path=str(server.socket_path), socket_timeout=60)
        self.workers: list[WorkerProc] = []
        self.python = sys.executable

    def worker_env(self, backend: str, settings: Mapping[str, str] | None = None) -> dict[str, str]:
        env = clean_env(
            redis_url=self.server.unix_url, host_name=self.host, backend=backend, chain=CHAIN
        )
        return {**env, **(settings or {})}

    def helper_env(self) -> dict[str, str]:
        """For ``python -m bench.<module>`` inside the namespace: the repo on the path."""
        path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}

    @contextlib.contextmanager
    def worker(
        self, backend: str, settings: Mapping[str, str] | None = None
    ) -> Iterator[WorkerProc]:
        """A fresh worker on a clean slate: empty Redis, no pushfw objects in the kernel;
        stopped afterwards. ``settings`` are extra PUSHFW_* variables."""
        self.reset()
        proc = WorkerProc(self, backend, settings).start()
        try:
            yield proc
        finally:
            proc.stop()

    def reset(self) -> None:
        """Empty Redis and remove every backend's objects (no worker may be running)."""
        from bench.kernel import clear_all  # bench.kernel builds on this module

        assert not self.workers, "reset with a worker running"
        self.client.flushall()
        clear_all(self.ns)

    def group_state(self, group: str = "") -> dict[str, Any] | None:
        """A group's row of XINFO GROUPS, by default the host's (None if it does not exist)."""
        rows: Any = self.client.xinfo_groups(self.keys.cmd)
        for row in rows:
            name = row["name"]
            if text(name) == (group or self.group):
                return dict(row)
        return None

    def close(self) -> None:
        for proc in list(self.workers):
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)
        self.client.close()


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def bench_env(progress: Progress) -> Iterator[BenchEnv]:
    """Create the namespace and the redis-server; always remove both."""
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables", "iptables-restore", "iptables-legacy", "iptables-legacy-save"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if not os.path.exists(REDIS_SERVER):
        raise BenchError("redis-server is not installed")
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    ns = Netns(f"pfwbench-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="pushfw-bench-") as tmp:
        server = RedisServer(Path(tmp))
        env: BenchEnv | None = None
        try:
            ns.create()
            try:
                server.start()
            except RuntimeError as exc:
                raise BenchError(str(exc)) from None
            progress(f"namespace {ns.name}, redis-server on 127.0.0.1:{server.port} + unix socket")
            env = BenchEnv(Path(tmp), ns, server, progress)
            yield env
        finally:
            if env is not None:
                env.close()
            server.stop()
            ns.delete()
            signal.signal(signal.SIGTERM, previous)
            progress(f"removed namespace {ns.name} and stopped redis-server")
