"""How the worker's parts are built from its settings: connections, the gate's policy, waits.

:class:`pushfw.worker.daemon.Worker` is the one composition root; these are the pieces it
builds from settings alone, kept here so that the root reads as a list of what it owns.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pushfw.producer.connection import connect as redis_connect
from pushfw.producer.keys import Keys
from pushfw.producer.ops import Action
from pushfw.worker.backends.base import Backend
from pushfw.worker.config import mask_url
from pushfw.worker.decide import ListBounds, Policy
from pushfw.worker.follower import FollowerStream
from pushfw.worker.metrics import Metrics
from pushfw.worker.notify import Notifier
from pushfw.worker.protect import Protection, redis_networks
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.signing import Signing
from pushfw.worker.stream import CommandStream, HostStream

__all__ = [
    "Links",
    "LockWaits",
    "connect",
    "fit_watchdog",
    "host_stream",
    "make_policy",
    "make_protection",
]

logger = logging.getLogger(__name__)

_REPLY_MARGIN_S = 2.0
"""How long past a blocking read's own timeout Redis may take to answer before it counts as
gone: a frozen Redis holds the loop (and the kernel expiry in it) no longer than this."""
_PROBE_TIMEOUT_S = 1.0
"""How long a follower waits for its replica to answer whether it is back."""
_LOCK_WAIT_WARN_S = 1.0
"""A wait for the xtables lock at least this long is logged (at most once a minute)."""


def connect(
    settings: WorkerSettings, url: str | None = None, timeout_s: float | None = None
) -> redis.Redis:
    """A client of ``redis_url`` whose socket timeouts outlast the blocking read.

    With another ``url`` (the replica), redis-py does not retry: the follower reads on the
    primary instead at once. ``timeout_s`` replaces the timeouts (the replica's probe)."""
    options: dict[str, Any] = {} if url is None else {"retry": Retry(NoBackoff(), 0)}
    url = url or settings.redis_url
    if not url.startswith("unix:"):
        options["socket_keepalive"] = True
    return redis_connect(
        url,
        decode_responses=False,
        socket_timeout=timeout_s or settings.block_ms / 1000 + _REPLY_MARGIN_S,
        socket_connect_timeout=timeout_s or _REPLY_MARGIN_S,
        health_check_interval=30,
        **options,
    )


def host_stream(
    settings: WorkerSettings, client: redis.Redis, replica: redis.Redis | None, keys: Keys
) -> HostStream:
    """The host's group on the primary, or a follower's position on the replica."""
    if replica is None:
        return CommandStream(
            client, keys, Keys.host_group(settings.host_name), settings.consumer_name
        )
    return FollowerStream(
        client,
        replica,
        keys,
        settings.host_name,
        settings.state_dir,
        probe=connect(settings, settings.read_url, _PROBE_TIMEOUT_S),
        name=mask_url(settings.read_url),
    )


def fit_watchdog(settings: WorkerSettings, notifier: Notifier) -> WorkerSettings:
    """Bound the blocking read so the loop pings the watchdog in time."""
    limit_ms = int(notifier.max_wait_s * 1000) if notifier.watchdog_s else None
    if limit_ms is None or settings.block_ms <= limit_ms:
        return settings
    logger.info(
        "block_ms lowered from %d to %d for the systemd watchdog", settings.block_ms, limit_ms
    )
    return settings.model_copy(update={"block_ms": max(10, limit_ms)})


def make_protection(settings: WorkerSettings) -> Protection:
    """The configured networks, loopback, and every address Redis (and its replica) is at."""
    replica_networks = redis_networks(settings.read_url) if settings.read_url else []
    return Protection.build(
        [*settings.protected, *(str(n) for n in replica_networks)], settings.redis_url
    )


def make_policy(
    settings: WorkerSettings, protection: Protection, backend: Backend | None = None
) -> Policy:
    """The gate's view of this host, from its settings (and what its backend can hold)."""
    return Policy(
        host=settings.host_name,
        labels=settings.labels,
        protection=protection,
        signing=Signing.from_settings(settings),
        min_drop_prefix_v4=settings.min_drop_prefix_v4,
        min_drop_prefix_v6=settings.min_drop_prefix_v6,
        min_accept_prefix_v4=settings.min_accept_prefix_v4,
        min_accept_prefix_v6=settings.min_accept_prefix_v6,
        list_bounds=ListBounds.from_settings(settings),
        max_lists=settings.max_lists,
        actions=backend.actions if backend is not None else frozenset(Action),
        backend=backend.name if backend is not None else "",
    )


class Links:
    """The worker's own connections to Redis: the primary, and the replica it may read from.

    Args:
        client: the primary (the ledger, results, heartbeat; the stream unless a replica).
        replica: where a follower reads the stream, or None.
    """

    def __init__(self, client: redis.Redis, replica: redis.Redis | None) -> None:
        self.client = client
        self.replica = replica

    def drop(self) -> None:
        """Forget every open connection (their state is unknown); the next call reconnects."""
        self.client.connection_pool.disconnect()
        if self.replica is not None:
            self.replica.connection_pool.disconnect()

    def close(self) -> None:
        self.client.close()
        if self.replica is not None:
            self.replica.close()


class LockWaits:
    """Each wait for the xtables lock, measured; a long one logged (at most once a minute)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._warned_at = float("-inf")

    def waited(self, seconds: float) -> None:
        self.metrics.lock_wait.observe(seconds)
        now = time.monotonic()
        if seconds >= _LOCK_WAIT_WARN_S and now - self._warned_at >= 60:
            self._warned_at = now
            logger.warning(
                "waited %.1f s for the xtables lock another process holds (an iptables run?)",
                seconds,
            )
