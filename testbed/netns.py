"""Network namespaces the caller creates and always deletes, and commands run inside them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class Netns:
    """A network namespace, by name (:meth:`create` makes it, with loopback up)."""

    name: str

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.run("ip", "link", "set", "lo", "up")

    def delete(self) -> None:
        """Kill whatever still runs inside (only the caller's own processes), then delete it."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def argv(self, *args: str) -> list[str]:
        """``args`` as a command line that runs them inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 30,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside, to completion, output captured as text.

        Raises:
            subprocess.CalledProcessError: it exited non-zero and ``check`` is set.
        """
        return subprocess.run(
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=env,
        )

    def popen(self, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start ``args`` inside, stdout and stderr in one pipe."""
        return subprocess.Popen(
            self.argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
