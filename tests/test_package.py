"""scripts/package: the Debian package built, installed on this machine, run, and purged.

It installs into /opt/pushfw, /etc/pushfw and /usr of the machine running the tests, so it
runs only as root, one at a time (a lock file), and only when no pushfw package or
/opt/pushfw is there already; it purges what it installed, passed or failed.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from testbed.env import clean_env
from testbed.kernel import Firewall
from tests.conftest import Netns, RedisServer, WorkerProcess, need

ROOT = Path(__file__).parent.parent
PREFIX = Path("/opt/pushfw")
WORKER = PREFIX / "bin" / "pushfw-worker"
LOCK = Path("/run/lock/pushfw-package-test.lock")

pytestmark = pytest.mark.alone  # /etc/pushfw/worker.toml would reach every worker started meanwhile


def installed_status() -> str:
    """dpkg's status of the pushfw package ('' when dpkg never heard of it)."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", "pushfw"], capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def env_for(tmp_path: Path, **settings: str) -> dict[str, str]:
    """PUSHFW_* as the other tests set them, and nothing that would let the installed
    programs import this checkout or the test's virtualenv instead of their own."""
    config = tmp_path / "worker.toml"
    config.touch()
    env = clean_env(config=str(config), state_dir=str(tmp_path / "state"), **settings)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


@pytest.fixture
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package, built by scripts/package; this machine is locked for the test."""
    need(os.geteuid() == 0, "installing a package needs root")
    for tool in ("dpkg", "dpkg-deb", "dpkg-query"):
        need(shutil.which(tool) is not None, f"{tool} is not installed")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        need(installed_status() == "", f"pushfw is installed already ({installed_status()})")
        need(not PREFIX.exists(), f"{PREFIX} exists already")
        dist = tmp_path_factory.mktemp("dist")
        build = subprocess.run(
            [str(ROOT / "scripts" / "package")],
            env={**os.environ, "PUSHFW_DIST": str(dist)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert build.returncode == 0, build.stderr
        [package] = dist.glob("pushfw_*_*.deb")
        yield package


def test_the_package_installs_runs_in_a_namespace_and_purges(
    deb: Path,
    tmp_path: Path,
    make_netns: Callable[[], Netns],
    redis_server: RedisServer,
    r: redis.Redis,
) -> None:
    info = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True)
    for dependency in ("python3 (>= 3.11)", "iptables", "libxtables12", "ipset", "nftables"):
        assert dependency in info.stdout, info.stdout
    installed = subprocess.run(["dpkg", "-i", str(deb)], capture_output=True, text=True)
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert installed_status() == "install ok installed"

        # what the operator finds on disk
        assert Path("/usr/bin/pushfw-worker").resolve() == WORKER
        assert Path("/usr/bin/pushfw").resolve() == PREFIX / "bin" / "pushfw"
        unit = Path("/lib/systemd/system/pushfw-worker.service").read_text()
        assert f"ExecStart={WORKER} run" in unit.splitlines()
        assert f"ExecStartPre={WORKER} check-config" in unit.splitlines()
        assert not Path(
            "/etc/systemd/system/multi-user.target.wants/pushfw-worker.service"
        ).exists()
        config = Path("/etc/pushfw/worker.toml")
        assert config.read_text() == (ROOT / "systemd" / "worker.toml.example").read_text()
        assert config.stat().st_mode & 0o777 == 0o600
        conffiles = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Conffiles}", "pushfw"], capture_output=True, text=True
        )
        assert str(config) in conffiles.stdout
        for page, command in (("pushfw", "drop"), ("pushfw-worker", "check-config")):
            with gzip.open(f"/usr/share/man/man1/{page}.1.gz", "rt") as man:
                roff = man.read()
            assert roff.startswith(f".TH {page.upper()} 1 ")
            assert f".SS {command}\n" in roff, "each subcommand has its section"
            completion = Path(f"/usr/share/bash-completion/completions/{page}").read_text()
            assert "complete " in completion
        where = subprocess.run(
            [str(PREFIX / "bin" / "python"), "-c", "import pushfw.worker as w; print(w.__file__)"],
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
        )
        assert where.stdout.startswith(f"{PREFIX}/lib/"), where.stdout + where.stderr

        analyze = shutil.which("systemd-analyze")
        if analyze is not None:  # test_systemd verifies the repository's copy under CI
            verified = subprocess.run(
                [analyze, "verify", "/lib/systemd/system/pushfw-worker.service"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert verified.returncode == 0, verified.stderr
            assert verified.stderr.strip() == "", "the packaged unit verifies clean"

        # check-config from the installed files: the shipped worker.toml as it is, then the
        # settings the tests use
        shipped = env_for(tmp_path)
        del shipped["PUSHFW_CONFIG"]
        as_shipped = subprocess.run(
            ["/usr/bin/pushfw-worker", "check-config"],
            env=shipped,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert as_shipped.returncode == 0, as_shipped.stdout + as_shipped.stderr
        checked = subprocess.run(
            [str(WORKER), "check-config"],
            env=env_for(tmp_path, redis_url=redis_server.url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert redis_server.url in checked.stdout

        # a short live run: the installed worker in a namespace, the installed CLI sends a drop
        ns = make_netns()
        worker = WorkerProcess(
            ns,
            env_for(
                tmp_path, redis_url=redis_server.unix_url, backend="iptables", host_name=ns.name
            ),
            tmp_path / "worker.log",
            watch_url=redis_server.unix_url,
            program=(str(WORKER),),
        )
        try:
            worker.start()
            sent = subprocess.run(
                ["/usr/bin/pushfw", "drop", "198.51.100.7", "--wait", "--timeout", "30"],
                env=env_for(tmp_path, redis_url=redis_server.url),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0, sent.stdout + sent.stderr + worker.log_tail()
            assert ("drop", "198.51.100.7/32") in Firewall(ns, "iptables").rules()
        finally:
            if worker.proc is not None:
                assert worker.stop() == 0, worker.log_tail()
    finally:
        purged = subprocess.run(["dpkg", "-P", "pushfw"], capture_output=True, text=True)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert installed_status() in ("", "unknown ok not-installed")
    for left in (
        PREFIX,
        Path("/etc/pushfw"),
        Path("/usr/bin/pushfw"),
        Path("/usr/bin/pushfw-worker"),
    ):
        assert not left.exists() and not left.is_symlink(), f"{left} is left after the purge"
