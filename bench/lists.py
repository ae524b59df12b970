"""A million-entry blocklist on one host: import, enforce, change, against the raw kernel.

Per set backend, in one run and one namespace:

- **baseline**: the raw kernel batch (:mod:`bench.rawkernel`): the same N addresses added in
  one kernel transaction with nothing of pushfw around it;
- **import**: ``pushfw import``'s work (read and validate N lines, pack, store, one
  ``list.load``) and then the worker's (fetch, check the hash, gate every entry, load the
  sets), timed until the host's result says the list is loaded, and checked in the kernel;
- **change**: the same list with ``--change`` of its entries replaced, imported again: the
  host applies only the difference;
- the worker's RSS (now and peak), Redis's bytes per entry, and Redis PING latency (p50/p99)
  during the run against idle.

With ``--connect``, instead: TCP connect time on the namespace's loopback (:mod:`bench.connect`)
with 0, 1 and 50 small lists loaded (each of several prefix lengths, both families), the
rules a packet walks at the hook (read from the kernel), and the ratio against 0 lists
measured in the same run: what every new connection pays for the lists.

    python -m bench.lists                         # 1,000,000 entries, nftables and ipset
    python -m bench.lists --entries 200000 --backends ipset --json
    python -m bench.lists --connect               # connect time with 0, 1 and 50 lists
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import sys
import time
from typing import Any

import redis

from bench.env import BenchEnv, BenchError, Progress, backend_missing, bench_env, wide_address
from bench.kernel import IPSET_PREFIX, NFT_TABLE
from pushfw.producer import Producer
from pushfw.producer.lists import ListContent, read_list

NAME = "bench"
TARGET_S = 10.0
TARGET_RSS_MB = 100.0


def _ping(socket_path: str, stop: Any, out: Any) -> None:
    """PING every 10 ms until ``stop`` is set; send the latencies (ms) back through ``out``."""
    client = redis.Redis(unix_socket_path=socket_path)
    latencies = []
    while not stop.wait(0.01):
        started = time.perf_counter()
        client.ping()
        latencies.append((time.perf_counter() - started) * 1000)
    out.send(latencies)


class _Pinger:
    """PINGs from a process of its own: the import's Python work must not delay them."""

    def __init__(self, socket_path: str) -> None:
        self._stop = multiprocessing.Event()
        self._ours, theirs = multiprocessing.Pipe()
        self._proc = multiprocessing.Process(
            target=_ping, args=(socket_path, self._stop, theirs), daemon=True
        )
        self.latencies: list[float] = []

    def start(self) -> None:
        self._proc.start()

    def finish(self) -> dict[str, float]:
        self._stop.set()
        self.latencies = self._ours.recv()
        self._proc.join(timeout=10)
        values = self.latencies or [0.0]
        p99 = statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]
        return {"p50_ms": statistics.median(values), "p99_ms": p99, "samples": len(values)}


def _idle_ping(socket_path: str, seconds: float = 1.0) -> dict[str, float]:
    pinger = _Pinger(socket_path)
    pinger.start()
    time.sleep(seconds)
    return pinger.finish()


def list_entries(env: BenchEnv, backend: str, name: str) -> int:
    """How many entries the kernel holds for drop list ``name``, read from the kernel (the
    lists of one action share sets: with one drop list, its own entries)."""
    if backend == "nftables":  # over netlink: nft -j list takes minutes at a million
        counts = env.ns.run(
            env.python, "-m", "bench.nftcount", NFT_TABLE, name, env=env.helper_env()
        )
        return sum(json.loads(counts.stdout).values())
    total = 0
    for version in (4, 6):
        header = env.ns.run("ipset", "list", "-t", f"{IPSET_PREFIX}-lists-d{version}", check=False)
        found = re.search(r"^Number of entries: (\d+)$", header.stdout, re.MULTILINE)
        total += int(found[1]) if found else 0
    return total


def _baseline(env: BenchEnv, backend: str, n: int) -> dict[str, Any]:
    proc = env.ns.run(
        env.python, "-m", "bench.rawkernel", str(n), backend, env=env.helper_env(), timeout=600
    )
    out: dict[str, Any] = json.loads(proc.stdout)[backend]
    if "error" in out:
        raise BenchError(f"raw {backend} batch: {out['error']}")
    return out


