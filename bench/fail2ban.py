"""fail2ban at scale: its own firewall actions beside pushfw's Python action.

The same N offending lines (default 5,000 addresses, one line each) are written at once to
the log of one jail (``maxretry = 1``) of a real ``fail2ban-server``, run under
``ip netns exec`` in a throwaway namespace, so its own actions edit only that namespace's
firewall. Each variant is timed from the write until the kernel (or, for pushfw, Redis and
then the kernel behind a worker) holds all N bans, and then ``fail2ban-client stop``:

- ``nftables``: fail2ban's ``nftables-allports`` action (one ``nft add element`` per ban)
- ``ipset``: fail2ban's ``iptables-ipset-proto6-allports`` (one ``ipset add`` per ban)
- ``pushfw``: ``integrations/fail2ban/action.d/pushfw_redis.py`` (one XADD per ban) and a
  ``pushfw-worker`` with the nftables backend in the same namespace applying them

    python -m bench.fail2ban                       # all three, 5,000 addresses
    python -m bench.fail2ban --count 1000 --variants pushfw,nftables --json

fail2ban's stock action files are copied from /etc/fail2ban/action.d into the run's own
configuration directory; nothing of the host's fail2ban or firewall is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.env import ROOT, BenchEnv, BenchError, Progress, address, bench_env
from bench.kernel import kernel
from testbed.fail2ban import Fail2banExited, Fail2banServer, write_fail2ban_conf

STOCK_ACTIONS = Path("/etc/fail2ban/action.d")
PUSHFW_ACTION = ROOT / "integrations/fail2ban/action.d/pushfw_redis.py"
JAIL = "bench"
VARIANTS = ("nftables", "ipset", "pushfw")


FILTER = """\
[Definition]
failregex = ^Failed login from <HOST>$
datepattern = {NONE}
"""

JAIL_LOCAL = """\
[bench]
enabled = true
backend = polling
filter = bench
logpath = {tmp}/bench.log
maxretry = 1
findtime = 600
bantime = 3600
action = {action}
"""

ACTIONS = {
    "nftables": "nftables-allports[name=bench, protocol=tcp]",
    "ipset": "iptables-ipset-proto6-allports[name=bench, protocol=tcp]",
    "pushfw": 'pushfw_redis.py[redis_url="{redis_url}", python_path="{venv}"]',
}


@dataclass
class Timing:
    """Seconds of one variant: to N bans in the kernel (pushfw: also in Redis), and to stop."""

    variant: str
    count: int
    ban_s: float
    redis_s: float | None
    stop_s: float


def _wait(done: Callable[[], bool], what: str, timeout: float, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _entries_added(env: BenchEnv) -> int:
    """Entries ever added to the stream (XLEN is not: the worker trims what it applied)."""
    info: dict[str, object] = env.client.xinfo_stream(env.keys.cmd)
    return int(str(info.get("entries-added", 0)))


def _nft_count(env: BenchEnv) -> int:
    proc = env.ns.run(
        "nft", "-j", "list", "set", "inet", "f2b-table", "addr-set-bench", check=False
    )
    if proc.returncode != 0:
        return 0
    items = json.loads(proc.stdout or "{}").get("nftables", [])
    return sum(len(item["set"].get("elem", [])) for item in items if "set" in item)


def _ipset_count(env: BenchEnv) -> int:
    proc = env.ns.run("ipset", "list", "-t", "f2b-bench", check=False)
    found = re.search(r"^Number of entries: (\d+)$", proc.stdout, re.MULTILINE)
    return int(found.group(1)) if found else 0


class Fail2banRun(Fail2banServer):
    """A fail2ban-server of the run's own (:class:`testbed.fail2ban.Fail2banServer`), inside
    the namespace, with one jail."""

    def __init__(self, env: BenchEnv, variant: str) -> None:
        super().__init__(env.tmp / f"f2b-{variant}", netns=env.ns)
        write_fail2ban_conf(self.tmp, loglevel="NOTICE")
        shutil.copytree(STOCK_ACTIONS, self.conf / "action.d")
        shutil.copy(PUSHFW_ACTION, self.conf / "action.d" / PUSHFW_ACTION.name)
        (self.conf / "filter.d").mkdir()
        (self.conf / "filter.d/bench.conf").write_text(FILTER)
        action = ACTIONS[variant].format(redis_url=env.server.unix_url, venv=sys.prefix)
        values = {"tmp": str(self.tmp), "action": action}
        (self.conf / "jail.local").write_text(JAIL_LOCAL.format(**values))
        (self.tmp / "bench.log").touch()

    def start(self, jails: Sequence[str] = (JAIL,), timeout: float = 60) -> None:
        try:
            super().start(jails, timeout)
        except Fail2banExited as exc:
            raise BenchError(str(exc)) from None

    def write(self, count: int) -> None:
        lines = "".join(f"Failed login from {address(i)}\n" for i in range(count))
        (self.tmp / "bench.log").write_text(lines)


@contextlib.contextmanager
def fail2ban(env: BenchEnv, variant: str) -> Iterator[Fail2banRun]:
    run = Fail2banRun(env, variant)
    try:
        run.start()
        yield run
    finally:
        run.stop(timeout=60)


def run_variant(env: BenchEnv, variant: str, count: int, timeout: float) -> Timing:
    env.progress(f"{variant}: {count} bans through fail2ban")
    redis_s: float | None = None
    if variant == "pushfw":
        env.reset()
        worker_cm: contextlib.AbstractContextManager[object] = env.worker("nftables")
    else:
        worker_cm = contextlib.nullcontext()
    with worker_cm, fail2ban(env, variant) as run:
        started = time.monotonic()
        run.write(count)
        if variant == "pushfw":
            _wait(lambda: _entries_added(env) >= count, "the drops", timeout)
            redis_s = time.monotonic() - started
            nft = kernel(env.ns, "nftables")
            _wait(lambda: nft.drop_count() >= count, "the worker's kernel", timeout, 0.5)
        else:
            counter = _nft_count if variant == "nftables" else _ipset_count
            _wait(lambda: counter(env) >= count, f"{count} bans in the kernel", timeout, 0.5)
        ban_s = time.monotonic() - started
        stopped = time.monotonic()
        run.stop(timeout=timeout)
        stop_s = time.monotonic() - stopped
    env.progress(f"{variant}: {ban_s:.1f} s to ban, {stop_s:.1f} s to stop")
    return Timing(variant, count, ban_s, redis_s, stop_s)


def report(timings: list[Timing]) -> str:
    pushfw = next((t for t in timings if t.variant == "pushfw"), None)
    lines = [f"{'variant':<10} {'bans':>6} {'ban s':>8} {'in Redis s':>11} {'stop s':>8}  ratio"]
    for t in timings:
        ratio = f"{t.ban_s / pushfw.ban_s:5.2f}x pushfw" if pushfw and pushfw.ban_s else ""
        redis_s = f"{t.redis_s:11.1f}" if t.redis_s is not None else f"{'-':>11}"
        lines.append(
            f"{t.variant:<10} {t.count:>6} {t.ban_s:8.1f} {redis_s} {t.stop_s:8.1f}  {ratio}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fail2ban", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="offending addresses")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per phase")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    for tool in ("fail2ban-server", "fail2ban-client", "nft", "ipset"):
        if shutil.which(tool) is None:
            print(f"bench.fail2ban: {tool} is not installed", file=sys.stderr)
            return 2
    progress = Progress()
    try:
        with bench_env(progress) as env:
            timings = [run_variant(env, v, args.count, args.timeout) for v in variants]
    except BenchError as exc:
        print(f"bench.fail2ban: {exc}", file=sys.stderr)
        return 1
    print(json.dumps([asdict(t) for t in timings], indent=2) if args.json else report(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
