"""Host registration: each worker says in ``{pushfw}:hosts`` that it is alive and how it is.

Each worker process carries an instance id (random at start) in its heartbeat, so two live
workers with one host name (a cloned VM keeps its name) are told apart instead of silently
splitting the host's commands between them:

- at start, a fresh heartbeat of another instance that is still beating makes the worker
  refuse to start (:func:`live_twin`), unless told to take over; a heartbeat left by this
  machine's previous run, whose process has ended (a crash), does not;
- while running, each heartbeat reads the one it replaces (:func:`beat`): another
  instance's means a twin wrote there since this worker's last beat (:class:`Twins`).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import redis

from pushfw.producer.client import STALE_AFTER_BEATS, is_stale
from pushfw.producer.keys import Keys
from pushfw.producer.records import HostStatus

__all__ = [
    "Instance",
    "Twins",
    "beat",
    "live_twin",
    "pushfw_version",
    "read_host",
    "read_hosts",
    "twin_text",
]

logger = logging.getLogger(__name__)

_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_WATCH_MAX_S = 30.0
"""The longest a starting worker watches another instance's heartbeat for a new beat."""
_WATCH_STEP_S = 0.1


def pushfw_version() -> str:
    try:
        return version("pushfw")
    except PackageNotFoundError:
        return "unknown"


def _boot_id() -> str:
    try:
        with open(_BOOT_ID, encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Instance:
    """This worker process: a random id, and the machine boot and pid it runs as."""

    id: str
    boot_id: str
    pid: int

    @classmethod
    def new(cls) -> Instance:
        return cls(secrets.token_hex(8), _boot_id(), os.getpid())

    def other(self, status: HostStatus) -> bool:
        """``status`` is another process's: a worker this process made earlier (a library
        user's, a test's) is no twin."""
        return status.instance != self.id and not self._here(status, self.pid)

    def predecessor(self, status: HostStatus) -> bool:
        """``status`` is this machine's previous run of the worker, and it has ended."""
        return status.pid > 0 and self._here(status, status.pid) and not _running(status.pid)

    def _here(self, status: HostStatus, pid: int) -> bool:
        return bool(status.boot_id) and status.boot_id == self.boot_id and status.pid == pid


def beat(client: redis.Redis, keys: Keys, status: HostStatus) -> HostStatus | None:
    """HSET this host's heartbeat; returns the one it replaced (None: none, or unreadable).

    https://redis.io/commands/hset/
    """
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.hosts, status.host)
    pipe.hset(keys.hosts, status.host, status.model_dump_json())
    previous, _ = pipe.execute()
    return _parse(previous)


def _parse(raw: Any) -> HostStatus | None:
    if raw is None:
        return None
    try:
        return HostStatus.model_validate_json(raw)
    except ValueError:  # a heartbeat is input like any other: unreadable is none
        return None


def read_host(client: redis.Redis, keys: Keys, host: str) -> HostStatus | None:
    """One host's heartbeat. https://redis.io/commands/hget/"""
    return _parse(client.hget(keys.hosts, host))


def read_hosts(client: redis.Redis, keys: Keys) -> list[HostStatus]:
    raw: Any = client.hgetall(keys.hosts)
    return sorted((HostStatus.model_validate_json(v) for v in raw.values()), key=lambda h: h.host)


def live_twin(
    client: redis.Redis,
    keys: Keys,
    host: str,
    me: Instance,
    now_ms: Callable[[], int],
    sleep: Callable[[float], None] = time.sleep,
) -> HostStatus | None:
    """Another worker of ``host`` that still beats, or None.

    A fresh heartbeat of another instance may be a worker that just died (kill -9, a
    power cut): one of this machine's whose process is gone is not asked about; any other
    is watched for about two of its heartbeat intervals, and only a new beat proves it live.
    """
    found = read_host(client, keys, host)
    if found is None or not me.other(found) or found.state == "stopped":
        return None
    if is_stale(found, now_ms()) or me.predecessor(found):
        return None
    deadline = time.monotonic() + min(found.interval_s * 2 + 1, _WATCH_MAX_S)
    while time.monotonic() < deadline:
        sleep(_WATCH_STEP_S)
        again = read_host(client, keys, host)
        if again is None or again.state == "stopped" or not me.other(again):
            return None
        if (again.instance, again.last_seen_ms) != (found.instance, found.last_seen_ms):
            return again
    return None


def twin_text(twin: HostStatus, me: Instance) -> str:
    """Which other worker ``twin`` is, for a log line or a problem."""
    where = "this machine" if twin.boot_id and twin.boot_id == me.boot_id else "another machine"
    return f"instance {twin.instance or '?'}, pid {twin.pid or '?'} on {where}"


class Twins:
    """Another live instance of this worker's host name, as the heartbeats show it.

    Args:
        host: the host name both instances carry.
        me: this worker's instance.
    """

    def __init__(self, host: str, me: Instance) -> None:
        self.host = host
        self.me = me
        self.twin: HostStatus | None = None
        self._seen_at = 0.0
        self._beats = 0

    def replaced(self, previous: HostStatus | None, interval_s: float) -> None:
        """Our beat replaced ``previous``: another instance's means it beat since ours.

        The first beat's is ignored: the start looked at it (:func:`live_twin`). A twin
        not seen for :data:`STALE_AFTER_BEATS` intervals is gone.
        """
        self._beats += 1
        now = time.monotonic()
        if (
            self._beats > 1
            and previous is not None
            and previous.instance
            and self.me.other(previous)
            and previous.state != "stopped"
        ):
            if self.twin is None or self.twin.instance != previous.instance:
                logger.error(
                    "another worker named %s is live (%s): the two split this host's "
                    "commands between them (a cloned VM?); give one of them another "
                    "host_name and stop it",
                    self.host,
                    twin_text(previous, self.me),
                )
            self.twin, self._seen_at = previous, now
            return
        twin = self.twin
        if twin is not None and now - self._seen_at > STALE_AFTER_BEATS * max(
            twin.interval_s, interval_s
        ):
            logger.info(
                "the other worker named %s (%s) beats no more", self.host, twin_text(twin, self.me)
            )
            self.twin = None

    def problem(self) -> str | None:
        if self.twin is None:
            return None
        return (
            f"duplicate: another worker named {self.host} is live "
            f"({twin_text(self.twin, self.me)}); give one of them another host_name"
        )
