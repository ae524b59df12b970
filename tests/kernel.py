"""Reading a namespace's kernel tables the way an operator would: iptables-legacy -S."""

from __future__ import annotations

from tests.conftest import Netns


def chain_rules(ns: Netns, chain: str = "PUSHFW", v6: bool = False) -> list[str]:
    """``-A`` lines of ``chain`` (empty if the chain does not exist)."""
    tool = "ip6tables-legacy" if v6 else "iptables-legacy"
    proc = ns.run(tool, "-S", chain, check=False)
    return [line for line in proc.stdout.splitlines() if line.startswith("-A ")]


def dropped(ns: Netns, v6: bool = False) -> list[str]:
    return [line.split()[3] for line in chain_rules(ns, v6=v6) if line.endswith("-j DROP")]


def accepted(ns: Netns, v6: bool = False) -> list[str]:
    return [line.split()[3] for line in chain_rules(ns, v6=v6) if line.endswith("-j ACCEPT")]
