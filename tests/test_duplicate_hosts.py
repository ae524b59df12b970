"""Two workers with one host name (a cloned VM keeps its name) are found, not silently split.

Real ``pushfw-worker run`` processes (memory backend) against the session's redis-server,
each with a state directory of its own, as two machines would have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from pushfw.worker.cli import HOST_NAME_TAKEN
from tests.conftest import RedisServer, pushfw_cli, wait_for
from tests.daemon import Daemon, cli, worker_env

HOST = "web1"
UNIT = Path(__file__).parent.parent / "systemd" / "pushfw-worker.service"
TWIN_ERROR = f"another worker named {HOST} is live"


def machine(tmp_path: Path, name: str, server: RedisServer) -> dict[str, str]:
    """The environment of a worker named ``web1`` on machine ``name``."""
    config = tmp_path / name / "worker.toml"
    config.parent.mkdir()
    config.write_text("")
    return worker_env(
        config,
        redis_url=server.url,
        host_name=HOST,
        backend="memory",
        heartbeat_interval_s="0.5",
    )


def status_row(server: RedisServer) -> dict[str, Any]:
    shown = pushfw_cli(server, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    rows: list[dict[str, Any]] = json.loads(shown.stdout)
    assert [row["host"] for row in rows] == [HOST]
    return rows[0]


def errors(worker: Daemon) -> list[str]:
    return [
        json.loads(line)["message"]
        for line in worker.lines
        if line.startswith("{") and json.loads(line)["level"] == "ERROR"
    ]


def test_a_second_worker_of_a_live_host_name_refuses_to_start(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    with Daemon(machine(tmp_path, "a", redis_server)) as first:
        first.wait_line("ready: following")
        instance = status_row(redis_server)["instance"]

        refused = cli("run", env=machine(tmp_path, "b", redis_server))
        assert refused.returncode == HOST_NAME_TAKEN != 1, refused.stderr
        assert f"RestartPreventExitStatus=2 {HOST_NAME_TAKEN}\n" in UNIT.read_text()
        reason = [line for line in refused.stderr.splitlines() if "is taken" in line]
        assert reason == [
            line for line in refused.stderr.splitlines() if line.startswith("pushfw-worker:")
        ]
        assert len(reason) == 1, refused.stderr
        assert reason[0].startswith(f"pushfw-worker: host name {HOST} is taken: another worker")
        assert f"instance {instance}" in reason[0]
        assert "--take-over" in reason[0]
        assert "Traceback" not in refused.stderr

        row = status_row(redis_server)  # the refused worker left the live one's heartbeat alone
        assert (row["state"], row["instance"]) == ("ok", instance)
        assert first.proc is not None and first.proc.poll() is None
        assert errors(first) == []
        assert first.stop() == 0


def test_two_live_workers_of_one_name_are_an_error_in_both_and_duplicate_in_status(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    with Daemon(machine(tmp_path, "a", redis_server)) as first:
        first.wait_line("ready: following")
        with Daemon(machine(tmp_path, "b", redis_server), args=("--take-over",)) as second:
            second.wait_line("ready: following")
            assert "taking over host name web1 from a live worker" in second.output
            first.wait_line(TWIN_ERROR)
            second.wait_line(TWIN_ERROR)
            wait_for(lambda: status_row(redis_server)["state"] == "DUPLICATE", 15, "DUPLICATE")
            shown = pushfw_cli(redis_server, "status")
            assert f"warning: {HOST}: duplicate: {TWIN_ERROR}" in shown.stderr
            both = ("--wait", "--expect", "2", "--timeout", "2")  # one host, two machines
            waited = pushfw_cli(redis_server, "drop", "192.0.2.5", *both)
            assert waited.returncode == 5, waited.stderr
            assert [line for line in waited.stdout.splitlines() if line.startswith(HOST)]
            assert "pushfw: 1 of 2 results before the timeout" in waited.stderr
            assert f"pushfw: {HOST} is DUPLICATE: two live workers share" in waited.stderr
            assert second.stop() == 0
        first.wait_line(f"the other worker named {HOST}")
        wait_for(lambda: status_row(redis_server)["state"] == "ok", 15, "ok again")
        assert first.stop() == 0
    for worker in (first, second):
        assert sum(TWIN_ERROR in message for message in errors(worker)) == 1, worker.output


def test_a_worker_restarted_after_a_crash_is_no_twin_of_itself(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 leaves a fresh heartbeat; the same machine's next run starts at once."""
    env = machine(tmp_path, "a", redis_server)
    with Daemon(env) as crashed:
        crashed.wait_line("ready: following")
        crashed.kill9()
    with Daemon(env) as again:
        again.wait_line("ready: following")
        wait_for(lambda: status_row(redis_server)["state"] == "ok", 15, "ok")
        assert errors(again) == []
        assert again.stop() == 0
