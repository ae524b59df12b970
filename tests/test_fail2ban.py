"""The fail2ban actions (integrations/fail2ban/action.d/) in a real fail2ban.

The tests run their own ``fail2ban-server`` (foreground, private socket, pid file, log and
configuration in a temporary directory; backend ``polling``, so no systemd or inotify), with
jails whose filter matches ``Failed login from <HOST>``, and watch what reaches the
session's redis-server: through the ``pushfw`` CLI (the shell action ``pushfw.conf``) or
from inside fail2ban (the Python action ``pushfw_redis.py``, pointed at this virtualenv with
``python_path``, since fail2ban runs under the system's python3).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from testbed.env import clean_env
from testbed.fail2ban import Fail2banServer, write_fail2ban_conf
from tests.conftest import RedisServer, need
from tests.test_applier import key, make_worker, results_by_cmd

CMD = "{pushfw}:cmd"
ACTIONS = Path(__file__).resolve().parents[1] / "integrations/fail2ban/action.d"
BANNED = "203.0.113.50"
JAIL_NAMES = (
    "pushfw-test",
    "pushfw-forever",
    "pushfw-hostile",
    "py-test",
    "py-forever",
    "py-hostile",
    "py-plain",
    "py-short",
    "pushfw-unban",
    "py-unban",
    "py-broken",
)


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

# The options of the shell action the way docs/integrations.md suggests: pushfw.local and
# `banaction = pushfw`.
ACTION_LOCAL = """\
[Init]
pushfw = {pushfw}
redis_url_file = {redis_url_file}
"""

JAIL_DEFAULTS = """\
[DEFAULT]
backend = polling
maxretry = 1
findtime = 600
ignoreip = 127.0.0.1/8 ::1
action_pushfw = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}"]
"""

JAILS = (
    JAIL_DEFAULTS
    + """
[pushfw-test]
enabled = true
filter = pushfw-test
logpath = {tmp}/auth.log
bantime = 600
action = pushfw[pushfw="{pushfw}", redis_url_file="{redis_url_file}"]

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
action = pushfw[pushfw="{pushfw}", redis_url_file="{redis_url_file}"]

[py-test]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-auth.log
bantime = 600
action = %(action_pushfw)s

[py-forever]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-forever.log
bantime = -1
# what a banaction gets from jail.conf's action_ is accepted and ignored
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}", port="ssh",
                         protocol="tcp", chain="INPUT"]

[py-hostile]
enabled = true
filter = pushfw-hostile
logpath = {tmp}/py-hostile.log
bantime = 600
action = %(action_pushfw)s

[py-plain]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-plain.log
bantime = 600
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}", client="redis",
                         target="web1, web2"]

[py-short]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-short.log
bantime = 2
action = %(action_pushfw)s

[pushfw-unban]
enabled = true
filter = pushfw-test
logpath = {tmp}/unban.log
bantime = 600
action = pushfw[pushfw="{pushfw}", redis_url_file="{redis_url_file}", unban_on_stop="true"]

[py-unban]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-unban.log
bantime = 600
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}", unban_on_stop="true"]

[py-broken]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-broken.log
bantime = 600
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}", unban_on_stop="maybe"]
"""
)

# One jail for the test at scale; the whole server is started for it and stopped by it.
SCALE_JAILS = (
    JAIL_DEFAULTS
    + """
[py-scale]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-scale.log
bantime = 3600
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}"]

[py-scale-unban]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-scale-unban.log
bantime = 3600
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}", unban_on_stop="true"]
"""
)

# A jail whose own local action (standing in for iptables) runs after pushfw's, on a Redis
# of the test's own that it freezes.
FROZEN_JAILS = (
    JAIL_DEFAULTS
    + """
[py-frozen]
enabled = true
filter = pushfw-test
logpath = {tmp}/frozen.log
bantime = 600
action = pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}", client="{client}",
                         redis_retry_s="1"]
         mark
"""
)

MARK_ACTION = """\
[Definition]
actionban = echo <ip> >> {tmp}/marks
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


class Fail2ban(Fail2banServer):
    """A fail2ban-server of the test's own (:class:`testbed.fail2ban.Fail2banServer`)."""

    def append(self, log: str, line: str) -> None:
        with (self.tmp / log).open("a") as out:
            out.write(line + "\n")


