"""What a new operator saw go wrong in the CLI (issue 12), as they see it now.

``pushfw status`` with no host, ``--wait`` for a target no live host matches, and counts
with their noun in the singular ("1 active rule", "0 of 1 result").
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
import redis

from pushfw.producer import Producer, parse_command
from pushfw.producer.cli import cli as pushfw_cli
from pushfw.producer.client import is_live, reaches
from pushfw.producer.connection import redis_ms
from pushfw.producer.records import HostStatus
from pushfw.producer.render import plural
from pushfw.worker.cli import main as worker_cli
from testbed.env import clean_env
from tests.conftest import RedisServer, Run, memory_worker, need, wait_for
from tests.test_cli import CMD, DEAD, HOSTS, RESULTS, beat, entries, one_line_error

NO_HOST = (
    "no host has reported to {pushfw}:hosts yet: is a pushfw-worker running against this Redis?"
)


def silent_host(client: redis.Redis, host: str, labels: list[str], silent_s: float) -> None:
    """A heartbeat last written ``silent_s`` ago (5 s interval: STALE after 15 s)."""
    status = HostStatus(
        host=host, labels=labels, last_seen_ms=redis_ms(client) - int(silent_s * 1000)
    )
    client.hset(HOSTS, host, status.model_dump_json())


# --- pushfw status with no host ---------------------------------------------------------


def test_status_without_hosts_says_so(pushfw: Run) -> None:
    """Not a bare header: one line naming the heartbeat key; exit 0, as for any listing."""
    proc = pushfw("status")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == NO_HOST + "\n"


def test_status_json_without_hosts_is_an_empty_list(pushfw: Run) -> None:
    proc = pushfw("status", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert proc.stderr == ""


# --- --wait for a target no live host matches -------------------------------------------


@pytest.fixture
def known_hosts(r: redis.Redis) -> None:
    """web1 (labels eu, web) runs; db1 stopped; gone1 (label web) fell silent 10 minutes ago."""
    beat(r, "web1", ("eu", "web"))
    beat(r, "db1", state="stopped")
    silent_host(r, "gone1", ["web"], 600)


@pytest.mark.usefixtures("known_hosts")
@pytest.mark.parametrize("target", ["nosuchhost", "db1", "gone1", "nosuchhost,db1"])
def test_wait_for_a_target_no_live_host_matches(pushfw: Run, r: redis.Redis, target: str) -> None:
    """Exit 3 at once with one line: the command id, the target, the hosts there are."""
    started = time.monotonic()
    proc = pushfw("drop", "192.0.2.1", "--target", target, "--wait", "--timeout", "60")
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 30, "it did not wait for the timeout"
    [(entry_id, _)] = entries(r, CMD)
    assert one_line_error(proc) == (
        f"pushfw: sent {entry_id.decode()}, but no live host matches target '{target}'; "
        "known hosts: db1 (stopped), gone1 [web] (STALE), web1 [eu,web]"
    )
    assert proc.stdout == ""


@pytest.mark.usefixtures("known_hosts")
def test_wait_json_for_a_target_no_live_host_matches(pushfw: Run) -> None:
    """``--json`` keeps its shape (a list of results, here none); the reason is on stderr."""
    proc = pushfw("accept", "192.0.2.1", "--target", "db", "--wait", "--json")
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout) == []
    assert "but no live host matches target 'db'; known hosts: db1 (stopped)," in proc.stderr


def test_wait_names_at_most_ten_hosts(pushfw: Run, r: redis.Redis) -> None:
    for i in range(12):
        beat(r, f"h{i:02}", state="stopped")
    proc = pushfw("undrop", "192.0.2.1", "--wait")
    assert proc.returncode == 3, proc.stderr
    assert one_line_error(proc).endswith(
        "no live host matches target '*'; known hosts: "
        + ", ".join(f"h{i:02} (stopped)" for i in range(10))
        + ", and 2 more (pushfw status)"
    )


def test_wait_for_a_label_gets_the_worker_s_result(
    r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A live host the target reaches by label: the CLI waits, the real worker answers."""
    worker = memory_worker(redis_server, "web1", host_labels="eu,web")
    worker.setup()  # its heartbeat says running
    silent_host(r, "gone1", ["eu"], 600)
    args = ["--redis-url", redis_server.url, "drop", "192.0.2.1", "--target", "eu", "--wait"]
    with subprocess.Popen(
        [sys.executable, "-m", "pushfw.producer", *args, "--timeout", "30", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    ) as cli:
        wait_for(lambda: r.exists(CMD) and r.xlen(CMD) == 1, what="the CLI to send its command")
        worker.run(burst=True)
        out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    [result] = json.loads(out)
    assert (result["host"], result["status"]) == ("web1", "applied")


TARGETS = [(), ("web1",), ("web",), ("eu", "nosuchhost"), ("db1",), ("nosuchhost",), ("web1x",)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: ",".join(t) or "*")
def test_reaches_is_the_contract_s_rule(target: tuple[str, ...]) -> None:
    """The producer's match is the one every worker applies (Command.targets)."""
    host = HostStatus(host="web1", labels=["eu", "web"], last_seen_ms=0)
    fields = {"op": "drop.insert", "ip": "192.0.2.1", "target": ",".join(target)}
    command = parse_command(fields)
    assert reaches(target, host) == command.targets(host.host, frozenset(host.labels))


def test_live_hosts(producer: Producer, r: redis.Redis) -> None:
    beat(r, "web1")
    beat(r, "db1", state="starting")
    beat(r, "old1", state="stopped")
    silent_host(r, "quiet1", [], 10)
    silent_host(r, "gone1", [], 16)
    now_ms = producer.now_ms()
    live = {h.host for h in producer.hosts() if is_live(h, now_ms)}
    assert live == {"web1", "db1", "quiet1"}


# --- one rule, not "1 rules" ------------------------------------------------------------


def test_plural() -> None:
    assert [plural(n, "rule") for n in (0, 1, 2)] == ["0 rules", "1 rule", "2 rules"]
    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(3, "entry", "entries") == "3 entries"


def test_list_counts_one_rule(pushfw: Run, producer: Producer, redis_server: RedisServer) -> None:
    producer.drop("192.0.2.1", reason="one")
    worker = memory_worker(redis_server, "web1")
    worker.setup()
    worker.run(burst=True)
    proc = pushfw("list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "1 active rule\n"
    proc = pushfw("list", "--host", "web1")
    assert proc.stderr == "1 active rule for web1\n"


# --- issue 23: the frictions an operator met ---------------------------------------------


def pushfw_stdin(server: RedisServer, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pushfw ARGS`` with ``text`` on its standard input, as a cron pipe runs it."""
    return subprocess.run(
        [sys.executable, "-m", "pushfw.producer", "--redis-url", server.url, *args],
        input=text,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


def test_import_from_stdin_needs_a_name(redis_server: RedisServer, r: redis.Redis) -> None:
    """Two cron jobs piping lists in must not both land on a default name: exit 2, one line."""
    proc = pushfw_stdin(redis_server, "192.0.2.0/24\n", "import", "-")
    assert proc.returncode == 2, proc.stderr
    assert one_line_error(proc) == "pushfw: a list read from stdin (-) needs --name"
    assert entries(r, CMD) == []
    proc = pushfw_stdin(redis_server, "192.0.2.0/24\n", "import", "-", "--name", "cron_a")
    assert proc.returncode == 0, proc.stderr
    [(_, fields)] = entries(r, CMD)
    assert fields[b"name"] == b"cron_a"


@pytest.mark.slow  # worker threads and 28 CLI processes: the full tier
def test_wait_names_the_host_that_did_not_answer(
    pushfw: Run, r: redis.Redis, redis_server: RedisServer
) -> None:
    """``--expect 2`` with web1 answering and web2 down: the count names web2 and its state."""
    worker = memory_worker(redis_server, "web1")
    silent_host(r, "web2", ["web"], 600)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: is_live(host_status(r, "web1"), redis_ms(r)), what="web1 live")
        proc = pushfw("drop", "192.0.2.1", "--wait", "--expect", "2", "--timeout", "10")
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stdout.splitlines()) == 2, (proc.stdout, proc.stderr)
    assert proc.stdout.splitlines()[1].split()[:2] == ["web1", "applied"]
    assert one_line_error(proc) == (
        "pushfw: 1 of 2 results before the timeout; no result from web2 [web] (STALE)"
    )


def host_status(client: redis.Redis, host: str) -> HostStatus:
    """``host``'s heartbeat; one stopped long ago if it has written none yet."""
    raw = client.hget(HOSTS, host)
    return HostStatus.model_validate_json(raw) if raw else HostStatus(host=host, last_seen_ms=0)


def test_expect_zero_says_it_waited_for_nothing(pushfw: Run, r: redis.Redis) -> None:
    beat(r, "web1")
    proc = pushfw("drop", "192.0.2.1", "--wait", "--expect", "0")
    assert proc.returncode == 0, proc.stderr
    [(entry_id, _)] = entries(r, CMD)
    assert proc.stdout == entry_id.decode() + "\n"
    assert proc.stderr == (
        f"pushfw: --expect 0: waited for no result (pushfw results --cmd {entry_id.decode()})\n"
    )
    proc = pushfw("drop", "192.0.2.1", "--wait", "--expect", "-1")
    assert proc.returncode == 2, proc.stderr


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("drop", "127.0.0.1"), "127.0.0.1/32 covers loopback, which no host drops"),
        (("drop", "::1"), "::1/128 covers loopback, which no host drops"),
        (
            ("drop", "10.0.0.0/7"),
            "10.0.0.0/7 is wider than /8, the widest network a drop may cover by default "
            "(min_drop_prefix_v4); hosts refuse it",
        ),
        (
            ("accept", "2000::/15"),
            "2000::/15 is wider than /16, the widest network an accept may cover by default "
            "(min_accept_prefix_v6); hosts refuse it",
        ),
    ],
)
def test_a_rule_every_default_host_refuses_is_warned_about(
    pushfw: Run, r: redis.Redis, args: tuple[str, ...], why: str
) -> None:
    """Sent all the same (a host may be configured wider), but not without a word."""
    proc = pushfw(*args)
    assert proc.returncode == 0, proc.stderr
    [(entry_id, _)] = entries(r, CMD)
    assert proc.stdout == entry_id.decode() + "\n"
    assert proc.stderr == f"pushfw: warning: {why} (sent all the same)\n"


