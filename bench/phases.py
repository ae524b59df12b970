"""pushfw measured end to end: throughput, idle latency, reconcile, TTL lag, memory.

Producers here do what any producer does: pipelined ``XADD`` to ``{pushfw}:cmd`` in chunks
of 1000. "Processed" means the host's consumer group has every entry delivered and
acknowledged (XINFO GROUPS: last-delivered-id is the last entry, lag 0, pending 0). A job's
time ends there: the worker commits a batch to the kernel before it acknowledges it. For
the kernel backends the kernel is then checked to hold the N rules (:mod:`bench.kernel`);
if it does not yet, the job's time runs on until it does.
"""

from __future__ import annotations

import functools
import itertools
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.typing import EncodableT, FieldT

from bench.baseline import percentile
from bench.env import BenchEnv, BenchError, WorkerProc, address, clock_offset_ms
from bench.kernel import Kernel, kernel
from pushfw.producer.connection import text
from pushfw.producer.keys import Keys

CHUNK = 1000
LATENCY_OFFSET = 125_000
"""Address indexes of latency probes: clear of every job's addresses (at most 120k)."""


def drop_fields(n: int, where: Callable[[int], str] = address) -> list[dict[str, str]]:
    return [{"op": "drop.insert", "ip": where(i)} for i in range(n)]


def push(env: BenchEnv, commands: Sequence[dict[str, str]], key: str = "") -> list[str]:
    """XADD every command, pipelined in chunks of 1000, as a producer would."""
    ids: list[str] = []
    for start in range(0, len(commands), CHUNK):
        pipe = env.client.pipeline(transaction=False)
        for fields in commands[start : start + CHUNK]:
            entry: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
            pipe.xadd(key or env.keys.cmd, entry)
        ids.extend(text(x) for x in pipe.execute())
    return ids


def processed(env: BenchEnv, last_id: str, group: str = "") -> bool:
    """The host group (or ``group``) has delivered and acknowledged everything to ``last_id``."""
    row = env.group_state(group)
    if row is None:
        return False
    lag = row.get("lag")
    return (
        text(row["last-delivered-id"]) == last_id
        and int(row["pending"]) == 0
        and (lag is None or int(lag) == 0)
    )


def group_done(env: BenchEnv, n: int) -> int:
    """How many of the last ``n`` entries the host group has acknowledged (approximate)."""
    row = env.group_state()
    if row is None:
        return 0
    lag = int(row.get("lag") or 0)
    return max(0, n - lag - int(row["pending"]))


def wait_until(predicate: Callable[[], bool], deadline: float, pause: float = 0.005) -> bool:
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        time.sleep(pause)
    return True


def wait_ledger(env: BenchEnv, last_id: str, timeout_s: float = 300) -> None:
    """Wait until the ledger group has folded everything up to ``last_id``."""
    if not wait_until(
        lambda: processed(env, last_id, Keys.LEDGER_GROUP), time.perf_counter() + timeout_s
    ):
        raise BenchError(f"the ledger did not fold up to {last_id} within {timeout_s:.0f} s")


def used_memory(env: BenchEnv) -> int:
    info: Any = env.client.info("memory")
    return int(info["used_memory"])


@dataclass
class Job:
    """One end-to-end run of N drops through a fresh worker."""

    backend: str
    n: int
    seconds: float = 0.0
    xadd_seconds: float = 0.0
    completed: bool = False
    kernel_rules: int | None = None
    kernel_check_seconds: float | None = None
    acknowledged: int = 0
    timeout_s: float = 0.0
    used_memory_before: int = 0
    last_id: str = ""

    @property
    def rules_per_s(self) -> float:
        return (self.n if self.completed else self.acknowledged) / self.seconds

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.backend,
            "n": self.n,
            "completed": self.completed,
            "seconds": self.seconds,
            "rules_per_s": self.rules_per_s,
            "xadd_seconds": self.xadd_seconds,
            "acknowledged": self.acknowledged,
            "kernel_rules": self.kernel_rules,
            "kernel_check_seconds": self.kernel_check_seconds,
        }
        if not self.completed:
            out["note"] = (
                f"did not finish within {self.timeout_s:.0f} s: {self.acknowledged} of "
                f"{self.n} acknowledged"
            )
        return out


