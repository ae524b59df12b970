"""Reading and clearing pushfw's rules in the run's namespace, the way an operator would.

One small class per backend, all with the same four methods:

- ``drop_count()``: how many drop rules the kernel holds (the job check);
- ``drop_sources()``: the dropped addresses (``a.b.c.d``, or ``net/len`` for networks), read
  without taking the xtables lock, so polling them does not hold the worker back (TTL lag);
- ``flush()``: remove every managed rule by hand, keeping pushfw's objects (reconcile);
- ``clear()``: remove pushfw's objects altogether (a clean slate between workers).
"""

from __future__ import annotations

import json
import re
from typing import Any

from bench.env import CHAIN, BenchError, Netns

NFT_TABLE = CHAIN.lower()
"""The nftables backend's table (``inet pushfw``): the worker names it after PUSHFW_CHAIN."""
IPSET_PREFIX = "pushfw"
IPSET_SETS = tuple(f"{IPSET_PREFIX}-{a}{v}" for a in ("drop", "accept") for v in (4, 6))
_NFT_DROP_SET = re.compile(r"drop[46](?:_\d+)?")
_NUMBER_OF_ENTRIES = re.compile(r"^Number of entries: (\d+)$", re.MULTILINE)


def _bare(network: str) -> str:
    """``198.18.0.1/32`` -> ``198.18.0.1``; networks keep their length."""
    return network.removesuffix("/32").removesuffix("/128")


class Kernel:
    """The memory backend's kernel: nothing (its rules live in the worker)."""

    backend = "memory"
    source_tool = "-"
    flush_how = "-"
    real = False

    def __init__(self, ns: Netns) -> None:
        self.ns = ns

    def drop_count(self) -> int:
        raise BenchError(f"the {self.backend} backend has no kernel rules to count")

    def drop_sources(self) -> set[str]:
        raise BenchError(f"the {self.backend} backend has no kernel rules to read")

    def busy_count(self) -> int | None:
        """The drop count while a worker may still be writing, if that is cheap to get."""
        return None

    def flush(self) -> None:
        """Nothing to flush."""

    def clear(self) -> None:
        """Nothing to clear."""


class IptablesKernel(Kernel):
    """Rules in the legacy chain PUSHFW (and its IPv6 twin)."""

    backend = "iptables"
    source_tool = "iptables-legacy-save"
    flush_how = "iptables-legacy -F PUSHFW (and ip6tables-legacy)"
    real = True

    def drop_count(self) -> int:
        """``-A PUSHFW`` lines of ``iptables-legacy -S PUSHFW`` (waits for the xtables lock)."""
        proc = self.ns.run("iptables-legacy", "-w", "-S", CHAIN, check=False)
        return sum(1 for line in proc.stdout.splitlines() if line.startswith(f"-A {CHAIN} "))

    def drop_sources(self) -> set[str]:
        return {_bare(s) for s in self._sources()}

    def busy_count(self) -> int | None:
        return len(self._sources())

    def _sources(self) -> set[str]:
        """Source networks of the rules in PUSHFW, from ``iptables-legacy-save``.

        The save tool reads one snapshot of the table without taking the xtables lock, so
        polling it does not hold the worker back the way ``iptables-legacy -S`` would.
        """
        proc = self.ns.run("iptables-legacy-save", "-t", "filter")
        prefix = f"-A {CHAIN} -s "
        return {
            line[len(prefix) :].split(" ", 1)[0]
            for line in proc.stdout.splitlines()
            if line.startswith(prefix)
        }

    def flush(self) -> None:
        flush_legacy_chain(self.ns)

    def clear(self) -> None:
        flush_legacy_chain(self.ns)


