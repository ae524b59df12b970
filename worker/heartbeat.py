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
from typing import TYPE_CHECKING, Any

import redis

from pushfw.producer.client import STALE_AFTER_BEATS, is_stale
from pushfw.producer.keys import Keys
from pushfw.producer.records import HeldList, HostStatus
from pushfw.producer.render import plural
from pushfw.worker.config import mask_url
from pushfw.worker.errors import HostNameTaken
from pushfw.worker.follower import FollowerStream
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.supervisor import Supervisor, clock_text

if TYPE_CHECKING:  # the roles import metrics, which imports this module's pushfw_version
    from pushfw.worker.answers import Answerer
    from pushfw.worker.backends.base import Backend
    from pushfw.worker.clock import SyncedClock
    from pushfw.worker.converge import Converger
    from pushfw.worker.ledger import Ledger
    from pushfw.worker.lists import ListKeeper
    from pushfw.worker.metrics import Metrics
    from pushfw.worker.stream import HostStream

__all__ = [
    "Heart",
    "Instance",
    "Registration",
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
_CHANGED_BEAT_GAP_S = 0.25
"""The least time between two heartbeats brought forward by changed rules."""


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


class Registration:
    """This worker under its host name: refuse to start beside a live twin, or take over.

    Args:
        client: the primary.
        settings: the host name and key prefix.
        now_ms: Redis's clock (the heartbeats carry it, not this host's).
        take_over: start anyway; both then say so while both run.
    """

    def __init__(
        self,
        client: redis.Redis,
        settings: WorkerSettings,
        now_ms: Callable[[], int],
        take_over: bool = False,
    ) -> None:
        self.client = client
        self.keys = Keys(settings.key_prefix)
        self.host = settings.host_name
        self.now_ms = now_ms
        self.take_over = take_over
        self.instance = Instance.new()
        self.twins = Twins(self.host, self.instance)
        self.refused = False
        """It refused to start: the heartbeat under its name is the live twin's."""
        self._checked = False

    def check(self) -> None:
        """Refuse to start beside a live worker of the same host name (once, at start)."""
        if self._checked:
            return
        twin = live_twin(self.client, self.keys, self.host, self.instance, self.now_ms)
        self._checked = True
        if twin is None:
            return
        if self.take_over:
            logger.warning(
                "taking over host name %s from a live worker (%s)",
                self.host,
                twin_text(twin, self.instance),
            )
            return
        self.refused = True
        raise HostNameTaken(
            f"host name {self.host} is taken: another worker beats under it "
            f"({twin_text(twin, self.instance)}); give this host another host_name (a cloned "
            "VM keeps its name), or start with --take-over"
        )


class Heart:
    """Assembles this host's heartbeat from the roles and writes it (see :func:`beat`).

    Args:
        settings: host name, labels, interval, the replica's address.
        backend: the rules it holds.
        ledger: entries stamped ahead of Redis's clock.
        answers: what this host answered.
        lists: the lists it holds and their problems.
        supervisor: each role's state.
        converger: a lost ledger, a failed reconcile.
        registration: this instance, and a live twin.
        metrics: the gauges the heartbeat refreshes.
    """

    def __init__(
        self,
        *,
        client: redis.Redis,
        settings: WorkerSettings,
        backend: Backend,
        stream: HostStream,
        clock: SyncedClock,
        ledger: Ledger,
        answers: Answerer,
        lists: ListKeeper,
        supervisor: Supervisor,
        converger: Converger,
        registration: Registration,
        metrics: Metrics,
    ) -> None:
        self.client = client
        self.settings = settings
        self.backend = backend
        self.stream = stream
        self.clock = clock
        self.ledger = ledger
        self.answers = answers
        self.lists = lists
        self.supervisor = supervisor
        self.converger = converger
        self.registration = registration
        self.metrics = metrics
        self.started_ms = int(time.time() * 1000)
        self._last: tuple[float, int, dict[str, HeldList]] = (float("-inf"), 0, {})
        """When the last heartbeat was written, and the rules and lists it said."""

    def beat(self, state: str = "running") -> tuple[int | None, int]:
        """Write the heartbeat; returns the lag and pending it said."""
        rules, held = len(self.backend.committed()), self.lists.status()
        self._last = (time.monotonic(), rules, held)
        lag, pending = self.stream.progress()
        reads = self.reads()
        settings, registration = self.settings, self.registration
        me, twin = registration.instance, registration.twins.twin
        previous = beat(
            self.client,
            self.stream.keys,
            HostStatus(
                host=settings.host_name,
                labels=sorted(settings.labels),
                version=pushfw_version(),
                backend=self.backend.name,
                last_seen_ms=self.clock.now_ms(),
                started_ms=self.started_ms,
                rules=rules,
                lag=lag,
                pending=pending,
                interval_s=settings.heartbeat_interval_s,
                state=state,
                ledger_lost=self.converger.ledger_lost,
                problems=self.problems(),
                ids_ahead=self.ledger.clock.stamped,
                roles=self.supervisor.states(),
                done_id=self.answers.done_id,
                position=self.stream.position,
                reads=reads,
                counts=dict(self.answers.counts),
                lists=held,
                instance=me.id,
                boot_id=me.boot_id,
                pid=me.pid,
                duplicate=twin.instance if twin is not None else "",
            ),
        )
        registration.twins.replaced(previous, settings.heartbeat_interval_s)
        self._refresh_metrics(lag, pending, reads)
        # after replaced(): a twin found by this beat counts at once
        self.metrics.health(self.converger.ledger_lost, len(self.problems()), held)
        return lag, pending

    def _refresh_metrics(self, lag: int | None, pending: int, reads: str) -> None:
        for role, health in self.supervisor.roles.items():
            self.metrics.role_failing.labels(role).set(health.failing_since_ms is not None)
        rules = self.backend.committed().counts() if self.metrics.serving else {}
        self.metrics.heartbeat(lag, pending, self.backend.name, rules, reads)

    def problems(self) -> list[str]:
        found = self.supervisor.problems()
        twin = self.registration.twins.problem()
        if twin is not None:
            found.append(twin)
        if self.converger.error is not None:
            found.append(f"reconcile: {self.converger.error}")
        found += self.lists.problems.values()
        stream = self.stream
        if isinstance(stream, FollowerStream) and stream.replica_down is not None:
            found.append(
                f"replica {mask_url(self.settings.read_url)}: {stream.replica_down}; reading "
                f"on the primary since {clock_text(stream.replica_down_ms)}"
            )
        return found

    def reads(self) -> str:
        stream = self.stream
        if not isinstance(stream, FollowerStream):
            return "group"
        return "replica" if stream.replica_down is None else "primary"

    def following(self) -> str:
        """What this worker does, for systemd's status line and the log."""
        read_url = self.settings.read_url
        via = f" via {mask_url(read_url)}" if read_url else ""
        return (
            f"following {self.stream.keys.cmd} as {self.stream.group}{via}: "
            f"{plural(len(self.backend.committed()), 'rule')} ({self.backend.name})"
        )

    def soon(self) -> float | None:
        """When to beat if the rules changed since the last heartbeat (None: unchanged).

        ``pushfw status`` then agrees with ``pushfw list`` a moment after a batch, at most
        a few heartbeats a second however busy the stream is.
        """
        at, rules, held = self._last
        if len(self.backend.committed()) == rules and self.lists.status() == held:
            return None
        return max(time.monotonic(), at + _CHANGED_BEAT_GAP_S)
