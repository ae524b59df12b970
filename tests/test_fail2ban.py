"""The fail2ban action (integrations/fail2ban/action.d/pushfw.conf) in a real fail2ban.

The test runs its own ``fail2ban-server`` (foreground, private socket, pid file, log and
configuration in a temporary directory; backend ``polling``, so no systemd or inotify), with
jails whose filter matches ``Failed login from <HOST>``, and watches what reaches the
session's redis-server through the real ``pushfw`` CLI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from tests.conftest import RedisServer, need
from tests.test_applier import make_worker, results_by_cmd

CMD = "{pushfw}:cmd"
ACTION = Path(__file__).resolve().parents[1] / "integrations/fail2ban/action.d/pushfw.conf"
BANNED = "203.0.113.50"

FAIL2BAN_CONF = """\
[Definition]
loglevel = INFO
logtarget = {tmp}/fail2ban.log
syslogsocket = auto
socket = {tmp}/f2b.sock
pidfile = {tmp}/f2b.pid
dbfile = :memory:
dbpurgeage = 1d
allowipv6 = auto
"""

FILTER = """\
[Definition]
failregex = ^Failed login from <HOST>$
ignoreregex =
datepattern = {NONE}
"""

# The ticket id is whatever the log says: the worst case for the action's shell quoting.
HOSTILE_FILTER = """\
[Definition]
failregex = ^Hostile id <F-ID>.+</F-ID>$
datepattern = {NONE}
"""

# The options of the action the way docs/integrations.md suggests: pushfw.local and
# `banaction = pushfw`.
ACTION_LOCAL = """\
[Init]
pushfw = {pushfw}
redis_url = {redis_url}
"""

JAILS = """\
[DEFAULT]
backend = polling
maxretry = 1
findtime = 600
ignoreip = 127.0.0.1/8 ::1

[pushfw-test]
enabled = true
filter = pushfw-test
logpath = {tmp}/auth.log
bantime = 600
action = pushfw[pushfw="{pushfw}", redis_url="{redis_url}"]

[pushfw-forever]
enabled = true
filter = pushfw-test
logpath = {tmp}/forever.log
bantime = -1
banaction = pushfw
action_ = %(banaction)s[port="ssh", protocol="tcp"]
action = %(action_)s