def flush_legacy_chain(ns: Netns) -> None:
    """``iptables-legacy -F PUSHFW`` and its IPv6 twin (nothing if the chain is not there)."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        ns.run(tool, "-w", "-F", CHAIN, check=False)


class NftKernel(Kernel):
    """Elements of the sets of table ``inet pushfw``, read with ``nft -j``."""

    backend = "nftables"
    source_tool = "nft -j list set"
    flush_how = "nft flush set inet pushfw <each set>"
    real = True

    def _sets(self) -> list[dict[str, Any]]:
        """The table's sets with their elements. nft restarts a dump whenever the ruleset
        changes under it, so with a busy worker a large set may take very long to list:
        count only once the worker is idle (:meth:`busy_count` is None)."""
        proc = self.ns.run(
            "nft", "-j", "list", "table", "inet", NFT_TABLE, check=False, timeout=600
        )
        if proc.returncode != 0:
            return []
        items = json.loads(proc.stdout or "{}").get("nftables", [])
        return [item["set"] for item in items if "set" in item]

    def drop_count(self) -> int:
        return sum(
            len(s.get("elem", [])) for s in self._sets() if _NFT_DROP_SET.fullmatch(s["name"])
        )

    def drop_sources(self) -> set[str]:
        """The IPv4 addresses of ``drop4`` (the benchmark drops only single IPv4 addresses)."""
        proc = self.ns.run("nft", "-j", "list", "set", "inet", NFT_TABLE, "drop4", check=False)
        if proc.returncode != 0:
            return set()
        out: set[str] = set()
        for item in json.loads(proc.stdout or "{}").get("nftables", []):
            for raw in item.get("set", {}).get("elem", []):
                elem = raw["elem"] if isinstance(raw, dict) and "elem" in raw else {"val": raw}
                value = elem["val"]
                if isinstance(value, dict):  # a network: {"prefix": {"addr": .., "len": ..}}
                    value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
                out.add(str(value))
        return out

    def set_names(self) -> list[str]:
        return [s["name"] for s in self._sets()]

    def flush(self) -> None:
        for name in self.set_names():
            self.ns.run("nft", "flush", "set", "inet", NFT_TABLE, name)

    def clear(self) -> None:
        self.ns.run("nft", "delete", "table", "inet", NFT_TABLE, check=False)


class IpsetKernel(Kernel):
    """Elements of the sets ``pushfw-drop4`` ..., matched from the legacy chain PUSHFW."""

    backend = "ipset"
    source_tool = "ipset save"
    flush_how = "ipset flush pushfw-<each set>"
    real = True

    def drop_count(self) -> int:
        total = 0
        for name in IPSET_SETS[:2]:
            proc = self.ns.run("ipset", "list", "-t", name, check=False)
            found = _NUMBER_OF_ENTRIES.search(proc.stdout)
            total += int(found[1]) if found else 0
        return total

    def busy_count(self) -> int | None:
        return self.drop_count()

    def drop_sources(self) -> set[str]:
        name = IPSET_SETS[0]
        proc = self.ns.run("ipset", "save", name, check=False)
        prefix = f"add {name} "
        return {
            _bare(line[len(prefix) :].split(" ", 1)[0])
            for line in proc.stdout.splitlines()
            if line.startswith(prefix)
        }

    def flush(self) -> None:
        for name in IPSET_SETS:
            self.ns.run("ipset", "flush", name, check=False)

    def clear(self) -> None:
        """Destroy the sets (after the chain flush drops the rules that reference them), so
        a large run leaves no grown hash table behind for the next one."""
        flush_legacy_chain(self.ns)
        names = self.ns.run("ipset", "list", "-n", check=False).stdout.split()
        for name in names:
            if name.startswith(f"{IPSET_PREFIX}-"):  # the rules' sets and the lists' sets
                self.ns.run("ipset", "destroy", name, check=False)


KERNELS: dict[str, type[Kernel]] = {
    "nftables": NftKernel,
    "ipset": IpsetKernel,
    "iptables": IptablesKernel,
    "memory": Kernel,
}


def kernel(ns: Netns, backend: str) -> Kernel:
    return KERNELS[backend](ns)


def clear_all(ns: Netns) -> None:
    """Every backend's objects gone: the namespace's firewall as a fresh worker would find it."""
    for kind in KERNELS.values():
        kind(ns).clear()
