"""What a reconcile of a large host costs: its time and the worker's memory peak.

A Redis of its own gets N permanent drops in its ledger (the records a fold leaves), and an
in-process worker on the memory backend holds the same N rules, as a host whose kernel
matches its ledger does between two reconciles; with ``--reboot`` it holds none, as after
a reboot, and the reconcile adds all N (in commits of ``_COMMIT_CHUNK``). One
``Worker.reconcile()`` is timed, and the process's peak RSS during it is read from
``/proc/self/status`` after resetting the peak (``/proc/self/clear_refs``), so the figure
is what the reconcile added on top of the index.

    python -m bench.reconcile                   # 1,000,000 rules
    python -m bench.reconcile --rules 200000 --json
    python -m bench.reconcile --reboot          # the kernel starts empty
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from pushfw.producer.contract import Action, parse_network
from pushfw.producer.keys import Keys
from pushfw.producer.render import plural
from pushfw.worker.backends.base import Rule, RuleKey
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.daemon import Worker
from pushfw.worker.settings import WorkerSettings
from testbed.redis_server import RedisServer


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _address(i: int) -> str:
    return f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"


def measure(rules: int, reboot: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pushfw-reconcile-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            keys = Keys()
            pipe = client.pipeline(transaction=False)
            for i in range(rules):
                address = _address(i)
                record = f'{{"id":"1-0","action":"drop","network":"{address}/32"}}'
                pipe.hset(keys.rules, f"drop {address}/32", record)
                if len(pipe) >= 10_000:
                    pipe.execute()
            pipe.execute()
            backend = MemoryBackend()
            for i in range(0 if reboot else rules):
                backend.add(Rule(RuleKey(Action.DROP, parse_network(f"{_address(i)}/32")), None))
                if i % 50_000 == 49_999:
                    backend.commit()
            backend.commit()
            settings = WorkerSettings(
                redis_url=server.unix_url, host_name="bench", backend="memory", state_dir=tmp
            )
            worker = Worker(settings, backend=backend)
            worker.ledger.ensure_group()
            worker.applier.setup()
            commits_before = backend.commits
            before_kb = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from now
            started = time.perf_counter()
            drift = worker.reconcile()
            seconds = time.perf_counter() - started
            peak_kb = _status_kb("VmHWM")
            worker.scheduler.close()
            assert drift is not None, "the reconcile did not run"
            if reboot:
                assert (drift.added, drift.changed, len(backend.committed())) == (
                    rules,
                    rules,
                    rules,
                ), drift
            else:
                assert drift.kept == rules and not drift.changed, drift
            return {
                "rules": rules,
                "reboot": reboot,
                "commits": backend.commits - commits_before,
                "seconds": seconds,
                "rss_before_mb": before_kb / 1024,
                "peak_mb": peak_kb / 1024,
                "peak_added_mb": (peak_kb - before_kb) / 1024,
            }
        finally:
            client.close()
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__)
    parser.add_argument("--rules", type=int, default=1_000_000)
    parser.add_argument("--reboot", action="store_true", help="start from an empty kernel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    row = measure(args.rules, args.reboot)
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    what = "rules into an empty kernel" if row["reboot"] else "matching rules"
    print(
        f"reconcile of {row['rules']:,} {what}: {row['seconds']:.1f} s; RSS "
        f"{row['rss_before_mb']:.0f} MB before, {row['peak_mb']:.0f} MB at the peak "
        f"(+{row['peak_added_mb']:.0f} MB); {plural(row['commits'], 'commit')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
