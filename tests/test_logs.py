"""Structured logs: JSON lines when not on a terminal, text on one, never a secret."""

from __future__ import annotations

import json
import logging
import os
import pty
import subprocess
import sys
from pathlib import Path

import redis

from pushfw.producer import Producer
from pushfw.worker.config import secrets_of
from pushfw.worker.log import JsonFormatter, TextFormatter, syslog_priority
from pushfw.worker.settings import WorkerSettings
from tests.conftest import RedisServer
from tests.daemon import Daemon, cli, worker_env

SNIPPET = """
import logging
from pushfw.worker import log
log.setup({fmt!r})
logging.getLogger("pushfw.worker.test").info("batch of %d", 3, extra={{"batch": 3}})
"""


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("pushfw.worker.x", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_the_fields_and_the_extras() -> None:
    line = JsonFormatter().format(record("redis unavailable (%s)", "refused", host="h1"))
    doc = json.loads(line)
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "pushfw.worker.x"
    assert doc["message"] == "redis unavailable (refused)"
    assert doc["host"] == "h1"
    assert doc["time"].endswith("+00:00")


def test_exception_is_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_formatters_scrub_secrets() -> None:
    secret = 'pa"ss'  # JSON escapes the quote: both spellings must go
    for formatter in (JsonFormatter([secret]), TextFormatter([secret])):
        line = formatter.format(record("url redis://:%s@h/0", secret, token=secret))
        assert secret not in line
        assert 'pa\\"ss' not in line
        assert line.count("***") == 2


def test_journal_prefix_on_every_line_of_a_text_traceback() -> None:
    """journald reads the priority line by line: a traceback's lines keep the record's."""
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = TextFormatter(journal=True).format(rec).split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines)
    assert JsonFormatter(journal=True).format(record("w")).startswith('<4>{"time": ')
    assert [syslog_priority(n) for n in (5, 10, 20, 30, 40, 50)] == [7, 7, 6, 4, 3, 2]


def run_snippet(fmt: str, tty: bool) -> str:
    """Run the snippet with stderr on a pipe, or on a real pseudo-terminal."""
    code = SNIPPET.format(fmt=fmt)
    if not tty:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return done.stderr
    leader, follower = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", code], stderr=follower, timeout=30, check=True)
        return os.read(leader, 65536).decode()
    finally:
        os.close(leader)
        os.close(follower)


def test_auto_is_json_on_a_pipe_and_text_on_a_terminal() -> None:
    piped = run_snippet("auto", tty=False)
    assert json.loads(piped)["message"] == "batch of 3"
    assert json.loads(piped)["batch"] == 3
    on_tty = run_snippet("auto", tty=True)
    assert "INFO pushfw.worker.test: batch of 3 batch=3" in on_tty
    assert not on_tty.startswith("{")
    assert run_snippet("text", tty=False).rstrip().endswith("batch of 3 batch=3")
    assert json.loads(run_snippet("json", tty=True))["level"] == "INFO"


def test_the_redis_password_never_appears(aof_redis: RedisServer, tmp_path: Path) -> None:
    """A worker whose Redis needs a password: its whole output, debug included, greps clean."""
    admin = redis.Redis(unix_socket_path=str(aof_redis.socket_path))
    admin.config_set("requirepass", "s3cret")
    admin.close()
    url = f"redis://:s3cret@127.0.0.1:{aof_redis.port}/0"
    config = tmp_path / "worker.toml"
    config.write_text(f'redis_url = "{url}"\n')
    env = worker_env(config, host_name="log1", backend="memory")

    checked = cli("check-config", env=env)
    assert checked.returncode == 0
    assert f"redis://:***@127.0.0.1:{aof_redis.port}/0" in checked.stdout

    producer = Producer.from_url(url)
    with Daemon(env, verbose=True) as worker:
        worker.wait_line("ready: following")
        assert producer.wait(producer.drop("192.0.2.1", reason="s3cret is not logged"))
        aof_redis.stop()  # the outage is logged with the error text
        worker.wait_line("redis unavailable")
        assert worker.stop() == 0
    producer.client.close()

    output = checked.stdout + checked.stderr + worker.output
    assert "s3cret" not in output
    assert "redis://:***@127.0.0.1" in worker.output
    # Every line is one JSON object (stderr is a pipe: auto means JSON); state changes say so.
    states = [json.loads(line).get("state") for line in worker.lines]
    assert [s for s in states if s] == [
        "starting",
        "following",
        "redis_down",
        "stopping",
        "stopped",
    ]


