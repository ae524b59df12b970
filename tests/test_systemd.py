"""The unit file and the notify protocol, with systemd-analyze and real unix datagram sockets."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pushfw.worker.notify import Notifier, notify
from testbed.redis_server import free_port
from tests.conftest import RedisServer, need
from tests.daemon import Daemon, cli, worker_env

UNIT = Path(__file__).parent.parent / "systemd" / "pushfw-worker.service"
VENV_ENTRY = Path(sys.executable).parent / "pushfw-worker"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text("")
    return path


class Listener:
    """A bound SOCK_DGRAM socket playing systemd's side: collects every message."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
        self.messages: list[str] = []

    def receive(self, timeout: float = 1.0) -> str | None:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.messages.append(message)
        return message

    def wait(self, prefix: str, timeout: float = 30, after: int = 0) -> int:
        """Receive until a message (index >= ``after``) has a line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self.messages[after:], start=after):
                if any(line.startswith(prefix) for line in message.splitlines()):
                    return index
            if time.monotonic() > deadline:
                pytest.fail(f"no {prefix!r} from the worker; got {self.messages}")
            self.receive(0.2)


@pytest.fixture
def listener() -> Iterator[Listener]:
    # A short directory of its own: unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pfw-") as tmp:
        sock = Listener(str(Path(tmp) / "notify.sock"))
        yield sock
        sock.sock.close()


def test_notify_reaches_a_path_and_an_abstract_socket(listener: Listener) -> None:
    assert notify("STATUS=hello", {"NOTIFY_SOCKET": listener.address})
    assert listener.receive() == "STATUS=hello"
    abstract = Listener(f"@pushfw-test-{os.getpid()}")
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": abstract.address})
        assert abstract.receive() == "READY=1"
    finally:
        abstract.sock.close()
    assert not notify("READY=1", {}), "no socket outside systemd: nothing sent"
    assert not notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify.sock"})


def test_watchdog_pings_at_most_every_half_interval(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "60000000"}
    notifier = Notifier(env)
    assert notifier.watchdog_s == 60
    notifier.alive()
    assert listener.receive() == "WATCHDOG=1\nEXTEND_TIMEOUT_USEC=60000000"
    notifier.alive()  # the same half interval: nothing
    notifier.ready("following")
    assert listener.receive() == "READY=1\nSTATUS=following"
    notifier.alive()
    assert listener.receive() == "WATCHDOG=1"
    assert listener.receive(0.1) is None
    notifier.alive(before_long_call=True)  # a million-entry list: the whole interval for it
    assert listener.receive() == "WATCHDOG=1"
    other = Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None, "the watchdog is meant for another process"


def test_worker_reports_ready_then_pings_the_watchdog(
    r, redis_server: RedisServer, listener: Listener, config: Path
) -> None:
    env = worker_env(config, redis_url=redis_server.url, host_name="sd1", backend="memory")
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    with Daemon(env) as worker:
        ready = listener.wait("READY=1")
        assert "\nSTATUS=following {pushfw}:cmd as host:sd1: 0 rules" in listener.messages[ready]
        listener.wait("WATCHDOG=1", after=ready + 1)
        assert worker.stop() == 0
    listener.wait("STOPPING=1")
    assert "block_ms lowered from 1000 to 250" in worker.output


def test_watchdog_goes_on_while_redis_is_away(
    aof_redis: RedisServer, listener: Listener, config: Path
) -> None:
    env = worker_env(config, redis_url=aof_redis.url, host_name="sd2", backend="memory")
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    with Daemon(env) as worker:
        ready = listener.wait("READY=1")
        aof_redis.stop()
        down = listener.wait("STATUS=Redis unavailable", after=ready)
        first = listener.wait("WATCHDOG=1", after=down + 1)
        listener.wait("WATCHDOG=1", after=first + 1)
        assert worker.stop() == 0


def test_start_timeout_is_extended_while_redis_is_unreachable(
    listener: Listener, config: Path
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = worker_env(config, redis_url=url, host_name="sd3", backend="memory")
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    with Daemon(env) as worker:
        first = listener.wait("EXTEND_TIMEOUT_USEC=1000000")
        listener.wait("EXTEND_TIMEOUT_USEC=1000000", after=first + 1)
        assert worker.stop() == 0
    assert not any("READY=1" in m.splitlines() for m in listener.messages)


def unit_options(text: str) -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def test_unit_is_a_notify_service_with_a_watchdog_and_a_config_check() -> None:
    options = unit_options(UNIT.read_text())
    assert options["Type"] == ["notify"]
    assert options["NotifyAccess"] == ["main"]
    assert options["WatchdogSec"] == ["30"]
    assert "/usr/local/bin/pushfw-worker check-config" in options["ExecStartPre"]
    assert options["ExecStart"] == ["/usr/local/bin/pushfw-worker run"]
    assert options["NoNewPrivileges"] == ["yes"], "the hardening stays"
    assert options["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    need(tool is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert tool is not None
    unit = tmp_path / "pushfw-worker.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pushfw-worker", str(VENV_ENTRY)))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", "verify prints nothing for a clean unit"


def test_unit_grants_only_what_it_needs() -> None:
    """One writable file (the xtables lock, made before the sandbox), a memory ceiling well
    above the measured peaks (docs/benchmarks.md: 113 MB for 1M rules, 581 MB for a 1M-entry
    list before it was chunked), and the sandbox's other walls."""
    options = unit_options(UNIT.read_text())
    assert options["ProtectSystem"] == ["strict"]
    assert options["ReadWritePaths"] == ["-/run/xtables.lock"], "nothing else of /run"
    pre = options["ExecStartPre"]
    touch = pre.index("-+/usr/bin/touch /run/xtables.lock")
    assert touch < pre.index("/usr/local/bin/pushfw-worker check-config")
    [memory_max] = options["MemoryMax"]
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    ceiling = int(memory_max[:-1]) * units[memory_max[-1]]
    assert ceiling >= max(5 * 113e6, 581e6), "room above every peak measured"
    assert options["ProtectProc"] == ["invisible"] and options["PrivateMounts"] == ["yes"]
    assert "SyslogLevelPrefix" not in options, "journald reads each line's <N> priority"


def security_exposure(unit: Path) -> float:
    """``systemd-analyze security``'s overall exposure of a unit file (0 best, 10 worst)."""
    tool = shutil.which("systemd-analyze")
    need(tool is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert tool is not None
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout[-2000:] + result.stderr
    return float(found.group(1))


def test_unit_security_exposure_is_no_worse(tmp_path: Path) -> None:
    """2.6 before the lock-only ReadWritePaths=, PrivateMounts= and ProtectProc=; 2.2 since."""
    unit = tmp_path / "pushfw-worker.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/pushfw-worker", str(VENV_ENTRY)))
    assert security_exposure(unit) <= 2.2


def test_check_config_of_the_unit_runs(config: Path) -> None:
    """What ExecStartPre runs succeeds with the shipped example as the config."""
    example = Path(__file__).parent.parent / "systemd" / "worker.toml.example"
    result = cli("--config", str(example), "check-config", env=worker_env(config))
    assert result.returncode == 0, result.stderr