def write_config(tmp: Path, jails: str, loglevel: str = "INFO", **values: str) -> None:
    write_fail2ban_conf(tmp, loglevel)
    conf = tmp / "conf"
    (conf / "action.d").mkdir()
    (conf / "filter.d").mkdir()
    for action in ("pushfw.conf", "pushfw_redis.py"):
        shutil.copy(ACTIONS / action, conf / "action.d" / action)
    values = {"tmp": str(tmp), **values}
    (conf / "action.d/pushfw.local").write_text(ACTION_LOCAL.format(**values))
    (conf / "action.d/mark.conf").write_text(MARK_ACTION.format(**values))
    (conf / "filter.d/pushfw-test.conf").write_text(FILTER)
    (conf / "filter.d/pushfw-hostile.conf").write_text(HOSTILE_FILTER)
    (conf / "jail.local").write_text(jails.format(**values))
    for line in jails.splitlines():
        if line.startswith("logpath = {tmp}/"):
            (tmp / line.removeprefix("logpath = {tmp}/")).touch()


def need_fail2ban() -> None:
    """fail2ban, and pushfw importable from this venv by the Python fail2ban runs on."""
    server = shutil.which("fail2ban-server")
    need(
        server is not None and shutil.which("fail2ban-client") is not None,
        "fail2ban is not installed (apt-get install fail2ban)",
    )
    assert server is not None
    interpreter = Path(server).read_text(errors="replace").partition("\n")[0].removeprefix("#!")
    probe = subprocess.run(
        [
            *interpreter.split(),
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import pushfw_redis as a;"
            "a.add_python_path(sys.argv[2]); import pushfw.producer",
            str(ACTIONS),
            sys.prefix,
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    need(
        probe.returncode == 0,
        f"fail2ban's Python ({interpreter}) cannot import pushfw from {sys.prefix} "
        f"(build the venv with that Python, or give it what that version needs):\n"
        + probe.stderr[-1500:],
    )


@contextlib.contextmanager
def running_fail2ban(
    jails: str,
    names: tuple[str, ...],
    redis_url: str,
    env: dict[str, str],
    loglevel: str = "INFO",
    **values: str,
) -> Iterator[Fail2ban]:
    """A fail2ban-server with ``jails`` (a template), its jails ``names`` started."""
    pushfw = Path(sys.executable).with_name("pushfw")
    assert pushfw.exists(), f"the pushfw console script is not next to {sys.executable}"
    # a short path: the control socket's name must fit in sun_path (108 bytes)
    with tempfile.TemporaryDirectory(prefix="pushfw-f2b-") as name:
        tmp = Path(name)
        url_file = tmp / "redis.url"  # the shell action's: a URL never on a command line
        url_file.write_text(redis_url + "\n")
        write_config(
            tmp,
            jails,
            loglevel,
            pushfw=str(pushfw),
            redis_url=redis_url,
            redis_url_file=str(url_file),
            venv=sys.prefix,
            **values,
        )
        env = clean_env() | env
        server = Fail2ban(tmp, env=env)
        try:
            server.start(names)
            yield server
        finally:
            server.stop()


@pytest.fixture
def fail2ban(
    request: pytest.FixtureRequest, r: redis.Redis, redis_server: RedisServer
) -> Iterator[Fail2ban]:
    """The server; indirect parametrization adds variables to its environment."""
    need_fail2ban()
    env = cast(dict[str, str], getattr(request, "param", {}))
    with running_fail2ban(JAILS, JAIL_NAMES, redis_server.url, env) as server:
        yield server


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

    fail2ban.wait(lambda: not fail2ban.running_commands(), "the ban's command to return")
    fail2ban.client("set", "pushfw-test", "unbanip", BANNED, check=True)
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


# The shell action as docs/integrations.md installs it: banaction, pushfw.local's file.
SECRET_JAILS = """\
[DEFAULT]
backend = polling
maxretry = 1
ignoreip = 127.0.0.1/8 ::1

[pushfw-secret]
enabled = true
filter = pushfw-test
logpath = {tmp}/secret.log
bantime = 600
banaction = pushfw
action = %(banaction)s
"""


def test_the_shell_actions_commands_carry_no_password(aof_redis: RedisServer) -> None:
    """The Redis URL, password included, comes from a file: the commands fail2ban runs
    (which every user sees in ``ps``, and fail2ban logs at HEAVYDEBUG) never hold it."""
    need_fail2ban()
    admin = redis.Redis(unix_socket_path=str(aof_redis.socket_path))
    admin.config_set("requirepass", "f2b-s3cret")
    url = f"redis://:f2b-s3cret@127.0.0.1:{aof_redis.port}/0"
    try:
        with running_fail2ban(
            SECRET_JAILS, ("pushfw-secret",), url, {}, loglevel="HEAVYDEBUG"
        ) as server:
            server.append("secret.log", f"Failed login from {BANNED}")
            server.wait(lambda: find(admin, op="drop.insert", ip=BANNED), "the ban in Redis")
            server.wait(lambda: not server.running_commands(), "the ban's command to return")
            server.client("set", "pushfw-secret", "unbanip", BANNED, check=True)
            server.wait(lambda: find(admin, op="drop.delete", ip=BANNED), "the unban in Redis")
            log = server.log
    finally:
        admin.close()
    # each command fail2ban ran (its /bin/sh -c argument), up to the next log record
    executed = re.findall(r" -- exec: (.*?)(?=\n\d{4}-\d\d-\d\d |\Z)", log, re.DOTALL)
    assert len(executed) == 2, log[-3000:]
    assert all("--redis-url-file" in command for command in executed), executed
    assert "f2b-s3cret" not in log


PY_SECRET_JAILS = """\
[DEFAULT]
backend = polling
maxretry = 1
ignoreip = 127.0.0.1/8 ::1

[py-secret]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-secret.log
bantime = 600
action = pushfw_redis.py[redis_url_file="{redis_url_file}", python_path="{venv}",
                         client="{client}"]

[py-twice]
enabled = true
filter = pushfw-test
logpath = {tmp}/py-twice.log
bantime = 600
action = pushfw_redis.py[redis_url_file="{redis_url_file}", redis_url="redis://127.0.0.1:1/0",
                         python_path="{venv}"]
"""


@pytest.mark.parametrize("client", ["pushfw", "redis"])
def test_the_python_action_reads_the_url_from_a_file(aof_redis: RedisServer, client: str) -> None:
    """``redis_url_file``: the password stays in a file only root reads, out of jail.local
    (which every user may read) and out of fail2ban's log, with either client; a jail that
    gives the URL twice is refused, alone."""
    need_fail2ban()
    admin = redis.Redis(unix_socket_path=str(aof_redis.socket_path))
    admin.config_set("requirepass", "f2b-py-s3cret")
    url = f"redis://:f2b-py-s3cret@127.0.0.1:{aof_redis.port}/0"
    try:
        with running_fail2ban(
            PY_SECRET_JAILS, ("py-secret", "py-twice"), url, {}, "HEAVYDEBUG", client=client
        ) as server:
            server.append("py-secret.log", f"Failed login from {BANNED}")
            server.wait(lambda: find(admin, op="drop.insert", ip=BANNED), "the ban in Redis")
            jail_local = (server.tmp / "conf" / "jail.local").read_text()
            log = server.log
    finally:
        admin.close()
    name = "pushfw.producer" if client == "pushfw" else "redis-py"
    assert f"Redis answers (client {name})" in log, log[-3000:]
    assert "give the Redis URL once: redis_url or redis_url_file" in log
    assert "f2b-py-s3cret" not in jail_local + log


SIGNING_KEY = "fail2ban-test-signing-key"


@pytest.mark.parametrize("fail2ban", [{"PUSHFW_HMAC_KEY": SIGNING_KEY}], indirect=True)
def test_signing_key_from_fail2bans_environment(
    fail2ban: Fail2ban, r: redis.Redis, redis_server: RedisServer
) -> None:
    """The action inherits fail2ban's environment: PUSHFW_HMAC_KEY there signs the bans."""
    worker = make_worker(redis_server, hmac_key=SIGNING_KEY, require_signature=True)
    fail2ban.append("auth.log", f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), f"a drop.insert of {BANNED}")
    (_, fields), *_ = cast(list[Any], r.xrange(CMD))
    assert {b"ts", b"sig"} <= set(fields)
    worker.run(burst=True)  # requires a valid signature
    assert set(worker.backend.committed()) == {key("drop", BANNED)}, results_by_cmd(r)


# The Python action (pushfw_redis.py), inside fail2ban's own process


def test_python_action_ban_and_unban(fail2ban: Fail2ban, r: redis.Redis) -> None:
    fail2ban.append("py-auth.log", f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), f"a drop.insert of {BANNED}")
    drop = find(r, op="drop.insert", ip=BANNED)
    assert drop is not None
    # what is left of the jail's bantime of 600 s when the action ran
    assert 550 <= int(drop.pop("ttl")) <= 600
    assert drop == {"op": "drop.insert", "ip": BANNED, "reason": "fail2ban py-test"}
    assert "Redis answers (client pushfw.producer)" in fail2ban.log

    fail2ban.client("set", "py-test", "unbanip", BANNED, check=True)
    fail2ban.wait(lambda: find(r, op="drop.delete", ip=BANNED), f"a drop.delete of {BANNED}")
    assert find(r, op="drop.delete", ip=BANNED) == {
        "op": "drop.delete",
        "ip": BANNED,
        "reason": "fail2ban py-test",
    }


