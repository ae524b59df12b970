"""``pushfw list`` filters and ``pushfw remove`` in bulk, as real processes against a real
in-process worker (memory backend) and the session's redis-server."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from typing import Any

import redis

from pushfw.producer import Keys, Producer
from pushfw.worker import Worker
from pushfw.worker.backends.memory import MemoryBackend
from testbed.env import clean_env
from tests.conftest import RedisServer, Run, memory_worker

KEYS = Keys()
CROWDSEC = [f"198.51.100.{i}/32" for i in range(1, 8)]


def _ledger(r: redis.Redis, redis_server: RedisServer, producer: Producer) -> Worker:
    """Seven crowdsec bans, a manual one, an allow over them and a ban for web hosts only."""
    worker = memory_worker(redis_server, "web1", host_labels="web")
    worker.setup()
    for net in CROWDSEC:
        r.xadd(
            KEYS.cmd,
            {"op": "drop.insert", "ip": net, "origin": "crowdsec", "reason": "crowdsecurity/ssh"},
        )
    producer.drop("198.51.100.200", reason="manual", reply=False)
    producer.accept("198.51.100.0/24", reason="office", reply=False)
    producer.drop("192.0.2.0/24", target=["web"], reason="scan", reply=False)
    worker.run(burst=True)
    return worker


def _networks(out: str) -> list[str]:
    return [row["network"] for row in json.loads(out)]


def kernel(worker: Worker) -> set[str]:
    backend = worker.backend
    assert isinstance(backend, MemoryBackend)
    return {f"{rule.action} {rule.network}" for rule in backend.committed()}


def test_list_filters_select_what_an_operator_names(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Run
):
    _ledger(r, redis_server, producer)

    def listed(*args: str) -> list[str]:
        shown = pushfw("list", "--json", *args)
        assert shown.returncode == 0, shown.stderr
        return _networks(shown.stdout)

    assert len(listed()) == 10
    assert listed("--ip", "198.51.100.5") == ["198.51.100.0/24", "198.51.100.5/32"]
    assert listed("--ip", "198.51.100.5", "--action", "drop") == ["198.51.100.5/32"]
    assert listed("--origin", "crowdsec") == CROWDSEC
    assert listed("--origin", "crowdsec", "--limit", "2") == CROWDSEC[:2]
    assert listed("--reason", "manual") == ["198.51.100.200/32"]
    assert listed("--reason", "manu") == [], "a reason matches exactly"
    assert listed("--target", "web") == ["192.0.2.0/24"]
    assert len(listed("--target", "*")) == 9
    assert listed("--inside", "198.51.100.0/29", "--action", "drop") == CROWDSEC

    bad = pushfw("list", "--ip", "198.51.100.300")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("pushfw: Invalid value for '--ip': ")
    assert pushfw("list", "--limit", "0").returncode == 2
    mixed = pushfw("list", "--hits", "--origin", "crowdsec")
    assert (mixed.returncode, mixed.stderr) == (
        2,
        "pushfw: the filters go without --hits (--host, --top and --list go with it)\n",
    )


def test_remove_in_bulk_shows_first_asks_for_many_and_removes_only_what_it_showed(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Run
):
    worker = _ledger(r, redis_server, producer)

    vague = pushfw("remove")
    assert vague.returncode == 2
    assert vague.stderr == "pushfw: say which rules: --origin, --reason, --inside or --ip\n"

    dry = pushfw("remove", "--origin", "crowdsec", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert _networks(dry.stdout) == CROWDSEC
    text = pushfw("remove", "--origin", "crowdsec", "--dry-run")
    assert text.stderr == "would remove 7 rules (dry run)\n"
    assert len(text.stdout.splitlines()) == 8  # the header and the seven rules

    asked = pushfw("remove", "--origin", "crowdsec")  # not a terminal: nobody to ask
    assert asked.returncode == 2
    assert "7 rules match; add --yes" in asked.stderr
    worker.run(burst=True)
    assert len(producer.rules()) == 10, "nothing was sent"

    done = pushfw("remove", "--origin", "crowdsec", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout)
    assert [row["network"] for row in sent] == CROWDSEC and all(row["cmd"] for row in sent)
    worker.run(burst=True)
    assert {rec.network for rec in producer.rules()} == {
        "198.51.100.200/32",
        "198.51.100.0/24",
        "192.0.2.0/24",
    }
    assert kernel(worker) == {
        "drop 198.51.100.200/32",
        "accept 198.51.100.0/24",
        "drop 192.0.2.0/24",
    }

    # a few need no confirmation; --inside removes drops only unless told
    few = pushfw("remove", "--inside", "198.51.100.0/24")
    assert few.returncode == 0, few.stderr
    assert few.stdout.splitlines()[-1] == "removed 1 rule: 1 command sent"
    worker.run(burst=True)
    assert kernel(worker) == {"accept 198.51.100.0/24", "drop 192.0.2.0/24"}


def _at_a_terminal(url: str, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with a terminal for stdin, where ``answer`` is already typed."""
    main, terminal = pty.openpty()
    try:
        os.write(main, answer.encode())
        return subprocess.run(
            [sys.executable, "-m", "pushfw.producer", "--redis-url", url, *args],
            stdin=terminal,
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    finally:
        os.close(main)
        os.close(terminal)


def test_remove_at_a_terminal_asks_and_a_no_sends_nothing(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = _ledger(r, redis_server, producer)
    no = _at_a_terminal(redis_server.url, "n\n", "remove", "--reason", "crowdsecurity/ssh")
    assert no.returncode == 1, no.stderr
    assert "remove these 7 rules from every host? [y/N]" in no.stdout
    assert no.stderr == "nothing removed\n"
    worker.run(burst=True)
    assert len(producer.rules()) == 10

    yes = _at_a_terminal(redis_server.url, "y\n", "remove", "--reason", "crowdsecurity/ssh")
    assert yes.returncode == 0, yes.stderr
    # the typed answer echoes on the terminal, not on stdout: the prompt's line goes on
    assert yes.stdout.endswith("[y/N]: removed 7 rules: 7 commands sent\n")
    worker.run(burst=True)
    assert len(producer.rules()) == 3
