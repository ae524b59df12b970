"""The worker process: wire Redis, backend and applier together and keep them running.

Shutdown has two stages: the first SIGTERM/SIGINT stops reading, lets the batch in hand
finish (apply, results, XACK) and exits 0; a second one aborts at once. Anything aborted is
still pending in the host's group and is re-read on the next start (at-least-once).
Redis outages are waited out with backoff; one log line when Redis goes away, one when it
is back. Under systemd (``Type=notify``) the worker reports READY=1 after its first
reconcile, a STATUS= line at every state change and heartbeat, and pings the watchdog from
its loop: also while Redis is away, since the loop still expires rules in the kernel then.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from types import FrameType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pushfw.producer.connection import connect as redis_connect
from pushfw.producer.contract import Action
from pushfw.producer.keys import Keys
from pushfw.producer.records import HeldList, HostStatus
from pushfw.producer.render import plural
from pushfw.worker.alarm import ExpiryAlarm, ExpiryDue
from pushfw.worker.applier import Applier, StopRequested
from pushfw.worker.backends import Backend, make_backend
from pushfw.worker.backoff import Backoff
from pushfw.worker.config import mask_url
from pushfw.worker.decide import ListBounds, Policy
from pushfw.worker.errors import BackendError, ConfigError, HostNameTaken, TransientBackendError
from pushfw.worker.follower import FollowerStream, StreamGone
from pushfw.worker.generation import GenerationFile, trusts_ledger
from pushfw.worker.heap import LARGE, give_back_memory
from pushfw.worker.heartbeat import Instance, Twins, beat, live_twin, pushfw_version, twin_text
from pushfw.worker.hits import HitsReader
from pushfw.worker.hits import interval_s as hits_interval_s
from pushfw.worker.ledger import Ledger
from pushfw.worker.notify import Notifier
from pushfw.worker.protect import Protection, redis_networks
from pushfw.worker.reconcile import Drift, desired_rules, reconcile
from pushfw.worker.retention import take_turn, trim
from pushfw.worker.scheduler import Scheduler, enable_expiry_events
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.signing import Signing
from pushfw.worker.supervisor import Supervisor, clock_text

logger = logging.getLogger(__name__)


_REPLY_MARGIN_S = 2.0
"""How long past a blocking read's own timeout Redis may take to answer before it counts as
gone: a frozen Redis holds the loop (and the kernel expiry in it) no longer than this."""
_RECONNECT_MAX_S = 1.0
"""Reconnect attempts are at most this far apart: a backlog waits at most this long."""
_CHANGED_BEAT_GAP_S = 0.25
"""The least time between two heartbeats brought forward by changed rules."""
_FOLLOWER_FOLD_GAP_S = 0.5
"""A follower whose last fold found the ledger caught up asks again after this long."""
_PROBE_TIMEOUT_S = 1.0
"""How long a follower waits for its replica to answer whether it is back."""
_LOCK_WAIT_WARN_S = 1.0
"""A wait for the xtables lock at least this long is logged (at most once a minute)."""


class ForceStop(Exception):
    """A second stop signal: abandon the batch in hand."""


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


class Worker:
    """One host's daemon: applier, ledger, scheduler and housekeeping, with graceful stop."""

    def __init__(
        self, settings: WorkerSettings, backend: Backend | None = None, take_over: bool = False
    ) -> None:
        self.notifier = Notifier()
        self.instance = Instance.new()
        self.twins = Twins(settings.host_name, self.instance)
        self._take_over = take_over
        self._name_checked = False
        self._refused = False
        settings = _fit_watchdog(settings, self.notifier)
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.client = connect(settings)
        self.backend = backend or make_backend(
            settings.backend,
            chain=settings.chain,
            hooks=settings.hook_chains,
            memory_fail=settings.fail_networks,
            set_size=settings.set_size,
        )
        self.replica = connect(settings, settings.read_url) if settings.read_url else None
        replica_networks = redis_networks(settings.read_url) if settings.read_url else []
        self.protection = Protection.build(
            [*settings.protected, *(str(n) for n in replica_networks)], settings.redis_url
        )
        self.policy = Policy(
            host=settings.host_name,
            labels=settings.labels,
            protection=self.protection,
            signing=Signing.from_settings(settings),
            min_drop_prefix_v4=settings.min_drop_prefix_v4,
            min_drop_prefix_v6=settings.min_drop_prefix_v6,
            min_accept_prefix_v4=settings.min_accept_prefix_v4,
            min_accept_prefix_v6=settings.min_accept_prefix_v6,
            list_bounds=ListBounds.from_settings(settings),
            max_lists=settings.max_lists,
        )
        self.ledger = Ledger(
            self.client,
            self.keys,
            settings.consumer_name,
            settings.batch_size,
            signing=self.policy.signing,
        )
        self.generation = GenerationFile(settings.state_dir, settings.host_name)
        self.ledger_lost = False
        self.reconcile_error: str | None = None
        self.alarm = ExpiryAlarm()
        self._cut_warned = False
        self._refold = False
        follower = (
            FollowerStream(
                self.client,
                self.replica,
                self.keys,
                settings.host_name,
                settings.state_dir,
                probe=connect(settings, settings.read_url, _PROBE_TIMEOUT_S),
                name=mask_url(settings.read_url),
            )
            if self.replica is not None
            else None
        )
        self.applier = Applier(
            self.client, self.backend, settings, self.policy, self.ledger, follower
        )
        self._fold_at, self._fold_owed = 0.0, False
        if self.replica is not None:
            self.applier.wake_in_ms = self._fold_wait_ms
        self.applier.lists.alive = lambda: self.notifier.alive(before_long_call=True)
        self.applier.lists_changed = lambda: self.supervisor.run("heartbeat", self.heartbeat)
        self.applier.kernel = self.alarm.kernel
        self.backend.clock = self.applier.now_ms
        self.metrics = self.applier.metrics
        self.supervisor = Supervisor(
            _handled_by_the_loop, lambda role: self.metrics.role_failures.labels(role).inc()
        )
        self.backend.lock_waited = self._lock_waited
        self._lock_warned_at = float("-inf")
        self._beat_at, self._beat_rules = float("-inf"), 0
        self._beat_lists: dict[str, HeldList] = {}
        self.scheduler = Scheduler(
            connect(settings),
            self.keys,
            settings.scheduler_poll_s,
            self.metrics,
            self.supervisor["scheduler"],
        )
        self.hits = HitsReader(
            self.client,
            self.keys,
            settings.host_name,
            self.backend,
            hits_interval_s(settings.heartbeat_interval_s),
            self.metrics,
            self.alarm.kernel,
            settings.hits_max_rules,
        )
        self.started_ms = int(time.time() * 1000)
        self.last_drift: Drift | None = None
        self._due: dict[str, float] = {}
        self._signals = 0
        self._back = False
        """Redis answered again since the outage began (said once)."""

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.alarm.install()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning(
                "second %s: stopping now", signal.Signals(signum).name, extra={"state": "aborting"}
            )
            raise ForceStop
        logger.info(
            "%s: finishing the batch in hand, then stopping",
            signal.Signals(signum).name,
            extra={"state": "stopping"},
        )
        self.request_stop()
        if self.applier.blocking:
            raise StopRequested

    def request_stop(self) -> None:
        self.applier.stopping = True

    def setup(self) -> None:
        """Groups, backend, then converge on the ledger before following the stream.

        A host new to the stream starts its group at the stream's head once the ledger holds
        everything up to there: it gets the current state from the ledger (reconcile), not
        by replaying history.
        """
        self._check_name()
        known = self.applier.stream.group_exists()  # a follower drops a lost position here
        self.heartbeat("starting")  # announce first: no trim runs past a group being created
        self.ledger.ensure_group()
        if isinstance(self.applier.stream, FollowerStream):
            self.applier.stream.check_replica()
        self.ledger.recover(self.settings.claim_idle_ms)
        start_id = "0"
        if not known:
            start_id = self.applier.stream.head()
            self.ledger.catch_up(start_id)
        self.applier.setup(start_id)
        if self.replica is not None:
            self.heartbeat("starting")  # the position it starts at: no trim runs past it
        if self.settings.expiry_events:
            enable_expiry_events(self.client)
        self.reconcile()
        self.heartbeat()
        now = time.monotonic()
        self._due["reconcile"] = now + self.settings.reconcile_interval_s
        self._due["heartbeat"] = now + self.settings.heartbeat_interval_s

    def _check_name(self) -> None:
        """Refuse to start beside a live worker of the same host name (once, at start).

        With ``take_over`` it starts anyway, and both say so while both run.
        """
        if self._name_checked:
            return
        twin = live_twin(  # Redis's clock: the heartbeats carry it, not this host's
            self.client,
            self.keys,
            self.settings.host_name,
            self.instance,
            self.applier.stream.now_ms,
        )
        self._name_checked = True
        if twin is None:
            return
        if self._take_over:
            logger.warning(
                "taking over host name %s from a live worker (%s)",
                self.settings.host_name,
                twin_text(twin, self.instance),
            )
            return
        self._refused = True
        raise HostNameTaken(
            f"host name {self.settings.host_name} is taken: another worker beats under it "
            f"({twin_text(twin, self.instance)}); give this host another host_name (a cloned "
            "VM keeps its name), or start with --take-over"
        )

    def reconcile(self, force: bool = False) -> Drift | None:
        """Make the managed rules equal what the ledger holds for this host, through the gate.

        Rules the ledger does not speak of are removed only when this is the ledger the host
        converged with before (:mod:`pushfw.worker.generation`), or with ``force``: a new or
        missing ledger beside a kernel holding rules means Redis lost its data.
        """
        self.protection.refresh(self.client)
        with self.alarm.kernel():
            self.backend.open()  # re-read the kernel: drift is measured against what it holds
        position = self.applier.stream.last_delivered()
        self.ledger.catch_up(position)
        now_ms = self.applier.now_ms()
        verified = self.ledger.held() if self.policy.signing.required else None
        desired = desired_rules(self.ledger.records(), self.policy, now_ms, verified)
        marker = self.ledger.generation()
        trusted = force or trusts_ledger(
            marker, self.generation.read(), self.ledger.size(), self.backend.size()
        )
        if not trusted and not self.ledger_lost:
            logger.error(
                "the ledger is not the one this host converged with (did Redis lose its data?): "
                "keeping the %d applied rules it does not hold; "
                "'pushfw-worker reconcile --force' adopts it and removes them",
                self.backend.size(),
            )
        self.ledger_lost = not trusted
        try:
            with self.alarm.kernel():
                self.last_drift = reconcile(self.backend, desired, remove_extras=trusted)
            self.metrics.reconciled(self.last_drift)
            if trusted and marker is not None:
                self.generation.write(marker)
        except BackendError as exc:
            logger.error("reconcile failed, kept the current rules: %s", exc)
            self.reconcile_error = f"failed, kept the current rules: {exc}"
            self.backend.discard()
            return None
        finally:
            self.applier.rebuild_expiry()
            if len(desired.present) + len(desired.absent) >= LARGE or self.backend.size() >= LARGE:
                give_back_memory()  # the ledger's records and the kernel's rules, built whole
        refused = self.last_drift.refused
        self.reconcile_error = (
            f"the kernel refused {len(refused)} of the ledger's rules (first: {refused[0][0]}: "
            f"{refused[0][1]})"
            if refused
            else None
        )
        self.applier.lists.reconcile(now_ms, remove_extras=trusted)
        return self.last_drift

    def _protect(self, client: redis.Redis | None) -> None:
        """Protect every address Redis is reached at now; lift at once a drop covering one.

        This needs no Redis: a drop of the address Redis moved to may be what cuts us off.
        """
        if not self.protection.refresh(client):
            return
        covering = [
            key
            for key, _ in self.backend.committed()
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
        self.applier.lists.recheck()

    def _every(self, name: str, interval_s: float) -> bool:
        now = time.monotonic()
        if now < self._due.get(name, 0.0):
            return False
        self._due[name] = now + interval_s
        return True

    def iteration(self) -> int:
        """One pass of every role: fold, expire, apply, then housekeeping when due.

        Each role runs supervised (:mod:`pushfw.worker.supervisor`): one that fails is
        retried with backoff while the others go on. The ledger folds again after a batch
        arrived while the applier was waiting, so it is not a batch behind this host when
        the worker stops; only then, for a fold per batch keeps it level with the applier, so
        both read the same entries and each entry is parsed once.
        """
        run = self.supervisor.run
        caught_up = run("ledger", self._fold, self._fold_again) == 0
        run("expiry", self.applier.expire_due)
        processed = run("applier", self.applier.iteration, self.applier.reset_reads) or 0
        self._fold_owed = self._fold_owed or bool(processed and self.replica is not None)
        if processed and caught_up and self.replica is None:
            run("ledger", self.ledger.fold_new, self._fold_again)
        if self._every("heartbeat", self.settings.heartbeat_interval_s):
            run("ledger", lambda: self.ledger.recover(self.settings.claim_idle_ms))
            run("heartbeat", self._check_and_beat)
            if self._every("hits", self.hits.interval_s):
                run("hits", self._publish_hits)
        if self.applier.drifted:
            run("reconcile", self._repair)
        self._beat_soon_if_changed()
        if self._every("trim", self.settings.trim_interval_s):
            run("trimming", self._trim)
        interval = self.settings.reconcile_interval_s
        if interval and self._every("reconcile", interval):
            run("reconcile", self.reconcile)
        applier = self.supervisor["applier"]
        if not applier.ready():  # no blocking read paces the loop: wait here, expiring
            self._expire_until(min(applier.retry_at, time.monotonic() + 1.0))
        return processed

    def _trim(self) -> None:
        """Trim, forget and retire, if it is this worker's turn (one worker per interval)."""
        settings = self.settings
        if take_turn(self.client, self.keys, settings.consumer_name, settings.trim_interval_s):
            trim(
                self.ledger, self.applier.now_ms(), settings.host_expiry_s, settings.retire_after_s
            )

    def _publish_hits(self) -> None:
        """Per-rule hit counters to ``{pushfw}:hits:<host>``, between expiries (:mod:`.hits`)."""
        now_ms = self.applier.now_ms()
        if self.hits.clear(self.applier.expiry.ms_until_next(now_ms)):
            self.hits.publish(now_ms)
        else:
            self._due["hits"] = time.monotonic()  # a timed rule is due: at the next heartbeat

    def _fold(self) -> int:
        """Entries folded: none means the ledger had caught up with the stream.

        A follower shares the fold with the fleet but asks for work at most every
        :data:`_FOLLOWER_FOLD_GAP_S` once the ledger had caught up: a thousand followers
        asking at every pass would cost the primary what reading off it saved. After it
        applied a batch its read waits no longer than the next ask (:meth:`_fold_wait_ms`),
        so in a fleet of followers alone the ledger is at most that far behind.
        """
        folded = 0
        if self._refold:
            folded = self.ledger.fold_own_pending()
            self._refold = False
        if self.replica is not None and time.monotonic() < self._fold_at:
            return folded
        self._fold_owed = False
        new = self.ledger.fold_new()
        if self.replica is not None and new < self.ledger.batch_size:
            self._fold_at = time.monotonic() + _FOLLOWER_FOLD_GAP_S
        return folded + new

    def _fold_wait_ms(self) -> int | None:
        """How long a follower's read may wait before the fold it owes (None: owes none)."""
        if not self._fold_owed:
            return None
        return max(0, int((self._fold_at - time.monotonic()) * 1000))

    def _fold_again(self) -> None:
        """A failed fold may have read entries it did not fold: fold our pending ones next."""
        self._refold = True

    def _repair(self) -> None:
        self.reconcile()
        self.applier.drifted = False  # only once done: a pass cut short tries again

    def _check_and_beat(self) -> None:
        """Protect Redis, check the kernel still holds our objects, revive the scheduler, beat."""
        self._protect(self.client)
        with self.alarm.kernel():
            intact = self.backend.intact()
        if not intact:
            logger.warning(
                "the kernel lost pushfw's rules or hooks behind its back (a hand flush?): "
                "reconciling"
            )
            self.applier.drifted = True
        self.scheduler.revive()
        self.heartbeat()

    def _beat_soon_if_changed(self) -> None:
        """The rules changed since the last heartbeat: beat within a moment, not an interval.

        ``pushfw status`` then agrees with ``pushfw list`` a moment after a batch, at most
        a few heartbeats a second however busy the stream is.
        """
        if (
            self.backend.size() == self._beat_rules
            and self.applier.lists.status() == self._beat_lists
        ):
            return
        soon = max(time.monotonic(), self._beat_at + _CHANGED_BEAT_GAP_S)
        self._due["heartbeat"] = min(self._due.get("heartbeat", soon), soon)

    def _lock_waited(self, seconds: float) -> None:
        self.metrics.lock_wait.observe(seconds)
        now = time.monotonic()
        if seconds >= _LOCK_WAIT_WARN_S and now - self._lock_warned_at >= 60:
            self._lock_warned_at = now
            logger.warning(
                "waited %.1f s for the xtables lock another process holds (an iptables run?)",
                seconds,
            )

    def heartbeat(self, state: str = "running") -> None:
        self._beat_at, self._beat_rules = time.monotonic(), self.backend.size()
        self._beat_lists = self.applier.lists.status()
        lag, pending = self.applier.stream.progress()
        reads = self._reads()
        previous = beat(
            self.client,
            self.keys,
            HostStatus(
                host=self.settings.host_name,
                labels=sorted(self.settings.labels),
                version=pushfw_version(),
                backend=self.backend.name,
                last_seen_ms=self.applier.now_ms(),
                started_ms=self.started_ms,
                rules=self._beat_rules,
                lag=lag,
                pending=pending,
                interval_s=self.settings.heartbeat_interval_s,
                state=state,
                ledger_lost=self.ledger_lost,
                problems=self._problems(),
                ids_ahead=self.ledger.clock.stamped,
                roles=self.supervisor.states(),
                done_id=self.applier.done_id,
                position=self.applier.stream.position,
                reads=reads,
                counts=dict(self.applier.counts),
                lists=self._beat_lists,
                instance=self.instance.id,
                boot_id=self.instance.boot_id,
                pid=self.instance.pid,
                duplicate=self.twins.twin.instance if self.twins.twin is not None else "",
            ),
        )
        self.twins.replaced(previous, self.settings.heartbeat_interval_s)
        for role, health in self.supervisor.roles.items():
            self.metrics.role_failing.labels(role).set(health.failing_since_ms is not None)
        rules = self.backend.action_counts() if self.metrics.serving else {}
        self.metrics.heartbeat(lag, pending, self.backend.name, rules, reads)
        self.metrics.health(self.ledger_lost, len(self._problems()), self._beat_lists)
        if self.notifier.is_ready:
            self.notifier.status(f"{self._following()}; lag {lag}, pending {pending}")

    def _problems(self) -> list[str]:
        found = self.supervisor.problems()
        twin = self.twins.problem()
        if twin is not None:
            found.append(twin)
        if self.reconcile_error is not None:
            found.append(f"reconcile: {self.reconcile_error}")
        found += self.applier.lists.problems.values()
        stream = self.applier.stream
        if isinstance(stream, FollowerStream) and stream.replica_down is not None:
            found.append(
                f"replica {mask_url(self.settings.read_url)}: {stream.replica_down}; reading "
                f"on the primary since {clock_text(stream.replica_down_ms)}"
            )
        return found

    def _reads(self) -> str:
        stream = self.applier.stream
        if not isinstance(stream, FollowerStream):
            return "group"
        return "replica" if stream.replica_down is None else "primary"

    def _following(self) -> str:
        via = f" via {mask_url(self.settings.read_url)}" if self.replica is not None else ""
        return (
            f"following {self.keys.cmd} as {self.applier.stream.group}{via}: "
            f"{plural(self.backend.size(), 'rule')} ({self.backend.name})"
        )

    def run(self, burst: bool = False) -> None:
        """Run until stopped; with ``burst``, until nothing of ours is left to do."""
        backoff = Backoff(0.1, _RECONNECT_MAX_S)
        self.supervisor.strict = burst  # a one-off run reports a failure instead of retrying
        ready = False
        down_since: float | None = None
        logger.info(
            "pushfw worker starting: host %s, backend %s, group %s, redis %s",
            self.settings.host_name,
            self.backend.name,
            self.applier.stream.group,
            mask_url(self.settings.redis_url),
            extra={"state": "starting"},
        )
        self.notifier.status("starting: connecting to Redis")
        try:
            self._serve_metrics()
            while not self.applier.stopping:
                self.notifier.alive()
                try:
                    with self.alarm.watch(self.applier.expiry.ms_until_next(self.applier.now_ms())):
                        ready = self._resume(ready, down_since, burst)
                        processed = self.iteration() if ready else self._wait_to_start()
                    if down_since is not None:
                        self.notifier.status(self._following())
                        down_since, self._back = None, False
                    backoff.reset()
                    if burst and not processed and self.applier.idle():
                        break
                except ExpiryDue:
                    self._cut_short()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    down_since = self._redis_down(exc, down_since, backoff)
                except redis.ResponseError as exc:
                    ready = self._group_vanished(exc)
                except TransientBackendError as exc:
                    logger.warning("the kernel is busy (%s); trying again", exc)
                    time.sleep(min(backoff.next_delay_s(), self.notifier.max_wait_s))
        except StopRequested:
            pass
        finally:
            self.notifier.stopping()
            self._last_heartbeat()
            self.metrics.close()
            self.scheduler.close()
            self.backend.close()
            self.client.close()
            if self.replica is not None:
                self.replica.close()
        logger.info("pushfw worker stopped", extra={"state": "stopped"})

    def _cut_short(self) -> None:
        """A Redis call outlived the next expiry: drop the connections (their state is
        unknown), remove what is due, and re-read our pending entries on the next pass."""
        if not self._cut_warned:
            logger.warning("Redis has not answered past an expiry: removing timed rules meanwhile")
            self._cut_warned = True
        self.client.connection_pool.disconnect()
        if self.replica is not None:
            self.replica.connection_pool.disconnect()
        self.applier.reset_reads()
        self._refold = True  # a fold may have been cut between its read and its script
        self.applier.expire_due()

    def _group_vanished(self, exc: redis.ResponseError) -> bool:
        """NOGROUP: Redis lost its data, set up again (returns False: not ready); else raise."""
        if "NOGROUP" not in str(exc):
            raise exc
        if isinstance(exc, StreamGone):
            return False  # the follower said why
        logger.warning(
            "consumer group vanished (Redis lost its data?): recreating",
            extra={"state": "starting"},
        )
        return False

    def _resume(self, ready: bool, down_since: float | None, burst: bool) -> bool:
        """Set up at start (and after Redis lost its data); reconcile after every outage.

        Redis is said to be back only once it answered a PING, and once per outage: a
        refused connection or a frozen server raises here, and the loop waits its next
        backoff step in silence.
        """
        if down_since is not None and not self._back:
            self.client.ping()
            self._back = True
            logger.info(
                "redis is back after %.1f s: reconciling",
                time.monotonic() - down_since,
                extra={"state": "following"},
            )
        if not ready:
            started = self.supervisor.run("startup", lambda: self._start(burst), self._beat_anyway)
            return bool(started)
        if down_since is not None:
            self.reconcile()  # whatever happened meanwhile, a trim past this host included
        return True

    def _last_heartbeat(self) -> None:
        """Say "stopped" so ``pushfw status`` tells a stopped host from a lost one (not when
        it refused to start: the heartbeat is the live twin's)."""
        if self._refused:
            return
        with contextlib.suppress(redis.RedisError):
            self.heartbeat("stopped")

    def _beat_anyway(self) -> None:
        """A failed start still tells ``pushfw status`` why this host is not ready."""
        with contextlib.suppress(Exception):
            self.heartbeat("starting")

    def _wait_to_start(self) -> int:
        startup = self.supervisor["startup"]
        self._expire_until(min(startup.retry_at, time.monotonic() + 1.0))
        return 0

    def _start(self, burst: bool) -> bool:
        """Set up and converge, then tell systemd the worker is ready."""
        self.notifier.status("starting: reconciling with the ledger")
        self.setup()
        if not burst:
            self.scheduler.start()
        logger.info("ready: %s", self._following(), extra={"state": "following"})
        self.notifier.ready(self._following())
        return True

    def _serve_metrics(self) -> None:
        address = self.settings.metrics_address
        if address is None:
            return
        try:
            host, port = self.metrics.serve(*address)
        except OSError as exc:
            raise ConfigError(
                f"metrics_listen {self.settings.metrics_listen}: {exc.strerror or exc}"
            ) from exc
        logger.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    def _redis_down(self, exc: Exception, down_since: float | None, backoff: Backoff) -> float:
        if down_since is None or self._back:  # a new outage, or it went away again
            self._back = False
            logger.warning(
                "redis unavailable (%s); retrying with backoff", exc, extra={"state": "redis_down"}
            )
            self.metrics.redis_reconnects.inc()
            self.notifier.status(f"Redis unavailable ({exc}); still expiring timed rules")
            down_since = time.monotonic()
        self.applier.reset_reads()
        self._protect(None)  # a drop of Redis's new address may be what keeps us out
        self._expire_until(time.monotonic() + min(backoff.next_delay_s(), self.notifier.max_wait_s))
        return down_since

    def _expire_until(self, deadline: float) -> None:
        """Wait for the next reconnect attempt, removing timed rules the moment they are due."""
        while True:
            self.applier.expire_due()
            self.notifier.alive()  # the loop runs: kernel expiry goes on without Redis
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            next_ms = self.applier.expiry.ms_until_next(self.applier.now_ms())
            time.sleep(max(0.001, min(left_s, next_ms / 1000 if next_ms is not None else left_s)))


def _fit_watchdog(settings: WorkerSettings, notifier: Notifier) -> WorkerSettings:
    """Bound the blocking read so the loop pings the watchdog in time."""
    limit_ms = int(notifier.max_wait_s * 1000) if notifier.watchdog_s else None
    if limit_ms is None or settings.block_ms <= limit_ms:
        return settings
    logger.info(
        "block_ms lowered from %d to %d for the systemd watchdog", settings.block_ms, limit_ms
    )
    return settings.model_copy(update={"block_ms": max(10, limit_ms)})


def _handled_by_the_loop(exc: BaseException) -> bool:
    """Errors the run loop handles for every role at once: never a single role's failure."""
    if isinstance(exc, redis.ResponseError):
        return "NOGROUP" in str(exc)
    return isinstance(
        exc,
        StopRequested
        | ForceStop
        | ExpiryDue
        | redis.ConnectionError
        | redis.TimeoutError
        | TransientBackendError
        | ConfigError,
    )