def _imported(
    env: BenchEnv, producer: Producer, lines: list[str], expect: str
) -> tuple[dict[str, float], str]:
    """``pushfw import``'s work and then the host's, timed; returns figures and the detail."""
    started = time.perf_counter()
    parsed = read_list(lines)
    read_s = time.perf_counter() - started
    checking = time.perf_counter()
    parsed.content.check()  # what every host runs on the content before its gate
    check_s = time.perf_counter() - checking
    started += check_s  # the host's own check is inside enforced_s already
    cmd = producer.load_list(NAME, parsed.content, reply=True)
    stored_s = time.perf_counter() - started
    results = producer.wait(cmd, timeout_s=600)
    done_s = time.perf_counter() - started
    if not results or results[0].status.value != "applied" or expect not in results[0].detail:
        raise BenchError(f"the host answered {results!r}, not {expect!r}")
    return {
        "read_s": read_s,
        "stored_s": stored_s,
        "enforced_s": done_s,
        "check_s": check_s,
        "entries": parsed.content.size,
    }, results[0].detail


def run_backend(env: BenchEnv, backend: str, n: int, change: float) -> dict[str, Any]:
    env.progress(f"{backend}: raw kernel batch of {n:,} ...")
    baseline = _baseline(env, backend, n)
    lines = [wide_address(i) for i in range(n)]
    replaced = int(n * change)
    changed = lines[replaced:] + [wide_address(n + i) for i in range(replaced)]
    with env.worker(backend) as worker:
        client = redis.Redis(unix_socket_path=str(env.server.socket_path), decode_responses=True)
        producer = Producer(client)
        idle = _idle_ping(str(env.server.socket_path))
        pinger = _Pinger(str(env.server.socket_path))
        pinger.start()
        rss_before = worker.rss_kb()
        env.progress(f"{backend}: importing {n:,} entries ...")
        first, _ = _imported(env, producer, lines, f"loaded {n} entries")
        in_kernel = list_entries(env, backend, NAME)
        if in_kernel != n:
            raise BenchError(f"{backend}: the kernel holds {in_kernel} of {n} entries")
        rss_loaded = worker.rss_kb()
        content_key = producer.keys.list_content(NAME, read_list(lines).content.version)
        redis_bytes = int(client.memory_usage(content_key) or 0)
        env.progress(f"{backend}: re-importing with {replaced:,} entries replaced ...")
        second, detail = _imported(env, producer, changed, f"{replaced} added, {replaced} removed")
        if list_entries(env, backend, NAME) != n:
            raise BenchError(f"{backend}: the kernel does not hold {n} entries after the change")
        during = pinger.finish()
        worker.alive()
        peak = worker.rss_kb("VmHWM")
        rss_after = worker.rss_kb()
        client.close()
    return {
        "backend": backend,
        "entries": n,
        "baseline": baseline,
        "import": first,
        "change": {**second, "replaced": replaced, "detail": detail},
        "baseline_share": baseline["seconds"] / first["enforced_s"],
        "rss_mb": {
            "before": rss_before / 1024,
            "loaded": rss_loaded / 1024,
            "after_change": rss_after / 1024,
            "peak": peak / 1024,
        },
        "redis_bytes_per_entry": redis_bytes / n,
        "ping_idle": idle,
        "ping_during": during,
    }


CONNECT_LISTS = (0, 1, 50)
CONNECT_SAMPLES = 5000


def small_list(index: int) -> list[str]:
    """A small list of its own per index, of 6 IPv4 and 3 IPv6 prefix lengths."""
    return [
        f"10.{index}.0.0/16",
        f"100.64.{index * 4}.0/22",
        f"172.16.{index}.0/24",
        f"172.17.{index}.0/28",
        f"172.18.{index}.0/30",
        f"172.18.{index}.8/32",
        f"fd00:{index:x}::/32",
        f"fd01:0:{index:x}::/48",
        f"fd02::{index:x}/128",
    ]


def hook_rules(env: BenchEnv, backend: str) -> int:
    """The rules an IPv4 packet walks at the input hook, from the kernel's own listing."""
    if backend == "nftables":
        listing = env.ns.run("nft", "-j", "list", "chain", "inet", NFT_TABLE, "input").stdout
        return sum(1 for item in json.loads(listing)["nftables"] if "rule" in item)
    saved = env.ns.run("iptables-legacy-save", "-t", "filter").stdout
    return sum(1 for line in saved.splitlines() if line.startswith("-A PUSHFW "))