def test_python_action_unban_all_sends_deletes(fail2ban: Fail2ban, r: redis.Redis) -> None:
    """An operator's "unban --all" (fail2ban calls flush) is no stop: each ban is lifted."""
    for ip in ("192.0.2.11", "192.0.2.12"):
        fail2ban.append("py-auth.log", f"Failed login from {ip}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip="192.0.2.12"), "both drops")
    fail2ban.client("unban", "--all", check=True)
    fail2ban.wait(lambda: find(r, op="drop.delete", ip="192.0.2.12"), "the deletes")
    deletes = [c["ip"] for c in commands(r) if c["op"] == "drop.delete"]
    assert sorted(deletes) == ["192.0.2.11", "192.0.2.12"]


def test_python_action_permanent_ban_has_no_ttl(fail2ban: Fail2ban, r: redis.Redis) -> None:
    fail2ban.append("py-forever.log", "Failed login from 2001:db8::8")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip="2001:db8::8"), "a drop.insert, no ttl")
    assert find(r, op="drop.insert", ip="2001:db8::8") == {
        "op": "drop.insert",
        "ip": "2001:db8::8",
        "reason": "fail2ban py-forever",
    }
    assert "unknown options" not in fail2ban.log, "port, protocol and chain are fail2ban's"


def test_python_action_plain_redis_py(fail2ban: Fail2ban, r: redis.Redis) -> None:
    """client = redis: no pushfw import, the wire format written by hand; target passed on."""
    fail2ban.append("py-plain.log", f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), f"a drop.insert of {BANNED}")
    drop = find(r, op="drop.insert", ip=BANNED)
    assert drop is not None
    assert 550 <= int(drop.pop("ttl")) <= 600
    assert drop == {
        "op": "drop.insert",
        "ip": BANNED,
        "reason": "fail2ban py-plain",
        "target": "web1,web2",
    }
    assert "Redis answers (client redis-py)" in fail2ban.log


