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

import logging
import time

import redis

from pushfw.producer.keys import Keys
from pushfw.worker.alarm import ExpiryAlarm, ExpiryDue
from pushfw.worker.answers import Answerer
from pushfw.worker.applier import Applier
from pushfw.worker.backends import Backend, make_backend
from pushfw.worker.backends.base import list_counters_of, rule_counters_of
from pushfw.worker.clock import Clock, SyncedClock
from pushfw.worker.config import mask_url
from pushfw.worker.converge import Converger
from pushfw.worker.copies import ContentCopies
from pushfw.worker.errors import ConfigError, TransientBackendError
from pushfw.worker.expiry import ExpiryQueue
from pushfw.worker.fold import FoldPace
from pushfw.worker.follower import FollowerStream, StreamGone
from pushfw.worker.generation import GenerationFile
from pushfw.worker.heartbeat import Heart, Registration
from pushfw.worker.hits import HitsReader
from pushfw.worker.hits import interval_s as hits_interval_s
from pushfw.worker.housekeeping import Housekeeping
from pushfw.worker.ledger import Ledger
from pushfw.worker.lists import ListKeeper
from pushfw.worker.metrics import Metrics
from pushfw.worker.notify import Notifier
from pushfw.worker.outage import Outage
from pushfw.worker.reader import Reader, StopRequested
from pushfw.worker.reconcile import Drift
from pushfw.worker.scheduler import Scheduler, enable_expiry_events
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.signals import ForceStop, Signals
from pushfw.worker.supervisor import Supervisor
from pushfw.worker.wiring import (
    Links,
    LockWaits,
    connect,
    fit_watchdog,
    host_stream,
    make_policy,
    make_protection,
)

logger = logging.getLogger(__name__)