def connect_cost(env: BenchEnv, backend: str, counts: list[int], samples: int) -> dict[str, Any]:
    """Connect time with each number of lists loaded, in one worker's run."""
    rows: list[dict[str, Any]] = []
    settings = {"PUSHFW_MAX_LISTS": str(max([*counts, 1]))}
    with env.worker(backend, settings):
        client = redis.Redis(unix_socket_path=str(env.server.socket_path), decode_responses=True)
        producer = Producer(client)
        loaded = 0
        for count in sorted(counts):
            env.progress(f"{backend}: {count} lists loaded, connecting {samples:,} times ...")
            while loaded < count:
                content = ListContent.of(small_list(loaded))
                cmd = producer.load_list(f"c{loaded}", content, reply=True)
                results = producer.wait(cmd, timeout_s=60)
                if not results or results[0].status.value != "applied":
                    raise BenchError(f"{backend}: list c{loaded} was answered {results!r}")
                loaded += 1
            connect = env.ns.run(
                env.python, "-m", "bench.connect", str(samples), env=env.helper_env()
            )
            figures = json.loads(connect.stdout)
            rows.append({"lists": count, "rules": hook_rules(env, backend), **figures})
        client.close()
    base = next((r["median_us"] for r in rows if r["lists"] == 0), rows[0]["median_us"])
    for row in rows:
        row["ratio"] = row["median_us"] / base
    return {"backend": backend, "connect": rows}


def render_connect(results: list[dict[str, Any]]) -> str:
    out = [f"{'BACKEND':9} {'LISTS':>5} {'RULES':>5} {'CONNECT_US':>10} {'P90_US':>7} {'VS_0':>6}"]
    for result in results:
        for row in result["connect"]:
            out.append(
                f"{result['backend']:9} {row['lists']:>5} {row['rules']:>5} "
                f"{row['median_us']:>10.1f} {row['p90_us']:>7.1f} {row['ratio']:>5.2f}x"
            )
    return "\n".join(out)


def render(rows: list[dict[str, Any]]) -> str:
    out = [
        f"{'BACKEND':9} {'ENTRIES':>9} {'RAW_S':>6} {'IMPORT_S':>8} {'(READ/STORE)':>12} "
        f"{'RAW/IMPORT':>10} {'CHANGE_S':>8} {'RSS_MB':>6} {'PEAK_MB':>7} {'REDIS_B/ENTRY':>13} "
        f"{'PING_P99_IDLE':>13} {'PING_P99_RUN':>12}"
    ]
    for row in rows:
        imp, chg, rss = row["import"], row["change"], row["rss_mb"]
        out.append(
            f"{row['backend']:9} {row['entries']:>9,} {row['baseline']['seconds']:>6.2f} "
            f"{imp['enforced_s']:>8.2f} {imp['read_s']:>5.2f}/{imp['stored_s']:<6.2f} "
            f"{row['baseline_share']:>10.0%} {chg['enforced_s']:>8.2f} {rss['loaded']:>6.0f} "
            f"{rss['peak']:>7.0f} {row['redis_bytes_per_entry']:>13.1f} "
            f"{row['ping_idle']['p99_ms']:>13.2f} {row['ping_during']['p99_ms']:>12.2f}"
        )
    for row in rows:
        met_time = row["import"]["enforced_s"] <= TARGET_S
        met_rss = row["rss_mb"]["peak"] < TARGET_RSS_MB
        check_share = row["import"]["check_s"] / row["import"]["enforced_s"]
        out.append(
            f"target {row['backend']}: {row['entries']:,}-entry list enforced in "
            f"<= {TARGET_S:.0f} s: {'met' if met_time else 'MISSED'} "
            f"({row['import']['enforced_s']:.1f} s); worker peak RSS < {TARGET_RSS_MB:.0f} MB: "
            f"{'met' if met_rss else 'MISSED'} ({row['rss_mb']['peak']:.0f} MB); the host's "
            f"content checks < 10 % of it: {'met' if check_share < 0.1 else 'MISSED'} "
            f"({row['import']['check_s']:.2f} s, {check_share:.1%})"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lists", description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--change", type=float, default=0.01, help="share replaced [0.01]")
    parser.add_argument("--backends", default="nftables,ipset")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--connect", action="store_true", help="connect time with 0, 1 and 50 lists instead"
    )
    parser.add_argument("--lists", default=",".join(map(str, CONNECT_LISTS)))
    parser.add_argument("--samples", type=int, default=CONNECT_SAMPLES)
    args = parser.parse_args(argv)
    progress = Progress()
    rows = []
    try:
        with bench_env(progress) as env:
            for backend in args.backends.split(","):
                missing = backend_missing(backend)
                if missing is not None:
                    raise BenchError(f"{backend}: {missing}")
                if args.connect:
                    counts = [int(c) for c in args.lists.split(",")]
                    rows.append(connect_cost(env, backend, counts, args.samples))
                else:
                    rows.append(run_backend(env, backend, args.entries, args.change))
    except BenchError as exc:
        print(f"bench.lists: {exc}", file=sys.stderr)
        return 1
    text = render_connect(rows) if args.connect else render(rows)
    print(json.dumps(rows, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