def test_python_action_refuses_what_is_no_address(fail2ban: Fail2ban, r: redis.Redis) -> None:
    for ticket in HOSTILE_IDS:
        fail2ban.append("py-hostile.log", f"Hostile id {ticket}")
    fail2ban.append("py-hostile.log", "Hostile id 198.51.100.3")

    fail2ban.wait(lambda: find(r, ip="198.51.100.3"), "the last ban of the hostile jail")
    assert [c["ip"] for c in commands(r)] == ["198.51.100.3"], "nothing else reached the stream"
    failed = fail2ban.log.count("Failed to execute ban jail 'py-hostile' action 'pushfw_redis'")
    assert failed == len(HOSTILE_IDS)


def test_python_action_sends_no_delete_when_the_ban_runs_out(
    fail2ban: Fail2ban, r: redis.Redis
) -> None:
    """bantime 2 s: pushfw ends the ban with its ttl; a delete could cut short another
    host's newer ban of the same address."""
    fail2ban.append("py-short.log", f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), "the drop")
    assert 1 <= int(cast(dict[str, str], find(r, ip=BANNED))["ttl"]) <= 2
    fail2ban.wait(lambda: f"[py-short] Unban {BANNED}" in fail2ban.log, "fail2ban's unban")
    assert find(r, op="drop.delete") is None