class Worker:
    """One host's daemon: applier, ledger, scheduler and housekeeping, with graceful stop.

    The constructor is the one place that builds what the roles share (Redis's clock, the
    metrics, the stream, the expiry queue, the list keeper) and hands each role what it
    needs: no role is changed after it is built. A ``backend`` passed in is used as built.
    It keeps only what its loop drives; the heartbeat and the scheduler are housekeeping's.
    """

    def __init__(
        self, settings: WorkerSettings, backend: Backend | None = None, take_over: bool = False
    ) -> None:
        self.notifier = Notifier()
        self.settings = settings = fit_watchdog(settings, self.notifier)
        keys = Keys(settings.key_prefix)
        client = connect(settings)
        replica = connect(settings, settings.read_url) if settings.read_url else None
        self.links = Links(client, replica)
        clock = SyncedClock()
        self.metrics = metrics = Metrics()
        alarm = ExpiryAlarm()
        self.backend = backend = backend or make_backend(
            settings.backend,
            chain=settings.chain,
            hooks=settings.hook_chains,
            memory_fail=settings.fail_networks,
            set_size=settings.set_size,
            clock=clock.now_ms,
            lock_waited=LockWaits(metrics).waited,
        )
        protection = make_protection(settings)
        policy = make_policy(settings, protection, backend)
        self.ledger = ledger = Ledger(
            client,
            keys,
            settings.consumer_name,
            settings.batch_size,
            clock=Clock(client, keys),
            signing=policy.signing,
        )
        self.fold = FoldPace(ledger, follower=replica is not None)
        self.stream = stream = host_stream(settings, client, replica, keys)
        expiry = ExpiryQueue()
        self.supervisor = supervisor = Supervisor(
            _handled_by_the_loop, lambda role: metrics.role_failures.labels(role).inc()
        )
        signed = policy.signing.required
        lists = ListKeeper(
            client,
            keys,
            backend,
            policy,
            alarm.kernel,
            ContentCopies(settings.state_dir, settings.host_name) if signed else None,
            alive=lambda: self.notifier.alive(before_long_call=True),
        )
        self.reader = reader = Reader(
            stream,
            settings,
            wakes=(
                lambda: expiry.ms_until_next(clock.now_ms()),
                lambda: lists.ms_until_next(clock.now_ms()),
                self.fold.wait_ms,
            ),
        )
        answers = Answerer(stream, settings, metrics, reader.retry_later)
        self.applier = applier = Applier(
            reader=reader,
            answers=answers,
            backend=backend,
            policy=policy,
            ledger=ledger,
            clock=clock,
            expiry=expiry,
            lists=lists,
            metrics=metrics,
            kernel=alarm.kernel,
            lists_changed=lambda: supervisor.run("heartbeat", self.heartbeat),
        )
        converger = Converger(
            applier=applier,
            ledger=ledger,
            stream=stream,
            clock=clock,
            lists=lists,
            generation=GenerationFile(settings.state_dir, settings.host_name),
            metrics=metrics,
            kernel=alarm.kernel,
        )
        registration = Registration(client, settings, stream.now_ms, take_over)
        heart = Heart(
            client=client,
            settings=settings,
            backend=backend,
            stream=stream,
            clock=clock,
            ledger=ledger,
            answers=answers,
            lists=lists,
            supervisor=supervisor,
            converger=converger,
            registration=registration,
            metrics=metrics,
        )
        scheduler = Scheduler(
            connect(settings), keys, settings.scheduler_poll_s, metrics, supervisor["scheduler"]
        )
        hits = HitsReader(
            client,
            keys,
            settings.host_name,
            backend,
            hits_interval_s(settings.heartbeat_interval_s),
            metrics,
            alarm.kernel,
            settings.hits_max_rules,
            list_counters_of(backend),
            rule_counters_of(backend),
        )
        self.house = Housekeeping(
            client=client,
            applier=applier,
            ledger=ledger,
            clock=clock,
            expiry=expiry,
            lists=lists,
            protection=protection,
            converger=converger,
            heart=heart,
            scheduler=scheduler,
            hits=hits,
            supervisor=supervisor,
            notifier=self.notifier,
        )
        self.outage = Outage(self.notifier, metrics, logger)
        self.signals = Signals(reader, alarm, logger)

    @property
    def client(self) -> redis.Redis:
        """The primary."""
        return self.links.client

    @property
    def heart(self) -> Heart:
        return self.house.heart

    @property
    def scheduler(self) -> Scheduler:
        return self.house.scheduler

    def install_signal_handlers(self) -> None:
        self.signals.install()

    def request_stop(self) -> None:
        self.reader.stopping = True

    def setup(self) -> None:
        """Groups, backend, then converge on the ledger before following the stream.

        A host new to the stream starts its group at the stream's head once the ledger holds
        everything up to there: it gets the current state from the ledger (reconcile), not
        by replaying history.
        """
        self.house.register()
        known = self.stream.group_exists()  # a follower drops a lost position here
        self.heartbeat("starting")  # announce first: no trim runs past a group being created
        self.ledger.ensure_group()
        if isinstance(self.stream, FollowerStream):
            self.stream.check_replica()
        self.ledger.recover(self.settings.claim_idle_ms)
        start_id = "0"
        if not known:
            start_id = self.stream.head()
            self.ledger.catch_up(start_id)
        self.applier.setup(start_id)
        if self.links.replica is not None:
            self.heartbeat("starting")  # the position it starts at: no trim runs past it
        if self.settings.expiry_events:
            enable_expiry_events(self.client)
        self.reconcile()
        self.heartbeat()
        self.house.started()

    def reconcile(self, force: bool = False) -> Drift | None:
        """Make the managed rules equal what the ledger holds for this host, through the gate.

        Rules the ledger does not speak of are removed only when this is the ledger the host
        converged with before, or with ``force`` (:class:`~pushfw.worker.converge.Converger`).
        """
        return self.house.reconcile(force)

    def heartbeat(self, state: str = "running") -> None:
        self.house.heartbeat(state)

    def iteration(self) -> int:
        """One pass of every role: fold, expire, apply, then housekeeping when due.

        Each role runs supervised (:mod:`pushfw.worker.supervisor`): one that fails is
        retried with backoff while the others go on. The ledger folds again after a batch
        arrived while the applier was waiting, so it is not a batch behind this host when
        the worker stops; only then, for a fold per batch keeps it level with the applier, so
        both read the same entries and each entry is parsed once.
        """
        run = self.supervisor.run
        caught_up = run("ledger", self.fold.fold, self.fold.again) == 0
        run("expiry", self.applier.expire_due)
        processed = run("applier", self.applier.iteration, self.reader.reset_reads) or 0
        if self.fold.after_batch(processed, caught_up):
            run("ledger", self.ledger.fold_new, self.fold.again)
        self.house.run_due()
        applier = self.supervisor["applier"]
        if not applier.ready():  # no blocking read paces the loop: wait here, expiring
            self._expire_until(min(applier.retry_at, time.monotonic() + 1.0))
        return processed

    def run(self, burst: bool = False) -> None:
        """Run until stopped; with ``burst``, until nothing of ours is left to do."""
        self.supervisor.strict = burst  # a one-off run reports a failure instead of retrying
        ready = False
        logger.info(
            "pushfw worker starting: host %s, backend %s, group %s, redis %s",
            self.settings.host_name,
            self.backend.name,
            self.stream.group,
            mask_url(self.settings.redis_url),
            extra={"state": "starting"},
        )
        self.notifier.status("starting: connecting to Redis")
        try:
            self._serve_metrics()
            while not self.reader.stopping:
                self.notifier.alive()
                try:
                    with self.signals.alarm.watch(self.applier.ms_until_expiry()):
                        ready = self._resume(ready, burst)
                        processed = self.iteration() if ready else self._wait_to_start()
                    if self.outage.ended():
                        self.notifier.status(self.heart.following())
                    if burst and not processed and self.reader.idle():
                        break
                except ExpiryDue:
                    self._cut_short()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self._redis_down(exc)
                except redis.ResponseError as exc:
                    ready = self._group_vanished(exc)
                except TransientBackendError as exc:
                    logger.warning("the kernel is busy (%s); trying again", exc)
                    time.sleep(self.outage.wait_s())
        except StopRequested:
            pass
        finally:
            self._close()
        logger.info("pushfw worker stopped", extra={"state": "stopped"})

    def _close(self) -> None:
        self.notifier.stopping()
        self.house.last_heartbeat()
        self.metrics.close()
        self.scheduler.close()
        self.backend.close()
        self.links.close()

    def _cut_short(self) -> None:
        """A Redis call outlived the next expiry: drop the connections (their state is
        unknown), remove what is due, and re-read our pending entries on the next pass."""
        self.outage.cut_short()
        self.links.drop()
        self.reader.reset_reads()
        self.fold.again()  # a fold may have been cut between its read and its script
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

    def _resume(self, ready: bool, burst: bool) -> bool:
        """Set up at start (and after Redis lost its data); reconcile after every outage."""
        back = self.outage.check_back(self.client)
        if not ready:
            started = self.supervisor.run(
                "startup", lambda: self._start(burst), self.house.beat_anyway
            )
            return bool(started)
        if back:
            self.reconcile()  # whatever happened meanwhile, a trim past this host included
        return True

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
        logger.info("ready: %s", self.heart.following(), extra={"state": "following"})
        self.notifier.ready(self.heart.following())
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

    def _redis_down(self, exc: Exception) -> None:
        wait_s = self.outage.began(exc)
        self.reader.reset_reads()
        self.house.protect(None)  # a drop of Redis's new address may be what keeps us out
        self._expire_until(time.monotonic() + wait_s)

    def _expire_until(self, deadline: float) -> None:
        """Wait for the next reconnect attempt, removing timed rules the moment they are due."""
        while True:
            self.applier.expire_due()
            self.notifier.alive()  # the loop runs: kernel expiry goes on without Redis
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            next_ms = self.applier.ms_until_expiry()
            time.sleep(max(0.001, min(left_s, next_ms / 1000 if next_ms is not None else left_s)))


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
