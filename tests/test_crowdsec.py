"""The CrowdSec bridge (``pushfw crowdsec``) against a real CrowdSec Local API.

Each test runs its own LAPI from the Debian package (``crowdsec -no-cs -no-capi``: the API
server only, no agent, no Central API) with a configuration and a sqlite database in a
temporary directory, listening on 127.0.0.1 inside a network namespace that the test makes
and deletes. ``cscli`` (inside the namespace too) registers the bouncer and adds and deletes
decisions; the bridge runs as the real ``pushfw`` CLI inside the namespace and reaches the
session's redis-server through its unix socket.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis

from pushfw.producer.contract import Command, Op, parse_command
from pushfw.producer.crowdsec import Decision, _reason, parse_go_duration
from pushfw.producer.journal import syslog_priority
from tests.conftest import Netns, RedisServer, need, wait_for

CMD = "{pushfw}:cmd"
LAPI_URL = "http://127.0.0.1:8080"

CONFIG = """\
common:
  daemonize: false
  log_media: stdout
  log_level: info
  working_dir: {tmp}
config_paths:
  config_dir: {tmp}/
  data_dir: {tmp}/data/
  simulation_path: {tmp}/simulation.yaml
  hub_dir: {tmp}/hub/
  index_path: {tmp}/hub/.index.json
  notification_dir: {tmp}/notifications/
  plugin_dir: /usr/lib/crowdsec/plugins/
crowdsec_service:
  acquisition_path: {tmp}/acquis.yaml
db_config:
  log_level: info
  type: sqlite
  db_path: {tmp}/data/crowdsec.db
  use_wal: false
api:
  client:
    credentials_path: {tmp}/local_api_credentials.yaml
  server:
    log_level: info
    listen_uri: 127.0.0.1:8080
    profiles_path: {tmp}/profiles.yaml
    trusted_ips:
      - 127.0.0.1
prometheus:
  enabled: false
"""

PROFILES = """\
name: default_ip_remediation
filters:
 - Alert.Remediation == true && Alert.GetScope() == "Ip"
decisions:
 - type: ban
   duration: 4h