@pytest.mark.parametrize(
    "fail2ban", [{"PUSHFW_HMAC_KEY": SIGNING_KEY}], ids=["signed"], indirect=True
)
@pytest.mark.parametrize("jail, log", [("py-test", "py-auth.log"), ("py-plain", "py-plain.log")])
def test_python_action_signs_with_fail2bans_key(
    fail2ban: Fail2ban, r: redis.Redis, redis_server: RedisServer, jail: str, log: str
) -> None:
    """Both clients sign with PUSHFW_HMAC_KEY from fail2ban's environment; a worker that
    requires signatures applies the ban."""
    # py-plain's target is web1,web2
    host = "web1" if jail == "py-plain" else "h1"
    worker = make_worker(redis_server, host, hmac_key=SIGNING_KEY, require_signature=True)
    fail2ban.append(log, f"Failed login from {BANNED}")
    fail2ban.wait(lambda: find(r, op="drop.insert", ip=BANNED), f"a drop.insert of {BANNED}")
    (_, fields), *_ = cast(list[Any], r.xrange(CMD))
    assert {b"ts", b"sig"} <= set(fields)
    worker.run(burst=True)
    assert set(worker.backend.committed()) == {key("drop", BANNED)}, results_by_cmd(r)


# At scale: 5,000 addresses at once, then `fail2ban-client stop`

SCALE = 5000


def scale_addresses(first: int = 0) -> list[str]:
    base = ipaddress.ip_address("198.18.0.1")  # RFC 2544's benchmarking range
    return [str(base + first + i) for i in range(SCALE)]


