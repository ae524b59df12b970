"""The worker process: wire Redis, backend and applier together and keep them running.

Shutdown has two stages: the first SIGTERM/SIGINT stops reading, lets the batch in hand
finish (apply, results, XACK) and exits 0; a second one aborts at once. Anything aborted is
still pending in the host's group and is re-read on the next start (at-least-once).
Redis outages are waited out with backoff; one log line when Redis goes away, one when it
is back.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import redis

from pushfw.worker.applier import Applier, StopRequested
from pushfw.worker.backends import Backend, make_backend
from pushfw.worker.backoff import Backoff
from pushfw.worker.protect import Protection
from pushfw.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class ForceStop(Exception):
    """A second stop signal: abandon the batch in hand."""


def connect(settings: WorkerSettings) -> redis.Redis:
    """A client whose socket timeouts outlast the blocking read."""
    tcp = {} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        socket_timeout=settings.block_ms / 1000 + 10,
        socket_connect_timeout=5,
        health_check_interval=30,
        **tcp,
    )


class Worker:
    """One host's daemon: the applier loop with Redis reconnects and graceful stop."""

    def __init__(self, settings: WorkerSettings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.client = connect(settings)
        self.backend = backend or make_backend(
            settings.backend,
            chain=settings.chain,
            hooks=settings.hook_chains,
            memory_fail=settings.fail_networks,
        )
        self.protection = Protection.build(settings.protected, settings.redis_url)
        self.applier = Applier(self.client, self.backend, settings, self.protection)
        self._signals = 0

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("second %s: stopping now", signal.Signals(signum).name)
            raise ForceStop
        logger.info("%s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.request_stop()
        if self.applier.blocking:
            raise StopRequested

    def request_stop(self) -> None:
        self.applier.stopping = True

    def run(self, burst: bool = False) -> None:
        """Run until stopped; with ``burst``, until nothing of ours is left to do."""
        backoff = Backoff(0.1, 10.0)
        ready = False
        down_since: float | None = None
        logger.info(
            "pushfw worker starting: host %s, backend %s, group %s",
            self.settings.host_name,
            self.backend.name,
            self.applier.stream.group,
        )
        try:
            while not self.applier.stopping:
                try:
                    if not ready:
                        self.applier.setup()
                        ready = True
                    processed = self.applier.iteration()
                    if down_since is not None:
                        logger.info("redis is back after %.1f s", time.monotonic() - down_since)
                        down_since = None
                    backoff.reset()
                    if burst and not processed and self.applier.idle():
                        break
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    down_since = self._redis_down(exc, down_since, backoff)
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    logger.warning("consumer group vanished (Redis lost its data?): recreating")
                    ready = False
        except StopRequested:
            pass
        finally:
            self.backend.close()
            self.client.close()
        logger.info("pushfw worker stopped")

    def _redis_down(self, exc: Exception, down_since: float | None, backoff: Backoff) -> float:
        if down_since is None:
            logger.warning("redis unavailable (%s); retrying with backoff", exc)
            down_since = time.monotonic()
        self.applier.reset_reads()
        self.applier.expire_due()
        time.sleep(backoff.next_delay_s())
        return down_since