on_success: break
"""


@dataclass
class Lapi:
    """A CrowdSec Local API of the test's own, in a namespace; ``key`` is a bouncer's."""

    ns: Netns
    tmp: Path
    proc: subprocess.Popen[bytes] | None = None
    key_file: Path | None = None

    @property
    def config(self) -> str:
        return str(self.tmp / "config.yaml")

    def cscli(self, *args: str) -> str:
        done = self.ns.run("cscli", "-c", self.config, *args, check=False)
        if done.returncode != 0:
            pytest.fail(f"cscli {' '.join(args)}: {done.stderr}{done.stdout}")
        return done.stdout

    def start(self) -> None:
        argv = ["crowdsec", "-c", self.config, "-no-cs", "-no-capi"]
        with (self.tmp / "lapi.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns.name, *argv], stdout=log, stderr=subprocess.STDOUT
            )
        probe = "import socket; socket.create_connection(('127.0.0.1', 8080), 1).close()"

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"crowdsec exited: {(self.tmp / 'lapi.log').read_text()[-3000:]}")
            return self.ns.run(sys.executable, "-c", probe, check=False).returncode == 0

        wait_for(listening, timeout=20, what="the CrowdSec LAPI to listen")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.proc = None


@pytest.fixture
def lapi(make_netns: Callable[[], Netns], tmp_path: Path) -> Iterator[Lapi]:
    need(
        shutil.which("crowdsec") is not None and shutil.which("cscli") is not None,
        "crowdsec is not installed (Debian: apt-get install crowdsec)",
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub/.index.json").write_text("{}")
    (tmp_path / "config.yaml").write_text(CONFIG.format(tmp=tmp_path))
    (tmp_path / "profiles.yaml").write_text(PROFILES)
    (tmp_path / "simulation.yaml").write_text("simulation: off\n")
    server = Lapi(make_netns(), tmp_path)
    creds = str(tmp_path / "local_api_credentials.yaml")
    server.cscli("machines", "add", "pushfw-test", "--auto", "-f", creds)
    key = server.cscli("bouncers", "add", "pushfw", "-o", "raw").strip()
    server.key_file = tmp_path / "bouncer.key"
    server.key_file.write_text(key + "\n")
    server.start()
    yield server
    if server.proc is not None:
        server.stop()


def bridge_argv(redis_server: RedisServer, key_file: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "pushfw.producer", "--redis-url", redis_server.unix_url),
        *("crowdsec", "--lapi-url", LAPI_URL, "--api-key-file", str(key_file), *extra),
    ]


def once(lapi: Lapi, redis_server: RedisServer) -> str:
    """``pushfw crowdsec --once`` in the LAPI's namespace; its log line."""
    assert lapi.key_file is not None
    done = lapi.ns.run(*bridge_argv(redis_server, lapi.key_file, "--once"), check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr


class Stream:
    """Reads the command stream from where the last read ended."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.last = "0"

    def new(self) -> list[Command]:
        start = f"({self.last}" if self.last != "0" else "-"
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.r.xrange(CMD, start, "+"))
        if entries:
            self.last = entries[-1][0].decode()
        return [parse_command(fields) for _, fields in entries]


def ops(commands: list[Command]) -> set[tuple[str, str]]:
    return {(c.op.value, str(c.network)) for c in commands}


# A LAPI gone wrong: the real LAPI's answers, each with these decisions added to "new".
HOSTILE_PROXY = """
import json, sys, urllib.request, urllib.error
from http.server import BaseHTTPRequestHandler, HTTPServer

EXTRA = json.loads(sys.argv[2])

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        forward = urllib.request.Request(
            "http://127.0.0.1:8080" + self.path,
            headers={k: v for k, v in self.headers.items() if k.lower() == "x-api-key"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(forward, timeout=10) as reply:
                code, body = reply.status, json.loads(reply.read())
                body["new"] = (body.get("new") or []) + EXTRA
                out = json.dumps(body).encode()
        except urllib.error.HTTPError as exc:
            code, out = exc.code, exc.read()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

HOSTILE = [
    {
        "id": 9_000_001,
        "type": "ban",
        "scope": "Ip",
        "value": "192.0.2.51",
        "duration": "9" * 310 + "s",
    },
    {"id": "not-a-number", "type": "ban", "scope": "Ip", "value": "192.0.2.52", "duration": "1h"},
    {"id": 9_000_003, "type": "ban", "scope": "Ip", "value": "192.0.2.53", "duration": 3600},
    {"id": 9_000_004, "type": "ban", "scope": "Ip", "value": "192.0.2.999", "duration": "1h"},
    {"id": -5, "type": "ban", "scope": "Ip", "value": "192.0.2.55", "duration": "1h"},
    "not a decision",
]


@pytest.fixture
def hostile_lapi(lapi: Lapi) -> Iterator[str]:
    """The URL of a proxy, in the LAPI's namespace, that adds :data:`HOSTILE` to every pull."""
    script = lapi.tmp / "hostile.py"
    script.write_text(HOSTILE_PROXY)
    argv = [sys.executable, str(script), "8081", json.dumps(HOSTILE)]
    proc = subprocess.Popen(["ip", "netns", "exec", lapi.ns.name, *argv])
    probe = "import socket; socket.create_connection(('127.0.0.1', 8081), 1).close()"
    try:

        def listening() -> bool:
            assert proc.poll() is None, "the hostile proxy exited"
            return lapi.ns.run(sys.executable, "-c", probe, check=False).returncode == 0

        wait_for(listening, what="the hostile proxy to listen")
        yield "http://127.0.0.1:8081"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bad_decisions_are_skipped_one_by_one_never_the_pull(
    lapi: Lapi, hostile_lapi: str, r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A duration of 310 digits, a non-integer id, a wrong type, a bad address: each is
    logged and skipped; the good decisions of the same pull, and every later pull, go through
    (a restarted bridge too)."""
    assert lapi.key_file is not None
    lapi.cscli("decisions", "add", "--ip", "192.0.2.7", "--duration", "1h")
    stream = Stream(r)
    argv = bridge_argv(redis_server, lapi.key_file, "--once", "--lapi-url", hostile_lapi)
    for _ in range(2):  # the second start meets the same decisions again
        done = lapi.ns.run(*argv, check=False)
        assert done.returncode == 0, done.stderr
        assert "skipped 6 invalid" in done.stderr, done.stderr
        assert "decision 9000001 skipped: " in done.stderr
        assert "decision 'not-a-number' skipped: id: " in done.stderr
    assert ops(stream.new()) == {("drop.insert", "192.0.2.7/32")}

    log_path = tmp_path / "bridge.log"
    follow = bridge_argv(redis_server, lapi.key_file, "--interval", "1", "--lapi-url", hostile_lapi)
    with log_path.open("wb") as out:
        bridge = subprocess.Popen(
            ["ip", "netns", "exec", lapi.ns.name, *follow], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        lapi.cscli("decisions", "add", "--ip", "192.0.2.9", "--duration", "1h")
        seen: list[Command] = []

        def arrived() -> bool:
            assert bridge.poll() is None, log_path.read_text()
            seen.extend(stream.new())
            return ("drop.insert", "192.0.2.9/32") in ops(seen)

        wait_for(arrived, what=f"the delta's ban; bridge log:\n{log_path.read_text()}")
    finally:
        bridge.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=20)
    log = log_path.read_text()
    assert code == 0, log
    assert "pull failed" not in log and "Traceback" not in log
    assert ops(seen) == {("drop.insert", "192.0.2.9/32")}

    # The bridge's own state in Redis is input too: a record it cannot read is a ban that ended.
    r.hset("{pushfw}:crowdsec", mapping={"192.0.2.7": "garbage", "198.51.100.1": '{"id": "x"}'})
    done = lapi.ns.run(*argv, check=False)
    assert done.returncode == 0, done.stderr
    assert "state of 198.51.100.1 unreadable, taken as ended" in done.stderr
    assert ops(stream.new()) == {("drop.insert", "192.0.2.7/32")}  # sent again, not lifted
    assert not r.hexists("{pushfw}:crowdsec", "198.51.100.1")


def test_bridge_sends_startup_pull_then_only_differences(
    lapi: Lapi, r: redis.Redis, redis_server: RedisServer
) -> None:
    """Bans become timed drops; a restarted bridge sends only what changed meanwhile."""
    lapi.cscli("decisions", "add", "--ip", "192.0.2.7", "--duration", "1h", "--reason", "ssh-bf")
    lapi.cscli("decisions", "add", "--range", "198.51.100.0/24", "--duration", "2h")
    lapi.cscli("decisions", "add", "--ip", "192.0.2.8", "--duration", "1h", "--type", "captcha")
    stream = Stream(r)

    log = once(lapi, redis_server)
    assert "sent 2 drop.insert, 0 drop.delete" in log and "skipped 1 type captcha" in log
    sent = {str(c.network): c for c in stream.new()}
    assert set(sent) == {"192.0.2.7/32", "198.51.100.0/24"}
    single = sent["192.0.2.7/32"]
    assert single.op is Op.DROP_INSERT and single.origin == "crowdsec"
    assert single.ttl_s is not None and 3590 <= single.ttl_s <= 3600
    assert single.reason == "crowdsec cscli: ssh-bf"
    network = sent["198.51.100.0/24"]
    assert network.ttl_s is not None and 7190 <= network.ttl_s <= 7200
    assert network.reason.startswith("crowdsec cscli: manual 'ban'")

    assert "sent 0 drop.insert, 0 drop.delete" in once(lapi, redis_server)
    assert stream.new() == []  # a restarted bridge repeats nothing

    lapi.cscli("decisions", "delete", "--ip", "192.0.2.7")
    lapi.cscli("decisions", "add", "--ip", "2001:db8::5", "--duration", "30m")
    once(lapi, redis_server)
    assert ops(stream.new()) == {
        ("drop.delete", "192.0.2.7/32"),
        ("drop.insert", "2001:db8::5/128"),
    }

    bad = lapi.tmp / "bad.key"
    bad.write_text("not-a-key")
    done = lapi.ns.run(*bridge_argv(redis_server, bad, "--once"), check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].endswith("refused the API key (HTTP 403)")
    assert stream.new() == []


def test_bridge_follows_deltas_and_survives_a_lapi_restart(
    lapi: Lapi, r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Deltas are sent once each; across a LAPI restart nothing is repeated or lost."""
    assert lapi.key_file is not None
    lapi.cscli("decisions", "add", "--ip", "192.0.2.7", "--duration", "1h")
    lapi.cscli("decisions", "add", "--ip", "192.0.2.30", "--duration", "3s")  # ends by itself
    stream = Stream(r)
    log_path = tmp_path / "bridge.log"
    argv = bridge_argv(redis_server, lapi.key_file, "--interval", "1")
    with log_path.open("wb") as out:
        bridge = subprocess.Popen(
            ["ip", "netns", "exec", lapi.ns.name, *argv], stdout=out, stderr=subprocess.STDOUT
        )
    seen: list[Command] = []

    def until(expected: set[tuple[str, str]], what: str) -> None:
        def arrived() -> bool:
            assert bridge.poll() is None, log_path.read_text()
            seen.extend(stream.new())
            return expected <= ops(seen)

        wait_for(arrived, timeout=15, what=f"{what}; bridge log:\n{log_path.read_text()}")

    try:
        until({("drop.insert", "192.0.2.7/32"), ("drop.insert", "192.0.2.30/32")}, "startup")
        lapi.cscli("decisions", "add", "--ip", "192.0.2.9", "--duration", "1h")
        until({("drop.insert", "192.0.2.9/32")}, "a new ban")
        lapi.cscli("decisions", "delete", "--ip", "192.0.2.9")
        until({("drop.delete", "192.0.2.9/32")}, "a lifted ban")

        lapi.stop()
        wait_for(lambda: "pull failed" in log_path.read_text(), what="the bridge to notice")
        lapi.start()
        lapi.cscli("decisions", "delete", "--ip", "192.0.2.7")
        lapi.cscli("decisions", "add", "--range", "203.0.113.0/24", "--duration", "1h")
        until({("drop.delete", "192.0.2.7/32"), ("drop.insert", "203.0.113.0/24")}, "resync")
        wait_for(lambda: "1 ended on their own" in log_path.read_text(), what="the 3 s ban's end")
        time.sleep(1.5)  # a few more pulls, which must send nothing
    finally:
        bridge.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=20)
    seen.extend(stream.new())
    log = log_path.read_text()
    assert code == 0, log
    assert log.rstrip().endswith("stopped")
    sent = [(c.op.value, str(c.network)) for c in seen]
    assert set(sent[:2]) == {("drop.insert", "192.0.2.7/32"), ("drop.insert", "192.0.2.30/32")}
    assert sent[2:] == [  # each once; the 3 s ban ended by its ttl, without a delete
        ("drop.insert", "192.0.2.9/32"),
        ("drop.delete", "192.0.2.9/32"),
        ("drop.delete", "192.0.2.7/32"),
        ("drop.insert", "203.0.113.0/24"),
    ], log


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3h59m50.1s", 3 * 3600 + 59 * 60 + 50.1),
        ("59m59.370293776s", 3599.370293776),
        ("-123.718798ms", -0.123718798),
        ("4.9s", 4.9),
        ("1h0m0s", 3600),
        ("0", 0),
        ("1.5µs", 1.5e-6),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "1d", "h", "3h 5m", "1.2.3s", "10", "9" * 310 + "s", "2562048h", "-" + "9" * 20 + "h"],
)
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_reason_is_bounded_and_printable() -> None:
    long = Decision(id=1, origin="CAPI", type="ban", scenario="a\nb" + "x" * 500)
    reason = _reason(long)
    assert len(reason) == 256 and reason.startswith("crowdsec CAPI: a b") and "\n" not in reason
    Command(op=Op.DROP_INSERT, network="192.0.2.1", reason=reason)  # the contract takes it


def test_under_journald_each_bridge_line_carries_its_priority(
    lapi: Lapi, r: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With stderr the stream ``JOURNAL_STREAM`` names, as systemd sets it, each line starts
    with its syslog priority: ``journalctl -p err`` finds a refused API key."""
    assert lapi.key_file is not None
    lapi.cscli("decisions", "add", "--ip", "192.0.2.7", "--duration", "1h")
    bad = tmp_path / "bad.key"
    bad.write_text("not-a-key")

    def under_journald(key_file: Path) -> tuple[int, list[str]]:
        journal = tmp_path / "journal"
        with journal.open("w") as stream:
            named = os.fstat(stream.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{named.st_dev}:{named.st_ino}"}
            argv = lapi.ns.argv(*bridge_argv(redis_server, key_file, "--once"))
            done = subprocess.run(argv, stderr=stream, env=env, timeout=60, check=False)
        lines = journal.read_text().splitlines()
        for line in lines:
            found = re.fullmatch(r"<(\d)>pushfw crowdsec: ([A-Z]+) .*", line)
            assert found is not None, line
            assert int(found[1]) == syslog_priority(getattr(logging, found[2])), line
        return done.returncode, lines

    code, lines = under_journald(lapi.key_file)
    assert code == 0 and lines[-1].startswith("<6>pushfw crowdsec: INFO startup pull: "), lines
    assert "sent 1 drop.insert" in lines[-1]
    code, lines = under_journald(bad)
    assert code == 1 and lines[-1].startswith("<3>pushfw crowdsec: ERROR "), lines
    assert lines[-1].endswith("refused the API key (HTTP 403)")
