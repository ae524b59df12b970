"""Supervised roles: a role that fails is logged once, counted, retried, and reported; the
others go on. Real redis-server, real kernel tables, a real worker process; the faults are
real (an ACL that refuses one role's command) or injected into one role of an in-process
worker (a bug), never a fake Redis or kernel.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pushfw.producer import Producer
from pushfw.worker import Worker
from pushfw.worker.backoff import Backoff
from pushfw.worker.signals import ForceStop
from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, WorkerProcess, memory_worker, pushfw_cli, wait_for
from tests.test_applier import key

USER = "pushfw-notrim"


def test_a_role_refused_by_redis_is_reported_retried_and_the_others_go_on(
    netns: Netns,
    spawn_worker: Callable[..., WorkerProcess],
    redis_server: RedisServer,
    producer: Producer,
    r: Any,
):
    """An ACL without XTRIM (an old one, say) stops trimming only; status names it until fixed."""
    r.execute_command("ACL", "SETUSER", USER, "reset", "on", ">pw", "~*", "&*", "+@all", "-xtrim")
    url = redis_server.unix_url.replace("unix://", f"unix://{USER}:pw@", 1)
    worker = spawn_worker(
        netns, backend="nftables", redis_url=url, trim_interval_s="0.2", heartbeat_interval_s="1"
    ).start()

    def trimming() -> str:
        [host] = producer.hosts()
        return host.roles["trimming"].state

    wait_for(lambda: trimming() == "failing", 20, "trimming to fail")
    [host] = producer.hosts()
    assert host.roles["trimming"].error.startswith("NoPermissionError: ")
    assert [p for p in host.problems if p.startswith("trimming: failing since ")], host.problems
    assert {name for name, role in host.roles.items() if role.state != "ok"} == {"trimming"}

    drop = producer.drop("192.0.2.40")
    assert [x.status.value for x in producer.wait(drop)] == ["applied"]
    assert Firewall(netns, "nftables").rules() == {("drop", "192.0.2.40/32"): None}
    status = pushfw_cli(redis_server, "status")
    assert status.returncode == 0, status.stderr
    assert "DEGRADED" in status.stdout
    assert f"warning: {netns.name}: trimming: failing since " in status.stderr

    r.execute_command("ACL", "SETUSER", USER, "+xtrim")
    wait_for(lambda: trimming() == "ok", 60, "trimming to work again")
    [host] = producer.hosts()
    assert host.problems == []
    assert worker.stop() == 0
    failed_lines = [line for line in worker.log.splitlines() if "trimming failed (" in line]
    assert len(failed_lines) == 1, "one log line per failure streak, not one per try"
    assert "trimming works again after" in worker.log


def _break(worker: Worker, times: int) -> dict[str, int]:
    """Make the worker's ledger fold raise ``times`` times (a bug), then work again."""
    real_fold = worker.ledger.fold_new
    broken = {"left": times}

    def fold_with_a_bug(block_ms: int | None = None) -> int:
        if broken["left"]:
            broken["left"] -= 1
            raise KeyError("a bug")
        return real_fold(block_ms)

    worker.ledger.fold_new = fold_with_a_bug  # type: ignore[method-assign]
    return broken


@contextlib.contextmanager
def running(worker: Worker) -> Iterator[threading.Thread]:
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        yield runner
    finally:
        worker.request_stop()
        runner.join(timeout=20)
    assert not runner.is_alive()


def failures(worker: Worker, role: str) -> float | None:
    return worker.metrics.registry.get_sample_value("pushfw_role_failures_total", {"role": role})


def test_a_bug_in_one_role_costs_that_role_a_pass_not_the_worker(
    redis_server: RedisServer, producer: Producer
):
    """The ledger fold raises three times: the applier still applies, then the fold catches up."""
    worker = memory_worker(redis_server, heartbeat_interval_s=0.05)
    with running(worker) as runner:
        wait_for(lambda: [h.state for h in producer.hosts()] == ["running"], 20, "the worker")
        broken = _break(worker, 3)
        drop = producer.drop("192.0.2.41")
        assert [x.status.value for x in producer.wait(drop)] == ["applied"]
        assert key("drop", "192.0.2.41") in worker.backend.committed()
        wait_for(lambda: not broken["left"], 20, "the fold to have failed three times")
        wait_for(lambda: producer.rules(), 20, "the ledger to fold the drop once fixed")
        assert [rule.network for rule in producer.rules()] == ["192.0.2.41/32"]
        assert failures(worker, "ledger") == 3
        wait_for(lambda: not producer.hosts()[0].problems, 20, "the heartbeat to say all is well")
        assert runner.is_alive()


def test_a_start_that_fails_is_retried_and_says_why_meanwhile(
    redis_server: RedisServer, producer: Producer
):
    """Setup raises twice (a bug in its ledger catch-up): the heartbeat says so, then it starts."""
    producer.drop("192.0.2.42")  # before this host's group exists: it comes from the ledger
    worker = memory_worker(redis_server, heartbeat_interval_s=0.05)
    broken = _break(worker, 2)
    seen: list[list[str]] = []

    def failed_twice() -> bool:
        seen.extend(h.problems for h in producer.hosts())
        return not broken["left"]

    with running(worker):
        wait_for(failed_twice, 20, "the start to fail twice")
        wait_for(lambda: [h.state for h in producer.hosts()] == ["running"], 20, "the start")
        assert key("drop", "192.0.2.42") in worker.backend.committed()
    assert failures(worker, "startup") == 2
    assert any(p and p[0].startswith("startup: failing since ") for p in seen), seen


def test_retry_delays_double_within_their_upper_half_up_to_the_cap():
    backoff = Backoff(0.1, 0.8)
    ceilings = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    delays = [backoff.next_delay_s() for _ in ceilings]
    assert all(c / 2 <= d <= c for c, d in zip(ceilings, delays, strict=True)), delays
    backoff.reset()
    assert 0.05 <= backoff.next_delay_s() <= 0.1


def test_a_first_stop_signal_stops_reading_and_a_second_aborts(redis_server: RedisServer) -> None:
    """Two-stage stop: SIGTERM lets the batch in hand finish; SIGINT after it abandons it."""
    worker = memory_worker(redis_server)
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    try:
        worker.install_signal_handlers()
        signal.raise_signal(signal.SIGTERM)
        assert worker.reader.stopping, "the first signal stops reading"
        with pytest.raises(ForceStop):
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
