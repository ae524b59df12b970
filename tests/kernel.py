"""Reading a namespace's kernel tables the way an operator would: iptables-legacy -S."""

from __future__ import annotations

import subprocess

from tests.conftest import Netns


def veth(a: Netns, a_ip: str, b: Netns, b_ip: str, tag: str = "") -> None:
    """A veth pair between two namespaces, each end addressed (/24) and up."""
    left, right = f"pf{tag}a{a.name[-7:]}", f"pf{tag}b{a.name[-7:]}"
    subprocess.run(["ip", "link", "add", left, "type", "veth", "peer", "name", right], check=True)
    subprocess.run(["ip", "link", "set", left, "netns", a.name], check=True)
    subprocess.run(["ip", "link", "set", right, "netns", b.name], check=True)
    a.run("ip", "addr", "add", f"{a_ip}/24", "dev", left)
    b.run("ip", "addr", "add", f"{b_ip}/24", "dev", right)
    a.run("ip", "link", "set", left, "up")
    b.run("ip", "link", "set", right, "up")


def chain_rules(ns: Netns, chain: str = "PUSHFW", v6: bool = False) -> list[str]:
    """``-A`` lines of ``chain`` (empty if the chain does not exist)."""
    tool = "ip6tables-legacy" if v6 else "iptables-legacy"
    proc = ns.run(tool, "-S", chain, check=False)
    return [line for line in proc.stdout.splitlines() if line.startswith("-A ")]


def dropped(ns: Netns, v6: bool = False) -> list[str]:
    return [line.split()[3] for line in chain_rules(ns, v6=v6) if line.endswith("-j DROP")]


def accepted(ns: Netns, v6: bool = False) -> list[str]:
    return [line.split()[3] for line in chain_rules(ns, v6=v6) if line.endswith("-j ACCEPT")]