def test_the_read_url_password_never_appears(
    r: redis.Redis, redis_server: RedisServer, aof_redis: RedisServer, tmp_path: Path
) -> None:
    """A follower whose replica needs a password: check-config (which the unit runs at every
    start) and the worker's whole output show the read_url masked, never its password."""
    admin = redis.Redis(unix_socket_path=str(aof_redis.socket_path))
    admin.config_set("requirepass", "r3pl1ca-pw")
    admin.close()
    read_url = f"redis://:r3pl1ca-pw@127.0.0.1:{aof_redis.port}/0"
    masked_url = f"redis://:***@127.0.0.1:{aof_redis.port}/0"
    assert "r3pl1ca-pw" in secrets_of(WorkerSettings(read_url=read_url))
    config = tmp_path / "worker.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\nread_url = "{read_url}"\n')
    env = worker_env(config, host_name="log2", backend="memory")

    table = cli("check-config", env=env)
    as_json = cli("check-config", "--json", env=env)
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr
    assert masked_url in table.stdout
    assert json.loads(as_json.stdout)["settings"]["read_url"] == masked_url

    with Daemon(env, verbose=True) as worker:
        worker.wait_line("ready: following")  # after naming the replica it cannot use
        assert worker.stop() == 0
    output = table.stdout + table.stderr + as_json.stdout + as_json.stderr + worker.output
    assert "r3pl1ca-pw" not in output
    assert f"replica {masked_url} cannot be read" in worker.output
    assert f"via {masked_url}" in worker.output


def test_journald_reads_each_lines_priority(aof_redis: RedisServer, tmp_path: Path) -> None:
    """Under systemd (stderr is the stream JOURNAL_STREAM names) every line starts with its
    syslog priority, so ``journalctl -p warning`` finds the warnings; elsewhere none does."""
    config = tmp_path / "worker.toml"
    config.write_text(f'redis_url = "{aof_redis.url}"\n')
    env = worker_env(config, host_name="journal1", backend="memory")
    elsewhere = {**env, "JOURNAL_STREAM": "1:2"}  # inherited, but stderr is another pipe
    with Daemon(elsewhere, verbose=True) as plain:
        plain.wait_line("ready: following")
        assert plain.stop() == 0
    assert plain.lines and all(json.loads(line)["level"] for line in plain.lines)

    producer = Producer.from_url(aof_redis.url)
    with Daemon(env, verbose=True, journal=True) as worker:
        worker.wait_line("ready: following")
        assert producer.wait(producer.drop("192.0.2.1"))  # DEBUG lines, one per rule
        producer.client.close()
        aof_redis.stop()  # a warning
        worker.wait_line("redis unavailable")
        assert worker.stop() == 0
    seen = set()
    for line in worker.lines:
        assert line.startswith("<") and line[2] == ">", line
        level = json.loads(line[3:])["level"]
        assert int(line[1]) == syslog_priority(getattr(logging, level)), line
        seen.add(line[:3])
    assert {"<7>", "<6>", "<4>"} <= seen

    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    refused = Daemon(worker_env(bad), journal=True).start()
    assert refused.proc is not None
    refused.proc.wait(timeout=60)
    assert refused.stop() == 2
    assert refused.lines and all(line.startswith("<3>pushfw-worker: ") for line in refused.lines)
