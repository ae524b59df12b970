"""Prometheus metrics of one worker, served over HTTP when ``metrics_listen`` is set.

Every metric lives in a registry of the worker's own (not prometheus-client's global one),
so several workers in one process (tests) never collide. The roles call one method per
event; nothing here touches Redis or the kernel, and the HTTP thread only reads counters.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from pushfw.producer.connection import text
from pushfw.producer.contract import Action
from pushfw.producer.ops import find_op
from pushfw.producer.records import HeldList
from pushfw.worker.batch import Answer
from pushfw.worker.heartbeat import pushfw_version
from pushfw.worker.reconcile import Drift

__all__ = ["Metrics"]

logger = logging.getLogger(__name__)

# Seconds: from a millisecond command to a worker catching up after an hour away.
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _op_label(out: Answer) -> str:
    """The canonical op, also for a rejected entry whose op itself was valid; else ``invalid``."""
    if out.command is not None:
        return out.command.op.value
    spec = find_op(text((out.entry.fields or {}).get(b"op", b"")))
    # never the raw text: labels from request data would be unbounded
    return spec.op if spec is not None else "invalid"


class Metrics:
    """The ``pushfw_*`` metrics of one worker."""

    def __init__(self) -> None:
        # A *_created series per counter doubles the series and tells nothing a restart's
        # process_start_time_seconds does not; the switch is prometheus-client's, global.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        ProcessCollector(registry=reg)  # process_resident_memory_bytes, cpu, open fds
        self.build_info = Gauge(
            "pushfw_build_info",
            "Always 1; the pushfw version this worker runs.",
            ["version"],
            registry=reg,
        )
        self.build_info.labels(pushfw_version()).set(1)
        self.commands = Counter(
            "pushfw_commands",
            "Commands this host answered, by op and result status.",
            ["op", "status"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "pushfw_batch_size", "Entries per batch read.", buckets=_SIZE_BUCKETS, registry=reg
        )
        self.apply_seconds = Histogram(
            "pushfw_apply_duration_seconds",
            "Time to process one batch: decide, commit to the kernel, write results, XACK.",
            buckets=_DURATION_BUCKETS,
            registry=reg,
        )
        self.command_lag = Histogram(
            "pushfw_command_lag_seconds",
            "From XADD (the entry id's time) to this host's result.",
            buckets=_LAG_BUCKETS,
            registry=reg,
        )
        self.group_pending = Gauge(
            "pushfw_group_pending",
            "Entries delivered to this host's group but not acknowledged (at heartbeat).",
            registry=reg,
        )
        self.group_lag = Gauge(
            "pushfw_group_lag",
            "Entries not yet delivered to this host's group (at heartbeat; NaN: unknown).",
            registry=reg,
        )
        self.rules = Gauge(
            "pushfw_rules",
            "Managed rules in the kernel, by backend and action (at heartbeat).",
            ["backend", "action"],
            registry=reg,
        )
        self.expiry_lag = Histogram(
            "pushfw_expiry_lag_seconds",
            "From a timed rule's expiry to its removal from this host's kernel.",
            buckets=_LAG_BUCKETS,
            registry=reg,
        )
        self.drift = Counter(
            "pushfw_reconcile_drift",
            "Rules a reconcile repaired, by kind (added, removed, updated expiry).",
            ["kind"],
            registry=reg,
        )
        for kind in ("added", "removed", "updated"):
            self.drift.labels(kind)
        self.dead_letters = Counter(
            "pushfw_dead_letters", "Commands sent to the dead-letter stream.", registry=reg
        )
        self.redis_reconnects = Counter(
            "pushfw_redis_reconnects",
            "Times the connection to Redis was lost and had to be re-established.",
            registry=reg,
        )
        self.scheduler_expiries = Counter(
            "pushfw_scheduler_expiries",
            "Expiries this worker's scheduler claimed and emitted as delete commands.",
            registry=reg,
        )
        self.role_failures = Counter(
            "pushfw_role_failures",
            "Unexpected errors a role of this worker survived, by role (it retried with backoff).",
            ["role"],
            registry=reg,
        )
        self.role_failing = Gauge(
            "pushfw_role_failing",
            "1 while a role of this worker is failing, by role (at heartbeat).",
            ["role"],
            registry=reg,
        )
        self.reads_from = Gauge(
            "pushfw_reads_from",
            "1 for where this host reads the command stream now: group, replica, or primary "
            "(a follower whose replica cannot be read), 0 for the others (at heartbeat).",
            ["source"],
            registry=reg,
        )
        self.lock_wait = Histogram(
            "pushfw_xtables_lock_wait_seconds",
            "Time a kernel change waited for the xtables lock held by another process.",
            buckets=_LAG_BUCKETS,
            registry=reg,
        )
        self.rule_hits_packets = Gauge(
            "pushfw_rule_hits_packets",
            "Packets the managed rules matched, summed by action (kernel counters, read every "
            "minute; a rule's count starts again when the rule is rewritten).",
            ["action"],
            registry=reg,
        )
        self.rule_hits_bytes = Gauge(
            "pushfw_rule_hits_bytes",
            "Bytes the managed rules matched, summed by action (as pushfw_rule_hits_packets).",
            ["action"],
            registry=reg,
        )
        self.rule_hits_read_seconds = Gauge(
            "pushfw_rule_hits_read_seconds",
            "Time the last reading of the kernel's hit counters took (one dump of every rule).",
            registry=reg,
        )
        self.list_hits_packets = Gauge(
            "pushfw_list_hits_packets",
            "Packets a named list's entries matched, by list (kernel counters, read with the "
            "rules'; an entry two lists of one action hold counts in both).",
            ["list"],
            registry=reg,
        )
        self.list_hits_bytes = Gauge(
            "pushfw_list_hits_bytes",
            "Bytes a named list's entries matched, by list (as pushfw_list_hits_packets).",
            ["list"],
            registry=reg,
        )
        self._hit_lists: set[str] = set()
        self.ledger_lost = Gauge(
            "pushfw_ledger_lost",
            "1 while the ledger is not the one this host converged with (Redis lost its data; "
            "pushfw status: LEDGER LOST).",
            registry=reg,
        )
        self.problems = Gauge(
            "pushfw_problems",
            "What keeps a role of this worker from doing its job, counted (pushfw status: "
            "DEGRADED; a duplicate host name is one).",
            registry=reg,
        )
        self.list_entries = Gauge(
            "pushfw_list_entries",
            "Entries of a named list in this host's kernel, by list (at heartbeat).",
            ["list"],
            registry=reg,
        )
        self.list_refused = Gauge(
            "pushfw_list_refused",
            "Entries of a named list this host's policy refused, by list (at heartbeat).",
            ["list"],
            registry=reg,
        )
        self._lists: set[str] = set()
        self._server: WSGIServer | None = None
        self.address: tuple[str, int] | None = None
        """Where ``/metrics`` is served (None: not served)."""

    def batch(self, outcomes: Sequence[Answer], seconds: float, now_ms: int) -> None:
        """One processed batch: its size, its duration, and each answered command."""
        self.batch_size.observe(len(outcomes))
        self.apply_seconds.observe(seconds)
        answered = [out for out in outcomes if out.status is not None and not out.skip]
        for (op, status), count in Tally(
            (_op_label(out), out.status.value) for out in answered if out.status is not None
        ).items():
            self.commands.labels(op, status).inc(count)
        for out in answered:
            self.command_lag.observe(max(0, now_ms - out.entry.ms) / 1000)

    def expired(self, expiries_ms: Iterable[int], now_ms: int) -> None:
        """Timed rules removed from the kernel at ``now_ms``."""
        for expires_ms in expiries_ms:
            self.expiry_lag.observe(max(0, now_ms - expires_ms) / 1000)

    def reconciled(self, drift: Drift) -> None:
        self.drift.labels("added").inc(drift.added)
        self.drift.labels("removed").inc(drift.removed)
        self.drift.labels("updated").inc(drift.updated)

    def heartbeat(
        self,
        lag: int | None,
        pending: int,
        backend: str,
        rules: Mapping[Action, int],
        reads: str = "group",
    ) -> None:
        """Gauges that are sampled, not counted: the host's group and its rules per action."""
        for source in ("group", "replica", "primary"):
            self.reads_from.labels(source).set(source == reads)
        self.group_pending.set(pending)
        self.group_lag.set(float("nan") if lag is None else lag)
        for action in Action:
            self.rules.labels(backend, action.value).set(rules.get(action, 0))

    def health(self, ledger_lost: bool, problems: int, lists: Mapping[str, HeldList]) -> None:
        """What ``pushfw status`` shows of this host, at heartbeat; a removed list's series go."""
        self.ledger_lost.set(ledger_lost)
        self.problems.set(problems)
        for name in self._lists - lists.keys():
            self.list_entries.remove(name)
            self.list_refused.remove(name)
        for name, held in lists.items():
            self.list_entries.labels(name).set(held.entries)
            self.list_refused.labels(name).set(held.refused)
        self._lists = set(lists)

    def hits(self, totals: Mapping[Action, tuple[int, int]] | None, seconds: float) -> None:
        """One reading of the hit counters: (packets, bytes) per action (None: the rules'
        were not read), and its duration."""
        for action, (packets, octets) in (totals or {}).items():
            self.rule_hits_packets.labels(action.value).set(packets)
            self.rule_hits_bytes.labels(action.value).set(octets)
        self.rule_hits_read_seconds.set(seconds)

    def list_hits(self, lists: Mapping[str, tuple[int, int]]) -> None:
        """(packets, bytes) per list at one reading; a list no longer read loses its series
        (at most ``max_lists`` series each)."""
        for name in self._hit_lists - lists.keys():
            self.list_hits_packets.remove(name)
            self.list_hits_bytes.remove(name)
        for name, (packets, octets) in lists.items():
            self.list_hits_packets.labels(name).set(packets)
            self.list_hits_bytes.labels(name).set(octets)
        self._hit_lists = set(lists)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` from a daemon thread; returns the bound address (port 0 works)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address
        self.address = str(bound[0]), int(bound[1])
        return self.address

    @property
    def serving(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        """Stop serving (the counters stay readable in-process)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.address = None
