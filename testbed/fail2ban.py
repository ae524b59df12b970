"""A real ``fail2ban-server`` of the caller's own: its configuration, socket and log in one
directory, nothing of the host's fail2ban touched; inside a namespace if asked."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.netns import Netns

FAIL2BAN_CONF = """\
[Definition]
loglevel = {loglevel}
logtarget = {tmp}/fail2ban.log
syslogsocket = auto
socket = {tmp}/f2b.sock
pidfile = {tmp}/f2b.pid
dbfile = :memory:
dbpurgeage = 1d
allowipv6 = auto
"""


class Fail2banExited(RuntimeError):
    """The server ended, or its jails did not start; the message carries its log's end."""


@dataclass
class Fail2banServer:
    """``fail2ban-server -f`` with the configuration in ``tmp/conf``.

    ``tmp`` must be a short path: the control socket's name must fit in ``sun_path`` (108
    bytes). The caller writes ``conf/`` (jails, filters, actions) before :meth:`start`;
    :func:`write_fail2ban_conf` writes the server's own part.
    """

    tmp: Path
    netns: Netns | None = None
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    """The server's exit code once :meth:`stop` ended it."""

    @property
    def conf(self) -> Path:
        return self.tmp / "conf"

    def start(self, jails: Sequence[str], timeout: float = 120) -> None:
        """Start the server and wait until every jail in ``jails`` answers ``status``."""
        argv = [
            *("fail2ban-server", "-f", "-x", "-c", str(self.conf)),
            *("-s", str(self.tmp / "f2b.sock"), "-p", str(self.tmp / "f2b.pid")),
        ]
        with (self.tmp / "server.out").open("wb") as out:
            self.proc = subprocess.Popen(
                self.netns.argv(*argv) if self.netns else argv,
                cwd=self.tmp,  # where a command injected through the shell would create a file
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.wait(
            lambda: all(self.client("status", jail).returncode == 0 for jail in jails),
            "the jails to start",
            timeout,
        )

    def client(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``fail2ban-client`` against this server, to completion.

        Raises:
            subprocess.CalledProcessError: it failed and ``check`` is set.
        """
        return subprocess.run(
            ["fail2ban-client", "-c", str(self.conf), "-s", str(self.tmp / "f2b.sock"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    @property
    def log(self) -> str:
        path = self.tmp / "fail2ban.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, done: Callable[[], object], what: str, timeout: float = 120) -> None:
        """Poll ``done()`` until it is truthy.

        Raises:
            Fail2banExited: the server exited first, or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc is None or self.proc.poll() is not None:
                raise Fail2banExited(f"fail2ban-server exited; its log:\n{self.log[-6000:]}")
            if time.monotonic() > deadline:
                raise Fail2banExited(f"fail2ban: waiting for {what}; its log:\n{self.log[-6000:]}")
            time.sleep(0.1)

    def running_commands(self) -> int:
        """How many action commands the server runs now (its child processes).

        fail2ban 1.0 skips the unban of a shell action whose ban command has not returned
        yet (the action counts as holding no ban until then), so a test that unbans at
        once waits for this to be 0 first.
        """
        if self.proc is None:
            return 0
        count = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rpartition(")")[2].split()
                count += int(fields[1]) == self.proc.pid  # state, then the parent's pid
        return count

    def stop(self, timeout: float = 60) -> None:
        """``fail2ban-client stop``, then wait for the server to exit (kill it after that)."""
        if self.proc is None:
            return
        with contextlib.suppress(subprocess.SubprocessError):
            self.client("stop", timeout=timeout)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait(timeout=10)
        self.proc = None


def write_fail2ban_conf(tmp: Path, loglevel: str = "INFO") -> None:
    """The server's own settings (log, socket, pid file, an in-memory database) under ``tmp``."""
    conf = tmp / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "fail2ban.conf").write_text(FAIL2BAN_CONF.format(tmp=tmp, loglevel=loglevel))