[pushfw-hostile]
enabled = true
filter = pushfw-hostile
logpath = {tmp}/hostile.log
bantime = 600
action = pushfw[pushfw="{pushfw}", redis_url="{redis_url}"]
"""

# Ticket ids that would run `touch` if the action pasted them into its shell command
# unquoted or single-quoted (relative paths: fail2ban refuses ids with a "/").
HOSTILE_IDS = [
    'x"; touch PWNED1; echo "',
    "$(touch PWNED2)",
    "`touch PWNED3`",
    "'; touch PWNED4; '",
    "198.51.100.1 & touch PWNED5",
    "--help",
]


@dataclass
class Fail2ban:
    """A fail2ban-server of the test's own; ``client`` runs fail2ban-client against it."""

    tmp: Path
    proc: subprocess.Popen[bytes]

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        sock, conf = self.tmp / "f2b.sock", self.tmp / "conf"
        return subprocess.run(
            ["fail2ban-client", "-c", str(conf), "-s", str(sock), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    @property
    def log(self) -> str:
        path = self.tmp / "fail2ban.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def append(self, log: str, line: str) -> None:
        with (self.tmp / log).open("a") as out:
            out.write(line + "\n")

    def wait(self, predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fail2ban: waiting for {what}; its log:\n{self.log[-6000:]}")
            time.sleep(0.1)


def write_config(tmp: Path, pushfw: str, redis_url: str) -> None:
    conf = tmp / "conf"
    (conf / "action.d").mkdir(parents=True)
    (conf / "filter.d").mkdir()
    shutil.copy(ACTION, conf / "action.d/pushfw.conf")
    values = {"tmp": str(tmp), "pushfw": pushfw, "redis_url": redis_url}
    (conf / "action.d/pushfw.local").write_text(ACTION_LOCAL.format(**values))
    (conf / "fail2ban.conf").write_text(FAIL2BAN_CONF.format(**values))
    (conf / "filter.d/pushfw-test.conf").write_text(FILTER)
    (conf / "filter.d/pushfw-hostile.conf").write_text(HOSTILE_FILTER)
    (conf / "jail.local").write_text(JAILS.format(**values))
    for log in ("auth.log", "forever.log", "hostile.log"):
        (tmp / log).touch()


@pytest.fixture
def fail2ban(
    request: pytest.FixtureRequest, r: redis.Redis, redis_server: RedisServer
) -> Iterator[Fail2ban]:
    """The server; indirect parametrization adds variables to its environment."""
    need(
        shutil.which("fail2ban-server") is not None and shutil.which("fail2ban-client") is not None,
        "fail2ban is not installed (apt-get install fail2ban)",
    )
    pushfw = Path(sys.executable).with_name("pushfw")
    assert pushfw.exists(), f"the pushfw console script is not next to {sys.executable}"
    # a short path: the control socket's name must fit in sun_path (108 bytes)
    with tempfile.TemporaryDirectory(prefix="pushfw-f2b-") as name:
        tmp = Path(name)
        write_config(tmp, str(pushfw), redis_server.url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHFW_")}
        env.update(cast(dict[str, str], getattr(request, "param", {})))
        with (tmp / "server.out").open("wb") as out:
            proc = subprocess.Popen(
                [
                    "fail2ban-server",
                    "-f",  # foreground: this process is the server, the test owns it
                    "-x",
                    "-c",
                    str(tmp / "conf"),
                    "-s",
                    str(tmp / "f2b.sock"),
                    "-p",
                    str(tmp / "f2b.pid"),
                ],
                cwd=tmp,  # where a command injected through the shell would create its file
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Fail2ban(tmp, proc)
        try:
            jails = ("pushfw-test", "pushfw-forever", "pushfw-hostile")
            server.wait(
                lambda: all(server.client("status", j, check=False).returncode == 0 for j in jails),
                "the jails to start",
            )
            yield server
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                server.client("stop", check=False)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def commands(r: redis.Redis) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in cast(list[Any], r.xrange(CMD))
    ]


def find(r: redis.Redis, **wanted: str) -> dict[str, str] | None:
    for fields in commands(r):
        if all(fields.get(k) == v for k, v in wanted.items()):
            return fields
    return None


def test_ban_and_unban_become_pushfw_commands(fail2ban: Fail2ban, r: redis.Redis) -> None:
    fail2ban.append("auth.log", f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), f"a drop.insert of {BANNED}")
    assert find(r, op="drop.insert", ip=BANNED) == {
        "op": "drop.insert",
        "ip": BANNED,
        "ttl": "600",  # the jail's bantime
        "reason": "fail2ban pushfw-test",
    }

    fail2ban.client("set", "pushfw-test", "unbanip", BANNED)
    fail2ban.wait(lambda: find(r, op="drop.delete", ip=BANNED), f"a drop.delete of {BANNED}")
    assert find(r, op="drop.delete", ip=BANNED) == {
        "op": "drop.delete",
        "ip": BANNED,
        "reason": "fail2ban pushfw-test",
    }


def test_permanent_ban_has_no_ttl(fail2ban: Fail2ban, r: redis.Redis) -> None:
    """bantime = -1 (fail2ban's "forever"); the jail uses `banaction = pushfw` and pushfw.local."""
    fail2ban.append("forever.log", "Failed login from 2001:db8::7")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip="2001:db8::7"), "a drop.insert, no ttl")
    assert find(r, op="drop.insert", ip="2001:db8::7") == {
        "op": "drop.insert",
        "ip": "2001:db8::7",
        "reason": "fail2ban pushfw-forever",
    }


def test_hostile_ticket_ids_reach_no_shell(fail2ban: Fail2ban, r: redis.Redis) -> None:
    """Nothing fail2ban hands over runs in the shell, nor passes for an option; pushfw says no.

    (fail2ban turns a value with shell metacharacters into a shell variable; the action uses
    it inside double quotes after "--", and pushfw validates it as an address.)
    """
    for ticket in HOSTILE_IDS:
        fail2ban.append("hostile.log", f"Hostile id {ticket}")
    fail2ban.append("hostile.log", "Hostile id 198.51.100.2")  # a good one last, to know when

    fail2ban.wait(lambda: find(r, ip="198.51.100.2"), "the last ban of the hostile jail")
    assert [c["ip"] for c in commands(r)] == ["198.51.100.2"], "nothing else reached the stream"
    assert not list(fail2ban.tmp.glob("PWNED*")), "a command ran through the shell"
    log = fail2ban.log
    for ticket in HOSTILE_IDS:
        assert f"Ban {ticket}" in log, f"fail2ban did not try {ticket!r}"
    failed = log.count("Failed to execute ban jail 'pushfw-hostile' action 'pushfw'")
    assert failed == len(HOSTILE_IDS), "pushfw refused each of them"


SIGNING_KEY = "fail2ban-test-signing-key"


@pytest.mark.parametrize("fail2ban", [{"PUSHFW_HMAC_KEY": SIGNING_KEY}], indirect=True)
def test_signing_key_from_fail2bans_environment(
    fail2ban: Fail2ban, r: redis.Redis, redis_server: RedisServer
) -> None:
    """The action inherits fail2ban's environment: PUSHFW_HMAC_KEY there signs the bans."""
    worker = make_worker(redis_server, hmac_key=SIGNING_KEY, require_signature=True)
    fail2ban.append("auth.log", f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), f"a drop.insert of {BANNED}")
    (entry_id, fields), *_ = cast(list[Any], r.xrange(CMD))
    assert {b"ts", b"sig"} <= set(fields)
    worker.run(burst=True)  # requires a valid signature
    assert results_by_cmd(r)[entry_id.decode()]["status"] == "applied"