PROGRESS_EVERY_S = 15.0


@dataclass
class _JobProgress:
    """Logs a long job's progress every :data:`PROGRESS_EVERY_S` seconds; never done."""

    env: BenchEnv
    n: int
    started: float
    logged: int = 0

    def __call__(self) -> bool:
        elapsed = time.perf_counter() - self.started
        if elapsed < (self.logged + 1) * PROGRESS_EVERY_S:
            return False
        self.logged = int(elapsed // PROGRESS_EVERY_S)
        done = group_done(self.env, self.n)
        self.env.progress(
            f"  ... {elapsed:.0f} s: {done} of {self.n} acknowledged ({done / elapsed:.0f}/s)"
        )
        return False


def _kernel_holds(fw: Kernel, job: Job, acked: float, deadline: float) -> float | None:
    """Count the kernel's drops after the group acked all, until they reach N. The job's end:
    the ack if the first count shows N (the worker commits before it acks), else the start of
    the first count that does; None if the deadline passes first."""
    end = acked
    while True:
        started = time.perf_counter()
        job.kernel_rules = fw.drop_count()
        job.kernel_check_seconds = time.perf_counter() - started
        if job.kernel_rules >= job.n:
            return end
        if started > deadline:
            return None
        time.sleep(0.01)
        end = time.perf_counter()


def run_job(
    env: BenchEnv,
    worker: WorkerProc,
    n: int,
    timeout_s: float,
    where: Callable[[int], str] = address,
) -> Job:
    """Push N drops to a ready worker and time until all are processed (and in the kernel)."""
    job = Job(worker.backend, n, timeout_s=timeout_s)
    fw = kernel(env.ns, worker.backend)
    commands = drop_fields(n, where)
    job.used_memory_before = used_memory(env)
    started = time.perf_counter()
    deadline = started + timeout_s
    ids = push(env, commands)
    job.xadd_seconds = time.perf_counter() - started
    job.last_id = ids[-1]
    del commands
    log = _JobProgress(env, n, started)
    done = wait_until(lambda: worker.alive() and (processed(env, ids[-1]) or log()), deadline)
    end = time.perf_counter()
    if done and fw.real:
        held = _kernel_holds(fw, job, end, deadline)
        done = held is not None
        end = held if held is not None else time.perf_counter()
    job.completed = done
    job.acknowledged = n if done else group_done(env, n)
    job.seconds = end - started
    if not done and fw.real:
        job.kernel_rules = fw.busy_count()
    return job


@dataclass(frozen=True)
class Latency:
    backend: str
    table_size: int
    seconds: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        ordered = sorted(self.seconds)
        return {
            "backend": self.backend,
            "table_size": self.table_size,
            "samples": len(ordered),
            "p50_ms": percentile(ordered, 50) * 1000,
            "p99_ms": percentile(ordered, 99) * 1000,
            "max_ms": ordered[-1] * 1000,
            "mean_ms": sum(ordered) / len(ordered) * 1000,
        }


def _last_result_id(env: BenchEnv) -> str:
    newest: Any = env.client.xrevrange(env.keys.results, count=1)
    return text(newest[0][0]) if newest else "0-0"


def _one_latency(env: BenchEnv, ip: str) -> float:
    """XADD one drop, then XREAD BLOCK on the results until this command's result is there."""
    last = _last_result_id(env)
    started = time.perf_counter()
    cmd_id = text(env.client.xadd(env.keys.cmd, {"op": "drop.insert", "ip": ip, "reply": "1"}))
    deadline = started + 30
    while time.perf_counter() < deadline:
        reply: Any = env.client.xread({env.keys.results: last}, block=5000)
        for entry_id, fields in reply[0][1] if reply else ():
            last = text(entry_id)
            if text(fields.get(b"cmd", b"")) == cmd_id:
                return time.perf_counter() - started
    raise BenchError(f"no result for {cmd_id} within 30 s")


def measure_latency(
    env: BenchEnv, worker: WorkerProc, table_size: int, samples: int, first_ip: int
) -> Latency:
    """``samples`` single commands, each on an idle worker (the previous one finished)."""
    times = []
    for i in range(samples):
        time.sleep(0.02)
        times.append(_one_latency(env, address(first_ip + i)))
    return Latency(worker.backend, table_size, tuple(times))


_RECONCILE_LINE = re.compile(
    r"added (\d+), removed (\d+), expiry fixed (\d+), kept (\d+) in ([0-9.]+) s"
)


def _reconcile_once(env: BenchEnv, backend: str) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    proc = env.ns.run(
        env.python,
        "-m",
        "pushfw.worker",
        "reconcile",
        env=env.worker_env(backend),
        timeout=600,
    )
    wall = time.perf_counter() - started
    match = _RECONCILE_LINE.search(proc.stdout)
    if match is None:
        raise BenchError(f"reconcile printed no drift line: {proc.stdout[-300:]!r}")
    names = ("added", "removed", "updated", "kept", "seconds")
    return wall, dict(zip(names, (float(g) for g in match.groups()), strict=True))


@functools.cache
def _startup_s(env: BenchEnv, backend: str, runs: int = 3) -> float:
    """Interpreter start and pushfw's imports: ``python -m pushfw.worker --help``, best of 3
    (measured once per run and backend)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        env.ns.run(env.python, "-m", "pushfw.worker", "--help", env=env.worker_env(backend))
        times.append(time.perf_counter() - started)
    return min(times)


def measure_reconcile(env: BenchEnv, backend: str, n: int) -> dict[str, Any]:
    """With the ledger holding N rules and no worker running: the managed rules flushed by
    hand (:meth:`bench.kernel.Kernel.flush`), then one-shot reconciles: empty -> N, no-op."""
    fw = kernel(env.ns, backend)
    fw.flush()
    if fw.drop_count() != 0:
        raise BenchError(f"{backend}: the kernel still holds drops after a flush")
    wall, drift = _reconcile_once(env, backend)
    after = fw.drop_count()
    if after != n or drift["added"] != n:
        raise BenchError(
            f"{backend}: reconcile added {drift['added']:.0f}, kernel holds {after}, not {n}"
        )
    noop_wall, noop = _reconcile_once(env, backend)
    startup = _startup_s(env, backend)
    return {
        "backend": backend,
        "flush": fw.flush_how,
        "n": n,
        "wall_s": wall,
        "noop_wall_s": noop_wall,
        "minus_noop_s": wall - noop_wall,
        "startup_s": startup,
        "minus_startup_s": wall - startup,
        "reported_s": drift["seconds"],
        "noop_reported_s": noop["seconds"],
        "added": int(drift["added"]),
        "kernel_rules_after": after,
    }


@dataclass
class TtlWatch:
    """Which timed rules are in the kernel, polled; when each one left.

    A rule left between the last snapshot that showed it and the first that did not; its
    departure is estimated as the midpoint (so the error is at most half a poll period),
    and the later snapshot's time is kept as an upper bound.
    """

    expires: dict[str, int]
    offset_ms: float
    fw: Kernel
    seen: set[str] = field(default_factory=set)
    gone_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    snapshots_ms: list[float] = field(default_factory=list)

    def poll(self) -> None:
        before = time.time()
        present = self.fw.drop_sources()
        snapshot_ms = (before + time.time()) / 2 * 1000 + self.offset_ms
        present &= self.expires.keys()
        previous = self.snapshots_ms[-1] if self.snapshots_ms else snapshot_ms
        self.snapshots_ms.append(snapshot_ms)
        self.seen |= present
        for rule in self.seen - present - self.gone_ms.keys():
            self.gone_ms[rule] = ((previous + snapshot_ms) / 2, snapshot_ms)

    def lags_ms(self, upper: bool = False) -> list[float]:
        return sorted(self.gone_ms[r][upper] - self.expires[r] for r in self.gone_ms)

    def periods_ms(self) -> list[float]:
        snaps = self.snapshots_ms
        return sorted(b - a for a, b in itertools.pairwise(snaps)) or [0.0]


def _cpu_s() -> float:
    """CPU time of this process and its finished children (the poll subprocesses)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _ttl_summary(
    watch: TtlWatch, ttls: Sequence[int], cpu_share: float, expired: int
) -> dict[str, Any]:
    n = len(watch.expires)
    lags = watch.lags_ms()
    upper = watch.lags_ms(upper=True)
    periods = watch.periods_ms()
    out: dict[str, Any] = {
        "backend": watch.fw.backend,
        "poll_tool": watch.fw.source_tool,
        "n": n,
        "ttl_s": [min(ttls), max(ttls)],
        "removed": len(lags),
        "never_seen": n - len(watch.seen),
        "reported_expired": expired,
        "still_present": len(watch.seen) - len(lags),
        "polls": len(watch.snapshots_ms),
        "poll_period_ms_p50": percentile(periods, 50),
        "poller_cpu_share": cpu_share,
    }
    if lags:
        out.update(
            {
                "p50_ms": percentile(lags, 50),
                "p99_ms": percentile(lags, 99),
                "max_ms": lags[-1],
                "min_ms": lags[0],
                "max_upper_bound_ms": upper[-1],
                "lags_ms": [round(lag, 1) for lag in lags],  # for bench.plot's distribution
            }
        )
    return out


def caught_up(env: BenchEnv) -> bool:
    """The host group has processed the whole stream, scheduler-made deletes included."""
    info: Any = env.client.xinfo_stream(env.keys.cmd)
    return processed(env, text(info["last-generated-id"]))


def count_results(env: BenchEnv, status: str) -> int:
    """Results with this status (the results stream is read whole: use on small runs)."""
    entries: Any = env.client.xrange(env.keys.results)
    return sum(1 for _, fields in entries if fields.get(b"status") == status.encode())


def measure_ttl(
    env: BenchEnv, backend: str, n: int, ttls: Sequence[int] = (2, 3, 4, 5)
) -> dict[str, Any]:
    """N timed drops (ttls taken in turn, seconds) to a ready worker of this backend; poll the
    kernel every ~20 ms; lag = left - expiry."""
    commands = [
        {"op": "ttl_drop_insert", "ip": address(i), "ttl": str(ttls[i % len(ttls)]), "reply": "1"}
        for i in range(n)
    ]
    offset = clock_offset_ms(env.client)
    ids = push(env, commands)
    expires = {
        c["ip"]: int(i.split("-")[0]) + int(c["ttl"]) * 1000
        for c, i in zip(commands, ids, strict=True)
    }
    watch = TtlWatch(expires, offset, kernel(env.ns, backend))
    last_expiry = max(expires.values())
    cpu_before, wall_before = _cpu_s(), time.perf_counter()
    while len(watch.gone_ms) < n:
        watch.poll()
        now_ms = time.time() * 1000 + offset
        if now_ms > last_expiry + 10_000:
            break
        if now_ms > last_expiry + 1000 and watch.seen <= watch.gone_ms.keys():
            break  # past every expiry a rule never seen cannot be applied any more
        time.sleep(0.02)
    cpu_share = (_cpu_s() - cpu_before) / (time.perf_counter() - wall_before)
    if not wait_until(lambda: caught_up(env), time.perf_counter() + 120, pause=0.05):
        raise BenchError("the worker did not catch up with the stream within 120 s")
    return _ttl_summary(watch, ttls, cpu_share, count_results(env, "expired"))


def redis_memory(env: BenchEnv, used_before: int) -> dict[str, Any]:
    """MEMORY USAGE of the ledger keys per active rule, and the used_memory delta."""
    client = env.client
    sizes = {}
    for name, key in (
        ("rules", env.keys.rules),
        ("expiry", env.keys.expiry),
        ("cmd_stream", env.keys.cmd),
        ("results_stream", env.keys.results),
    ):
        usage: Any = client.memory_usage(key, samples=0)
        sizes[name] = int(usage or 0)
    active = sum(
        1
        for _, raw in client.hscan_iter(env.keys.rules, count=1000)
        if b'"deleted":true' not in raw
    )
    markers = sum(1 for _ in client.scan_iter(match=f"{env.keys.ttl_marker_prefix}*", count=1000))
    delta = used_memory(env) - used_before
    ledger = sizes["rules"] + sizes["expiry"]
    return {
        "active_rules": active,
        "ttl_markers": markers,
        "key_bytes": sizes,
        "ledger_bytes_per_rule": ledger / active if active else None,
        "used_memory_delta": delta,
        "used_memory_delta_per_rule": delta / active if active else None,
    }
