"""``pushfw-worker`` as a plain subprocess (memory backend: no root, no namespace).

Its stderr is read by a thread into a list of lines, so a test can wait for a line while
the worker runs and read everything it wrote after it stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from testbed.env import clean_env
from tests.conftest import wait_for


def worker_env(config: Path, **settings: str) -> dict[str, str]:
    """The test process's environment without PUSHFW_*, plus ``settings`` as PUSHFW_* names.

    ``config`` is always named explicitly, so a /etc/pushfw/worker.toml on the machine running
    the tests is never read.
    """
    return clean_env(
        **{"config": str(config), "state_dir": str(config.parent / "state"), **settings}
    )


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``pushfw-worker ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "pushfw.worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class Daemon:
    """A running ``pushfw-worker [-v] run``."""

    env: dict[str, str]
    verbose: bool = False
    journal: bool = False
    """Its output is a pipe named in ``JOURNAL_STREAM``, as systemd names the journal's."""
    args: tuple[str, ...] = ()
    """More arguments of ``run`` (``--take-over``)."""
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    _reader: threading.Thread | None = None

    def start(self) -> Daemon:
        args = [
            sys.executable,
            "-m",
            "pushfw.worker",
            *(["-v"] if self.verbose else []),
            "run",
            *self.args,
        ]
        if not self.journal:
            self.proc = subprocess.Popen(
                args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        else:
            reading, writing = os.pipe()
            named = os.fstat(writing)
            env = {**self.env, "JOURNAL_STREAM": f"{named.st_dev}:{named.st_ino}"}
            self.proc = subprocess.Popen(
                args, env=env, stdout=writing, stderr=subprocess.STDOUT, text=True
            )
            os.close(writing)
            self.proc.stdout = open(reading, encoding="utf-8")  # noqa: SIM115 (closed by stop)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            self.stop()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def kill9(self) -> None:
        """SIGKILL, as a crash or a power cut ends it: no last heartbeat."""
        assert self.proc is not None
        self.proc.kill()
        self.stop()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float = 20) -> None:
        wait_for(lambda: any(text in line for line in self.lines), timeout, f"log line {text!r}")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return code