@pytest.mark.timeout(1800)
def test_5000_bans_at_once_in_each_of_two_jails_then_stop(
    r: redis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two jails of one fail2ban-server, each banning 5,000 addresses at once: the default
    one's bans outlive the stop, the ``unban_on_stop`` one sends a drop.delete per ban.
    (One server for both: a second start and stop would test nothing more.)"""
    need_fail2ban()
    jails = {"py-scale": scale_addresses(), "py-scale-unban": scale_addresses(SCALE)}
    with running_fail2ban(SCALE_JAILS, tuple(jails), redis_server.url, {}) as server:
        started = time.monotonic()
        for jail, addresses in jails.items():
            (server.tmp / f"{jail}.log").write_text(
                "".join(f"Failed login from {ip}\n" for ip in addresses)
            )
        total = SCALE * len(jails)
        server.wait(lambda: r.xlen(CMD) >= total, f"{total} drops", timeout=1200)
        elapsed = time.monotonic() - started
        with capsys.disabled():
            print(f"\nfail2ban + pushfw_redis.py: {total} bans in Redis in {elapsed:.1f} s")

        drops = commands(r)
        for jail, addresses in jails.items():
            mine = [c for c in drops if c["reason"] == f"fail2ban {jail}"]
            assert sorted(c["ip"] for c in mine) == sorted(addresses), jail
        assert len(drops) == total
        for command in drops:
            assert command["op"] == "drop.insert"
            assert 0 < int(command["ttl"]) <= 3600

        worker = make_worker(redis_server)
        worker.run(burst=True)
        rules = dict(worker.backend.committed().pairs())
        assert len(rules) == total
        assert all(rule.expires_ms is not None for rule in rules.values())

        server.stop(timeout=600)
        assert server.returncode == 0, server.log[-3000:]

    deletes = [c["ip"] for c in commands(r) if c["op"] == "drop.delete"]
    assert sorted(deletes) == sorted(jails["py-scale-unban"]), "one drop.delete per ban"
    worker.run(burst=True)
    kept = {str(rule_key.network.network_address) for rule_key in worker.backend.committed()}
    assert kept == set(jails["py-scale"]), "a stop leaves the default jail's bans alone"


def test_stop_leaves_the_fleets_bans_unless_asked(fail2ban: Fail2ban, r: redis.Redis) -> None:
    """Both actions: a stop sends no undrop, except where the jail says unban_on_stop."""
    bans = {
        "auth.log": "192.0.2.21",  # shell action, default
        "unban.log": "192.0.2.22",  # shell action, unban_on_stop = true
        "py-auth.log": "192.0.2.23",  # Python action, default
        "py-unban.log": "192.0.2.24",  # Python action, unban_on_stop = true
        "forever.log": "192.0.2.25",  # shell action, permanent: stays too
    }
    for log, ip in bans.items():
        fail2ban.append(log, f"Failed login from {ip}")

    def dropped() -> set[str]:
        return {c["ip"] for c in commands(r) if c["op"] == "drop.insert"}

    fail2ban.wait(lambda: dropped() >= set(bans.values()), "the drops")
    fail2ban.stop()
    assert fail2ban.returncode == 0, fail2ban.log[-3000:]
    deletes = sorted(c["ip"] for c in commands(r) if c["op"] == "drop.delete")
    assert deletes == ["192.0.2.22", "192.0.2.24"]


def test_python_action_misconfigured_fails_its_bans_only(
    fail2ban: Fail2ban, r: redis.Redis
) -> None:
    """A bad option does not take fail2ban down (every jail started): its bans fail, logged."""
    fail2ban.append("py-broken.log", f"Failed login from {BANNED}")
    failed = "Failed to execute ban jail 'py-broken' action 'pushfw_redis'"
    fail2ban.wait(lambda: failed in fail2ban.log, "the failed ban")
    assert "unban_on_stop = 'maybe': say true or false" in fail2ban.log
    assert commands(r) == []


@pytest.mark.parametrize("client", ["pushfw", "redis"])
def test_a_frozen_redis_never_holds_the_jail_up(volatile_redis: RedisServer, client: str) -> None:
    """Redis frozen (SIGSTOP): the first ban waits for the action's timeout (1 s), and the
    breaker opens: the next bans are held, not sent, so the jail's own action after pushfw's
    runs at once for each; one warning says so, and once Redis answers again the action
    sends what it held, in one line."""
    need_fail2ban()
    banned = [f"192.0.2.{i}" for i in range(71, 77)]
    r = redis.Redis.from_url(volatile_redis.url)
    with running_fail2ban(
        FROZEN_JAILS, ("py-frozen",), volatile_redis.url, {}, client=client
    ) as server:
        marks = server.tmp / "marks"

        def marked() -> list[str]:
            return marks.read_text().split() if marks.exists() else []

        assert volatile_redis.proc is not None
        volatile_redis.proc.send_signal(signal.SIGSTOP)
        try:
            for ip in banned:
                server.append("frozen.log", f"Failed login from {ip}")
            # 6 bans at the old 5 s (21 s with plain redis-py) each would take 30 s or more
            server.wait(lambda: sorted(marked()) == banned, "the jail's own action", timeout=25)
            log = server.log
            assert log.count("pushfw action: Redis does not answer") == 1, log[-3000:]
            assert "Failed to execute ban" not in log
        finally:
            volatile_redis.proc.send_signal(signal.SIGCONT)
        server.wait(
            lambda: {c["ip"] for c in commands(r) if c["op"] == "drop.insert"} == set(banned),
            "the held bans to reach Redis",
            timeout=60,
        )
        server.wait(lambda: "Redis answers again after" in server.log, "the recovery line")
        assert "sent the 6 command(s) held meanwhile" in server.log, server.log[-3000:]
        assert all(0 < int(c["ttl"]) <= 600 for c in commands(r))
        assert server.log.count("pushfw action: Redis does not answer") == 1
    r.close()


def test_redis_away_from_the_start_holds_bans_and_says_what_a_stop_leaves(
    volatile_redis: RedisServer,
) -> None:
    """Redis stopped before fail2ban starts: one warning at start, the ban is held (no
    failed ban, the jail's own action runs), and a stop says what was never sent."""
    need_fail2ban()
    volatile_redis.stop()
    with running_fail2ban(
        FROZEN_JAILS, ("py-frozen",), volatile_redis.url, {}, client="pushfw"
    ) as server:
        server.append("frozen.log", f"Failed login from {BANNED}")
        marks = server.tmp / "marks"
        server.wait(lambda: marks.exists() and BANNED in marks.read_text(), "the local ban")
        server.stop()
        log = server.log
    assert log.count("pushfw action: Redis does not answer") == 1, log[-3000:]
    assert "Failed to execute ban" not in log
    assert "1 command(s) held for pushfw were not sent" in log, log[-3000:]
