"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract
namespace) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC``. Outside systemd both are unset
and every method here does nothing.

The watchdog is pinged from the worker's loop only, so it stops when the loop is stuck, and
keeps going while Redis is away: the loop still removes expired rules from the kernel then.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "notify"]

logger = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    return value if value.startswith("/") else None  # (vsock: addresses are not supported)


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``KEY=value`` lines) to ``$NOTIFY_SOCKET``; False if there is none."""
    env = os.environ if environ is None else environ
    address = _address(env.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        logger.debug("sd_notify to %s failed: %s", env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _watchdog_s(env: Mapping[str, str]) -> float | None:
    """The watchdog interval systemd asks of this process, if any."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000


class Notifier:
    """Readiness, status and watchdog messages of one worker process.

    Args:
        environ: where ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` are read (default: os.environ).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.watchdog_s = _watchdog_s(self.environ)
        self.is_ready = False
        self._next_ping = 0.0

    def send(self, message: str) -> bool:
        return notify(message, self.environ)

    def ready(self, status: str) -> None:
        """The worker follows the stream (sent once, after the first reconcile)."""
        if not self.is_ready:
            self.is_ready = True
            self.send("READY=1\nSTATUS=" + " ".join(status.split()))
            self._next_ping = 0.0

    def status(self, text: str) -> None:
        """One line for ``systemctl status``."""
        self.send("STATUS=" + " ".join(text.split()))

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    @property
    def max_wait_s(self) -> float:
        """The longest the loop may block between two :meth:`alive` calls."""
        return self.watchdog_s / 4 if self.watchdog_s else float("inf")

    def alive(self, before_long_call: bool = False) -> None:
        """The loop is running: ping the watchdog, at most once per half interval.

        Before readiness the same ping also extends the start timeout by one interval, so
        a worker that waits for Redis at boot is not killed as a failed start.
        ``before_long_call``: ping now, whenever the last ping was, so a kernel call that
        takes up to a whole interval (a million-entry list) starts with all of it.
        """
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now < self._next_ping and not before_long_call:
            return
        self._next_ping = now + self.watchdog_s / 2
        message = "WATCHDOG=1"
        if not self.is_ready:
            message += f"\nEXTEND_TIMEOUT_USEC={int(self.watchdog_s * 1_000_000)}"
        self.send(message)
