"""The worker's periodic duties, between batches: heartbeat, hit counters, trimming, reconcile.

Each runs when due, supervised as its role (:mod:`pushfw.worker.supervisor`): the heartbeat
also protects Redis's current address and checks the kernel still holds pushfw's objects; a
kernel found changed behind pushfw's back is reconciled at once, not at the next interval.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis

from pushfw.producer.contract import Action
from pushfw.worker.applier import Applier
from pushfw.worker.clock import SyncedClock
from pushfw.worker.converge import Converger
from pushfw.worker.expiry import ExpiryQueue
from pushfw.worker.heartbeat import Heart
from pushfw.worker.hits import HitsReader
from pushfw.worker.ledger import Ledger
from pushfw.worker.lists import ListKeeper
from pushfw.worker.notify import Notifier
from pushfw.worker.protect import Protection
from pushfw.worker.reconcile import Drift
from pushfw.worker.retention import take_turn, trim
from pushfw.worker.scheduler import Scheduler
from pushfw.worker.supervisor import Supervisor

__all__ = ["Housekeeping"]

logger = logging.getLogger(__name__)


class Housekeeping:
    """What the worker does when due rather than per batch.

    Args:
        client: the primary.
        applier: removes drops that came to cover Redis; says when the kernel drifted.
        ledger: recovers its stale pending entries; trimmed in turn.
        clock: Redis's clock, estimated locally.
        expiry: the next timed rule (hit counters are read between expiries).
        lists: rechecked against Redis's addresses.
        protection: the networks never dropped, Redis's addresses among them.
        converger: the reconcile role.
        heart: the heartbeat.
        scheduler: the expiry scheduler, revived at each heartbeat.
        hits: the hit counters.
        supervisor: runs each duty as its role.
        notifier: systemd's status line.
    """

    def __init__(
        self,
        *,
        client: redis.Redis,
        applier: Applier,
        ledger: Ledger,
        clock: SyncedClock,
        expiry: ExpiryQueue,
        lists: ListKeeper,
        protection: Protection,
        converger: Converger,
        heart: Heart,
        scheduler: Scheduler,
        hits: HitsReader,
        supervisor: Supervisor,
        notifier: Notifier,
    ) -> None:
        self.client = client
        self.settings = heart.settings
        self.applier = applier
        self.ledger = ledger
        self.clock = clock
        self.expiry = expiry
        self.lists = lists
        self.protection = protection
        self.converger = converger
        self.heart = heart
        self.scheduler = scheduler
        self.hits = hits
        self.supervisor = supervisor
        self.notifier = notifier
        self._due: dict[str, float] = {}

    def started(self) -> None:
        """Converged at start: the next heartbeat and reconcile are an interval away."""
        now = time.monotonic()
        self._due["reconcile"] = now + self.settings.reconcile_interval_s
        self._due["heartbeat"] = now + self.settings.heartbeat_interval_s

    def run_due(self) -> None:
        """Each duty that is due, supervised as its role."""
        run, settings = self.supervisor.run, self.settings
        if self._every("heartbeat", settings.heartbeat_interval_s):
            run("ledger", lambda: self.ledger.recover(settings.claim_idle_ms))
            run("heartbeat", self._check_and_beat)
            if self._every("hits", self.hits.interval_s):
                run("hits", self._publish_hits)
        if self.applier.drifted:
            run("reconcile", self._repair)
        soon = self.heart.soon()
        if soon is not None:
            self._due["heartbeat"] = min(self._due.get("heartbeat", soon), soon)
        if self._every("trim", settings.trim_interval_s):
            run("trimming", self.trim)
        interval = settings.reconcile_interval_s
        if interval and self._every("reconcile", interval):
            run("reconcile", self.reconcile)

    def _every(self, name: str, interval_s: float) -> bool:
        now = time.monotonic()
        if now < self._due.get(name, 0.0):
            return False
        self._due[name] = now + interval_s
        return True

    def register(self) -> None:
        """Refuse to start beside a live twin (:class:`~pushfw.worker.heartbeat.Registration`)."""
        self.heart.registration.check()

    def last_heartbeat(self) -> None:
        """Say "stopped" so ``pushfw status`` tells a stopped host from a lost one (not when
        it refused to start: the heartbeat is the live twin's)."""
        if self.heart.registration.refused:
            return
        with contextlib.suppress(redis.RedisError):
            self.heartbeat("stopped")

    def beat_anyway(self) -> None:
        """A failed start still tells ``pushfw status`` why this host is not ready."""
        with contextlib.suppress(Exception):
            self.heartbeat("starting")

    def heartbeat(self, state: str = "running") -> None:
        lag, pending = self.heart.beat(state)
        if self.notifier.is_ready:
            self.notifier.status(f"{self.heart.following()}; lag {lag}, pending {pending}")

    def reconcile(self, force: bool = False) -> Drift | None:
        """Protect Redis's current addresses, then converge (:class:`Converger`)."""
        self.protection.refresh(self.client)
        return self.converger.reconcile(force)

    def _repair(self) -> None:
        self.reconcile()
        self.applier.drifted = False  # only once done: a pass cut short tries again

    def _check_and_beat(self) -> None:
        """Protect Redis, check the kernel still holds our objects, revive the scheduler, beat."""
        self.protect(self.client)
        with self.applier.kernel():
            intact = self.heart.backend.intact()
        if not intact:
            logger.warning(
                "the kernel lost pushfw's rules or hooks behind its back (a hand flush?): "
                "reconciling"
            )
            self.applier.drifted = True
        self.scheduler.revive()
        self.heartbeat()

    def protect(self, client: redis.Redis | None) -> None:
        """Protect every address Redis is reached at now; lift at once a drop covering one.

        This needs no Redis: a drop of the address Redis moved to may be what cuts us off.
        """
        if not self.protection.refresh(client):
            return
        covering = [
            key
            for key in self.heart.backend.committed()
            if key.action is Action.DROP and self.protection.covering(key.network) is not None
        ]
        logger.warning(
            "Redis is reached at a new address (%s): protected; lifting %d drops covering it",
            ", ".join(str(n) for n in self.protection.redis_addresses),
            len(covering),
        )
        if covering:
            error = self.applier.remove(covering)
            if error is not None:
                logger.error("could not lift the drops covering Redis: %s", error)
        self.lists.recheck()

    def trim(self) -> None:
        """Trim, forget and retire, if it is this worker's turn (one worker per interval)."""
        settings = self.settings
        if take_turn(
            self.client, self.heart.stream.keys, settings.consumer_name, settings.trim_interval_s
        ):
            trim(
                self.ledger,
                self.clock.now_ms(),
                settings.host_expiry_s,
                settings.retire_after_s,
            )

    def _publish_hits(self) -> None:
        """Per-rule hit counters to ``{pushfw}:hits:<host>``, between expiries (:mod:`.hits`)."""
        now_ms = self.clock.now_ms()
        if self.hits.clear(self.expiry.ms_until_next(now_ms)):
            self.hits.publish(now_ms)
        else:
            self._due["hits"] = time.monotonic()  # a timed rule is due: at the next heartbeat
