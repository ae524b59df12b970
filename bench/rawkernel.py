"""The raw kernel batch rate: N adds in one kernel batch, with nothing of pushfw around them.

Run inside the benchmark's namespace (``ip netns exec NS python -m bench.rawkernel N``), so
the timings carry no ``ip netns exec``; prints one JSON object on stdout.

- ipset: create a scratch ``hash:net`` set with timeouts, time one ``ipset -exist restore``
  process fed N lines ``add <set> <ip> timeout 600`` on stdin, check the count, destroy it;
- nftables: create a scratch table with a ``flags timeout`` set, time one libnftables JSON
  transaction (``Nftables().json_cmd``) adding the N elements (timeout 600 s each), check
  the count, delete the table.

The addresses are the jobs' addresses (:func:`bench.env.address`), so this is the same work
pushfw's worker does for an N-rule job, in one batch instead of N/500.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.env import MAX_ADDRESSES, address, wide_address

SCRATCH = "pfwbench-raw"


def _address(n: int) -> Callable[[int], str]:
    """The jobs' addresses; past the benchmarking range's size, the shared address space's
    (where ``python -m bench.lists`` takes a million-entry list from)."""
    return address if n <= MAX_ADDRESSES else wide_address


TIMEOUT_S = 600
SET_SIZE = 1_000_000
"""The sets' most elements: pushfw's default (PUSHFW_SET_SIZE), or N if larger."""


def _ipset(*args: str, stdin: str | None = None) -> str:
    exe = shutil.which("ipset") or "ipset"
    proc = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ipset {args[0]}: {proc.stderr.strip()[:300]}")
    return proc.stdout


def ipset_batch(n: int) -> dict[str, Any]:
    size = max(n, SET_SIZE)
    _ipset("-exist", "destroy", SCRATCH)
    options = ["family", "inet", "timeout", str(TIMEOUT_S), "maxelem", str(size)]
    _ipset("create", SCRATCH, "hash:net", *options)
    try:
        at = _address(n)
        text = "".join(f"add {SCRATCH} {at(i)} timeout {TIMEOUT_S}\n" for i in range(n))
        started = time.perf_counter()
        _ipset("-exist", "restore", stdin=text)
        seconds = time.perf_counter() - started
        header = _ipset("list", "-t", SCRATCH)
        found = re.search(r"^Number of entries: (\d+)$", header, re.MULTILINE)
        count = int(found[1]) if found else -1
    finally:
        _ipset("destroy", SCRATCH)
    return {
        "n": n,
        "seconds": seconds,
        "adds_per_s": n / seconds,
        "elements_after": count,
        "how": f"one 'ipset -exist restore' of N 'add SET IP timeout {TIMEOUT_S}' lines into "
        f"a scratch hash:net set (timeout, maxelem {size})",
    }


def nft_batch(n: int) -> dict[str, Any]:
    import nftables  # the system's libnftables, as the worker loads it

    from pushfw.worker.backends.netlink import set_element_count

    nft = nftables.Nftables()
    nft.set_json_output(True)
    table = {"family": "inet", "name": SCRATCH}
    where = {"family": "inet", "table": SCRATCH, "name": "s"}

    def run(*commands: dict[str, Any]) -> Any:
        rc, output, error = nft.json_cmd({"nftables": list(commands)})
        if rc != 0:
            raise RuntimeError(f"nft: {str(error).strip()[:300]}")
        return output

    size = max(n, SET_SIZE)
    nft.json_cmd({"nftables": [{"delete": {"table": table}}]})  # a leftover, if any
    spec = {**where, "type": "ipv4_addr", "flags": ["timeout"], "size": size}
    run({"add": {"table": table}}, {"add": {"set": spec}})
    try:
        at = _address(n)
        elems = [{"elem": {"val": at(i), "timeout": TIMEOUT_S}} for i in range(n)]
        batch = {"add": {"element": {**where, "elem": elems}}}
        started = time.perf_counter()
        run(batch)
        seconds = time.perf_counter() - started
        count = set_element_count(SCRATCH, "s")  # over netlink: nft list is minutes at 1M
    finally:
        run({"delete": {"table": table}})
    return {
        "n": n,
        "seconds": seconds,
        "adds_per_s": n / seconds,
        "elements_after": count,
        "how": "one libnftables JSON transaction (Nftables().json_cmd) adding N elements "
        f"(timeout {TIMEOUT_S} s) to a scratch 'flags timeout' set (size {size})",
    }


BATCHES = {"ipset": ipset_batch, "nftables": nft_batch}


def main(argv: list[str]) -> int:
    n = int(argv[0])
    kinds = argv[1:] or list(BATCHES)
    out: dict[str, Any] = {}
    for kind in kinds:
        try:
            out[kind] = BATCHES[kind](n)
        except (RuntimeError, OSError, ImportError) as exc:
            out[kind] = {"n": n, "error": str(exc)}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
