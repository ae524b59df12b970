"""The Scheduler role: turn due expiries in the ledger into ``*.delete`` commands, once.

It runs in its own thread with its own Redis connection and never touches the kernel (each
host's applier removes its timed rules itself, on the same clock). It wakes on Redis
key-expiry events of the per-rule marker keys and, because those events are fire-and-forget
and fire late under lazy expiry, on a short timer to the next due score as well: the timer
alone meets the 1 s bound. A due rule is claimed in Lua (:data:`pushfw.worker.ledger_lua.CLAIM`):
only if its expiry is still the current one does the script write the tombstone, drop it
from the queue and XADD the delete, so two schedulers never emit one expiry twice and an
extended ban is not cut short.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from pushfw.producer.connection import redis_ms, text, untyped
from pushfw.producer.keys import Keys
from pushfw.producer.render import plural
from pushfw.worker.ledger_lua import claim_script
from pushfw.worker.metrics import Metrics
from pushfw.worker.supervisor import RoleHealth

logger = logging.getLogger(__name__)


def enable_expiry_events(client: redis.Redis) -> bool:
    """Make sure Redis publishes key-expiry events (``notify-keyspace-events`` E and x)."""
    try:
        current = str(client.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))
        flags = set(current)
        if "E" in flags and ("x" in flags or "A" in flags):
            return True
        client.config_set("notify-keyspace-events", "".join(sorted(flags | {"E", "x"})))
        logger.info(
            "enabled Redis key-expiry events (notify-keyspace-events %s)",
            "".join(sorted(flags | {"E", "x"})),
        )
        return True
    except redis.ResponseError as exc:
        logger.info(
            "cannot enable key-expiry events (%s); the scheduler runs on its timer alone", exc
        )
        return False


class Scheduler:
    """Claims due expiries; safe to run on every host at once.

    Args:
        client: a connection of the scheduler's own (it blocks on pub/sub).
        keys: key names under the configured prefix.
        poll_s: the longest the scheduler sleeps without looking at the queue.
        metrics: where expiries emitted are counted (the worker's).
        health: the scheduler role's health, which the worker's heartbeat reports.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        poll_s: float = 0.25,
        metrics: Metrics | None = None,
        health: RoleHealth | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics or Metrics()
        self.keys = keys
        self.poll_s = poll_s
        self.stop = threading.Event()
        self.emitted = 0
        self.events = True  # False once Redis refused the key-event channel (an ACL)
        self.health = health or RoleHealth("scheduler")
        self._claim = claim_script(client)
        self._thread: threading.Thread | None = None

    def due(self, limit: int = 500) -> tuple[list[str], float | None]:
        """Rule ids due now, and seconds until the next one after them (None if none)."""
        now_ms = redis_ms(self.client)
        rows: Any = self.client.zrangebyscore(
            self.keys.expiry, "-inf", "+inf", start=0, num=limit + 1, withscores=True
        )
        ids = [text(m) for m, s in rows if s <= now_ms]
        later = [s for _, s in rows if s > now_ms]
        return ids[:limit], (later[0] - now_ms) / 1000 if later else None

    def claim_due(self) -> float | None:
        """Claim everything due; returns seconds until the next expiry (None if none)."""
        while True:
            ids, next_s = self.due()
            if not ids:
                return next_s
            markers = [self.keys.ttl_marker(rid) for rid in ids]
            emitted: list[Any] = self._claim(
                keys=[self.keys.rules, self.keys.expiry, self.keys.cmd, self.keys.tombs, *markers],
                args=ids,
            )
            self.emitted += len(emitted)
            self.metrics.scheduler_expiries.inc(len(emitted))
            if emitted:
                logger.info("scheduler expired %s", plural(len(emitted), "rule"))

    def run(self) -> None:
        """Loop until :attr:`stop` is set; Redis outages and unexpected errors are waited out.

        A failure is retried at least every second whatever the backoff: expiries are due.
        """
        pubsub = None
        while not self.stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._subscribe()
                next_s = self.claim_due()
                self.health.succeeded()
                timeout = self.poll_s if next_s is None else max(0.0, min(next_s, self.poll_s))
                if pubsub is not None and timeout > 0:
                    pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                else:
                    self.stop.wait(timeout)
            except redis.exceptions.NoPermissionError as exc:
                logger.warning("key-expiry events refused (%s); the timer alone wakes us", exc)
                self.events, pubsub = False, None
            except Exception as exc:  # an outage, error replies (OOM, LOADING, ...), a bug
                pubsub = None
                self.stop.wait(min(self.health.failed(exc), 1.0))

    def problem(self) -> str | None:
        """What keeps the scheduler from emitting expiries, for the heartbeat (None: nothing)."""
        return self.health.problem()

    def revive(self) -> bool:
        """Start the thread again if it ended although no one stopped it; True if it had."""
        if self._thread is None or self._thread.is_alive() or self.stop.is_set():
            return False
        self.health.failed(RuntimeError("its thread had ended: started again"))
        self._thread = None
        self.start()
        return True

    def _subscribe(self) -> Any:
        if not self.events:
            return None
        pool = getattr(self.client, "connection_pool", None)  # a cluster client has none: db 0
        db = pool.connection_kwargs.get("db", 0) if pool is not None else 0
        pubsub = untyped(self.client).pubsub()
        pubsub.psubscribe(f"__keyevent@{db}__:expired")
        return pubsub

    def start(self) -> None:
        if self._thread is not None:
            return  # already running (the worker re-runs its setup after Redis lost its data)
        self._thread = threading.Thread(target=self.run, name="pushfw-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()
