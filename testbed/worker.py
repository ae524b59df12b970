"""``pushfw-worker run`` as a process inside a namespace, its output in a log file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from pushfw.worker.backends.iptables import XTABLES_LOCK
from testbed.netns import Netns


class WorkerExited(RuntimeError):
    """The worker ended, or never got ready; the message carries the end of its log."""


@dataclass
class WorkerProcess:
    """A worker for the host ``env["PUSHFW_HOST_NAME"]``, started (again) by :meth:`start`.

    Its output goes to ``log_path``, appended across restarts: a file never fills up and
    stalls the worker as an unread pipe would. ``watch_url`` is where the caller reads the
    heartbeats (the worker may reach Redis by another address).
    """

    ns: Netns
    env: dict[str, str]
    log_path: Path
    watch_url: str = ""
    xtables_lock: Path | None = None
    """A file bind-mounted over /run/xtables.lock in the worker's own mount namespace, so a
    caller holds the worker's lock without holding the one of the machine it runs on."""
    program: tuple[str, ...] = ()
    """The ``pushfw-worker`` to run (an installed one); by default this checkout's, run by
    the test's own interpreter."""
    proc: subprocess.Popen[bytes] | None = None
    started_ms: int = 0
    _run_offset: int = 0

    @property
    def host(self) -> str:
        return self.env["PUSHFW_HOST_NAME"]

    def start(self, *extra: str, wait: bool = True, timeout: float = 20) -> WorkerProcess:
        """Start ``pushfw-worker run``; by default wait until it follows the stream."""
        self.started_ms = int(time.time() * 1000)
        program = self.program or (sys.executable, "-m", "pushfw.worker")
        argv = [*program, "run", *extra]
        if self.xtables_lock is not None:
            argv = [
                *("unshare", "--mount", "--propagation", "private", "--"),
                *("sh", "-c", f'mount --bind "$0" {XTABLES_LOCK} && exec "$@"'),
                str(self.xtables_lock),
                *argv,
            ]
        with self.log_path.open("ab") as log:
            self._run_offset = log.tell()
            self.proc = subprocess.Popen(
                self.ns.argv(*argv), env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20) -> WorkerProcess:
        """Wait for this process's first heartbeat: it has reconciled and follows the stream.

        Raises:
            WorkerExited: it exited first, or was not ready within ``timeout`` seconds.
        """
        hosts_key = f"{self.env.get('PUSHFW_KEY_PREFIX', '{pushfw}')}:hosts"
        client = redis.Redis.from_url(self.watch_url or self.env["PUSHFW_REDIS_URL"])
        deadline = time.monotonic() + timeout
        try:
            while not self._ready(client, hosts_key):
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise WorkerExited(
                        f"worker {self.host} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise WorkerExited(
                        f"worker {self.host} not ready after {timeout} s:\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()
        return self

    def _ready(self, client: redis.Redis, hosts_key: str) -> bool:
        # The worker takes started_ms after this process took its own (same clock), so a
        # heartbeat left by the previous run of this host never passes for this one.
        raw: Any = client.hget(hosts_key, self.host)
        beat: dict[str, Any] = json.loads(raw) if raw is not None else {}
        return bool(beat.get("started_ms", 0) >= self.started_ms and beat["state"] == "running")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` (SIGKILL if it outlives ``timeout``) and return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self.proc = None
        return code

    def pause(self) -> None:
        """SIGSTOP: the worker does nothing until :meth:`resume`, so a test sees the kernel
        exactly as it left it (no repair races the test's look)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def log(self) -> str:
        """Everything every run of this worker printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def last_run_log(self) -> str:
        """What the latest run printed (since the latest :meth:`start`)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._run_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.splitlines()[-lines:]) or "(no log)"

    def rss_kb(self, field: str = "VmRSS") -> int:
        """VmRSS (or another ``/proc/<pid>/status`` field in kB, e.g. VmHWM, the peak) of the
        worker (``ip netns exec`` execs it, so the pid is the worker's)."""
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise WorkerExited(f"no {field} in /proc/{self.proc.pid}/status")
