"""A redis-server process of the caller's own: a free TCP port and a unix socket."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server in ``workdir``, without snapshots; AOF (fsync always) if asked; a
    replica of another one if told (``replica_of``).

    With ``netns`` it runs inside that namespace, reached over the unix socket by the caller
    and over ``bind``'s addresses by the namespaces joined to it.
    """

    workdir: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None
    bind: str = "127.0.0.1"
    replica_of: int | None = None
    """A port on 127.0.0.1 whose Redis this one replicates (``--replicaof``)."""
    started: bool = False
    """It answered once: a restart keeps its port, which the caller's URLs name."""

    @property
    def socket_path(self) -> Path:
        return self.workdir / "redis.sock"

    @property
    def url(self) -> str:
        """For the caller: TCP on loopback, or the unix socket if Redis runs in a netns."""
        return self.unix_url if self.netns else f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout_s: float = 10) -> None:
        """Start it and wait until it answers PING. A first start whose port another test
        process took meanwhile (``free_port`` cannot reserve it) moves to a new port.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout_s``.
        """
        for _ in range(3):
            if self._launch(timeout_s):
                self.started = True
                return
            if self.started:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def _launch(self, timeout_s: float) -> bool:
        """Run redis-server; True once it answers, False if it exits first.

        Raises:
            RuntimeError: it neither answered nor exited within ``timeout_s``.
        """
        args = [
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", *self.bind.split()),
            *("--unixsocket", str(self.socket_path), "--unixsocketperm", "777"),
            *("--dir", str(self.workdir), "--save", ""),
            *("--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"),
        ]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if self.netns:
            # reached over veth pairs inside namespaces that only the caller made
            args = ["ip", "netns", "exec", self.netns, *args, "--protected-mode", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.socket_path))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return True
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if self.proc.poll() is not None:
                        return False
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start"
                        ) from None
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (SIGKILL if ``hard``, or if it outlives 10 s) and wait for it."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