@pytest.mark.parametrize(
    "args", [("drop", "10.0.0.0/8"), ("drop", "128.0.0.1"), ("undrop", "127.0.0.1")]
)
def test_a_rule_hosts_take_is_sent_without_a_warning(pushfw: Run, args: tuple[str, ...]) -> None:
    proc = pushfw(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_drop_help_says_a_rule_without_ttl_is_permanent(pushfw: Run) -> None:
    proc = pushfw("drop", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "without it a drop is permanent" in " ".join(proc.stdout.split())


def test_a_configured_default_ttl(pushfw: Run, r: redis.Redis, producer: Producer) -> None:
    """PUSHFW_DEFAULT_TTL or --default-ttl times a drop sent without --ttl; --ttl wins, and
    --ttl never keeps one permanent. Accepts stay as given."""
    env = {"PUSHFW_DEFAULT_TTL": "1d"}
    assert pushfw("drop", "192.0.2.1", env=env).returncode == 0
    assert pushfw("drop", "192.0.2.2", "--ttl", "10m", env=env).returncode == 0
    assert pushfw("drop", "192.0.2.3", "--ttl", "never", env=env).returncode == 0
    assert pushfw("--default-ttl", "2h", "drop", "192.0.2.4").returncode == 0
    assert pushfw("accept", "192.0.2.5", env=env).returncode == 0
    assert pushfw("drop", "192.0.2.6").returncode == 0
    sent = {str(c.network): c.ttl_s for c in (parse_command(f) for _, f in entries(r, CMD))}
    assert sent == {
        "192.0.2.1/32": 86400,
        "192.0.2.2/32": 600,
        "192.0.2.3/32": None,
        "192.0.2.4/32": 7200,
        "192.0.2.5/32": None,
        "192.0.2.6/32": None,
    }
    bad = pushfw("drop", "192.0.2.7", env={"PUSHFW_DEFAULT_TTL": "soon"})
    assert bad.returncode == 2, bad.stderr
    assert r.xlen(CMD) == 6


def _bad_inputs(tmp: Path) -> list[tuple[str, ...]]:
    """For every command, input it cannot act on: each must exit 2 with nothing sent."""
    (tmp / "bad.txt").write_text("192.0.2.0/24\nnot-an-address\n")
    (tmp / "empty.txt").write_text("# nothing today\n")
    return [
        ("nosuchcommand",),
        ("--redis-url-file", str(tmp / "missing"), "status"),
        ("--default-ttl", "soon", "drop", "192.0.2.1"),
        ("drop", "not-an-ip"),
        ("drop", "192.0.2.1", "--ttl", "0"),
        ("drop", "192.0.2.1", "--target", "bad name!"),
        ("accept", "192.0.2.1", "--expect", "many"),
        ("undrop", "192.0.2.1", "--ttl", "1h"),
        ("unaccept",),
        ("results", "--cmd", "yesterday"),
        ("results", "--count", "0"),
        ("dead", "--count", "-1"),
        ("list", "--top", "3"),
        ("list", "--ip", "bad"),
        ("why", "not-an-ip"),
        ("remove",),
        ("import", str(tmp / "missing.txt")),
        ("import", str(tmp / "bad.txt"), "--name", "bad"),
        ("import", str(tmp / "empty.txt")),
        ("import", str(tmp / "empty.txt"), "--name", "Bad-Name"),
        ("import", "-"),
        ("lists", "remove", "nosuch"),
        ("hosts", "forget", "nosuch"),
        ("status", "--check", "--json"),
        ("redis-functions", "nosuch"),
        ("acl", "--producer-password", "p"),
        ("crowdsec", "--lapi-url", "ftp://lapi", "--api-key", "k", "--once"),
        ("crowdsec", "--once"),
    ]


@pytest.mark.slow  # worker threads and 28 CLI processes: the full tier
def test_bad_input_exits_2_in_every_command(pushfw: Run, r: redis.Redis, tmp_path: Path) -> None:
    """docs/producers.md, exit status: bad input is 2 whatever the command, one line, and
    nothing is sent."""
    for args in _bad_inputs(tmp_path):
        proc = pushfw(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert proc.stderr.splitlines()[-1].startswith("pushfw: "), (args, proc.stderr)
    assert r.xlen(CMD) == 0


def _commands(
    command: click.Command, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


@pytest.mark.parametrize(("root", "name"), [(pushfw_cli, "pushfw"), (worker_cli, "pushfw-worker")])
def test_every_option_has_help(root: click.Command, name: str) -> None:
    """``--help`` explains every option of every command of both CLIs."""
    bare = [
        f"{' '.join(path)} {param.opts[0]}"
        for path, command in _commands(root, (name,))
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert bare == []


def test_help_as_the_operator_reads_it(pushfw: Run) -> None:
    proc = pushfw("import", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert (
        "--action [drop|accept|watch] What every entry of the list does on the hosts "
        "(watch: count only, shadow mode)." in text
    )
    assert "--timeout DURATION With --wait: how long to wait" in text


def test_list_and_lists_say_what_the_ledger_does_not_hold_yet(
    pushfw: Run, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Before any worker ran, and again while the workers are behind: the count of commands
    not yet folded, instead of a silent empty table."""
    unfolded = (
        "pushfw: {} not yet folded into the ledger, so not shown "
        "(a running pushfw-worker folds them: pushfw status)"
    )
    assert pushfw("drop", "192.0.2.1").returncode == 0
    feed = tmp_path / "feed.txt"
    feed.write_text("198.51.100.0/24\n")
    assert pushfw("import", str(feed)).returncode == 0
    listed = pushfw("list")
    assert listed.stdout.split()[0] == "ACTION", "a header, and no rule under it"
    assert len(listed.stdout.splitlines()) == 1
    assert listed.stderr.splitlines() == ["0 active rules", unfolded.format("2 commands")]
    assert pushfw("lists").stderr.splitlines()[-1] == unfolded.format("2 commands")
    worker = memory_worker(redis_server, "web1")
    worker.setup()
    worker.run(burst=True)
    listed = pushfw("list")
    assert listed.stderr == "1 active rule\n"
    assert "not yet folded" not in pushfw("lists", "--json").stderr
    assert pushfw("undrop", "192.0.2.1").returncode == 0
    behind = pushfw("list", "--json")
    assert len(json.loads(behind.stdout)) == 1
    assert behind.stderr == unfolded.format("1 command") + "\n"


def test_one_time_format_and_tables_say_utc(
    pushfw: Run, r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Every point in time of every --json listing is ISO 8601 UTC beside its epoch ms; the
    tables that show dates say UTC in their header."""
    assert pushfw("drop", "192.0.2.1", "--ttl", "1h", "--reason", "r").returncode == 0
    feed = tmp_path / "feed.txt"
    feed.write_text("198.51.100.0/24\n")
    assert pushfw("import", str(feed), "--ttl", "2h").returncode == 0
    worker = memory_worker(redis_server, "web1")
    worker.setup()
    worker.run(burst=True)
    r.xadd(RESULTS, {"cmd": "1-0", "host": "web1", "status": "failed", "detail": "d"})
    r.xadd(DEAD, {"cmd": "1-0", "host": "web1", "op": "drop.insert", "ip": "192.0.2.9"})
    points = {
        "time": "time_ms",
        "set_at": "set_ms",
        "expires_at": "expires_ms",
        "last_seen": "last_seen_ms",
        "started": "started_ms",
    }
    seen = set()
    for command in ("list", "lists", "results", "dead", "status"):
        proc = pushfw(command, "--json")
        assert proc.returncode == 0, proc.stderr
        [row] = json.loads(proc.stdout)
        for key, ms_key in points.items():
            if key in row:
                seen.add(key)
                when = datetime.fromtimestamp(row[ms_key] / 1000, UTC)
                iso = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                assert row[key] == iso, (command, key)
    assert seen == set(points)
    for command, header in (
        ("list", "SET_AT_UTC"),
        ("lists", "SET_AT_UTC"),
        ("results", "TIME_UTC"),
        ("dead", "TIME_UTC"),
    ):
        assert header in pushfw(command).stdout.splitlines()[0].split(), command


def test_demo_shows_the_table_once_then_what_changed(netns_capable: bool) -> None:
    """scripts/demo as a person runs it: the kernel table in full once, then only the lines
    its commands added and the expiry removed."""
    need(netns_capable, "network namespaces (root)")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in clean_env().items() if k != "PUSHFW_BACKEND"}
    proc = subprocess.run(
        [str(root / "scripts" / "demo")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("== kernel table before ==") == 1
    assert out.count("table inet pushfw {") + out.count("-- iptables-legacy") == 1
    changed = out.split("== kernel table: what the commands changed (+ added, - removed) ==")[1]
    added = changed.split("\n== ")[0].splitlines()
    assert any(line.startswith("+") and "203.0.113.9" in line for line in added), changed
    expired = out.split("== waiting 7 s: the 5 s and 4 s rules expire ==")[1].split("\n== ")[0]
    assert any(line.startswith("-") and "192.0.2.7" in line for line in expired.splitlines())
    assert "-> the timed rules are gone; the permanent ones stay" in expired
