"""Reading a namespace's firewall the way an operator would: iptables-legacy -S, nft, ipset."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from testbed.netns import Netns

BACKENDS = ("iptables", "nftables", "ipset")
_NFT_SET = re.compile(r"(drop|accept|watch)([46])(_\d+)?")
_NFT_LIST_SET = re.compile(r"lists_(?P<action>drop|accept|watch)[46]_(?P<prefix>\d+)b?")
_IPSET_LIST_LINE = re.compile(r"add pushfw-lists-(?P<action>[adw])[46] (?P<net>\S+)")
_IPSET_LINE = re.compile(
    r"add pushfw-(drop|accept|watch)([46]) (\S+)(?: timeout (\d+))?(?: packets \d+ bytes \d+)?"
    r'(?: comment "([^"]*)")?'
)


def _net(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


@dataclass
class Firewall:
    """One namespace's pushfw rules as the kernel holds them, for one backend."""

    ns: Netns
    backend: str

    def rules(self) -> dict[tuple[str, str], int | None]:
        """(action, network) -> expiry ms from the rule's comment (None: permanent)."""
        match self.backend:
            case "nftables":
                return self._nft()
            case "ipset":
                return self._ipset()
            case _:
                return self._iptables()

    def list_entries(self, name: str) -> list[str]:
        """The entries the kernel holds for list ``name`` (``nft -j list table``, ``ipset
        save``), as CIDR strings in the order the tools print them."""
        if self.backend == "nftables":
            listing = self.ns.run("nft", "-j", "list", "table", "inet", "pushfw", check=False)
            return nft_list_entries(listing.stdout, name)
        if self.backend == "ipset":
            return ipset_list_entries(self.ns.run("ipset", "save", check=False).stdout, name)
        return []

    def _iptables(self) -> dict[tuple[str, str], int | None]:
        out: dict[tuple[str, str], int | None] = {}
        for v6 in (False, True):
            for line in chain_rules(self.ns, v6=v6):
                words = line.split()
                if "-s" not in words:
                    continue
                target = words[words.index("-j") + 1] if "-j" in words else ""
                action = {"ACCEPT": "accept", "DROP": "drop", "": "watch"}.get(target, target)
                exp = re.search(r"exp=(\d+)", line)
                out[(action, _net(words[words.index("-s") + 1]))] = int(exp[1]) if exp else None
        return out

    def _nft_table(self) -> str:
        """``nft -j list table inet pushfw``; "" if there is no such table.

        A listing that overlaps a commit can fail (an interrupted netlink dump): that is
        read again, never taken for an empty table, which would look like every rule gone.
        """
        for _ in range(50):
            proc = self.ns.run("nft", "-j", "list", "table", "inet", "pushfw", check=False)
            if proc.returncode == 0:
                return proc.stdout
            if "No such file or directory" in proc.stderr:
                return ""
        raise AssertionError(f"nft list table inet pushfw keeps failing: {proc.stderr}")

    def _nft(self) -> dict[tuple[str, str], int | None]:
        listing = self._nft_table()
        out: dict[tuple[str, str], int | None] = {}
        for item in json.loads(listing or "{}").get("nftables", []):
            nft_set = item.get("set")
            name = _NFT_SET.fullmatch(nft_set["name"]) if nft_set else None
            if nft_set is None or name is None:
                continue
            for raw in nft_set.get("elem", []):
                elem = raw["elem"] if isinstance(raw, dict) and "elem" in raw else {"val": raw}
                val = elem["val"]
                if isinstance(val, dict):
                    val = f"{val['prefix']['addr']}/{val['prefix']['len']}"
                exp = re.fullmatch(r"exp=(\d+)", str(elem.get("comment", "")))
                out[(name[1], _net(str(val)))] = int(exp[1]) if exp else None
        return out

    def _ipset(self) -> dict[tuple[str, str], int | None]:
        proc = self.ns.run("ipset", "save", check=False)
        out: dict[tuple[str, str], int | None] = {}
        for line in proc.stdout.splitlines():
            parsed = _IPSET_LINE.fullmatch(line.strip())
            if parsed:
                exp = re.fullmatch(r"exp=(\d+)", parsed[5] or "")
                out[(parsed[1], _net(parsed[3]))] = int(exp[1]) if exp else None
        return out

    def dropped(self, v6: bool = False) -> list[str]:
        version = 6 if v6 else 4
        return sorted(
            (
                n
                for a, n in self.rules()
                if a == "drop" and ipaddress.ip_network(n).version == version
            ),
            key=ipaddress.ip_network,
        )

    def accepted(self, v6: bool = False) -> list[str]:
        version = 6 if v6 else 4
        return sorted(
            (
                n
                for a, n in self.rules()
                if a == "accept" and ipaddress.ip_network(n).version == version
            ),
            key=ipaddress.ip_network,
        )

    def dump(self) -> str:
        """Everything the firewall holds, as text (for "nothing else changed" checks)."""
        legacy = self.ns.run("iptables-legacy-save", check=False).stdout
        nft = self.ns.run("nft", "list", "ruleset", check=False).stdout
        sets = self.ns.run("ipset", "save", check=False).stdout
        lines = (legacy + nft + sets).splitlines()
        return "\n".join(x for x in lines if not x.startswith(("#", ":")))

    def flush(self, action: str | None = None) -> None:
        """Remove every managed rule (or those of ``action``) by hand, as an operator's
        mistake or a reload would."""
        actions = ("drop", "accept", "watch") if action is None else (action,)
        match self.backend:
            case "nftables":
                self._flush_nft_sets(actions)
                if action is None:
                    self.ns.run("nft", "flush", "chain", "inet", "pushfw", "input")
            case "ipset":
                for name in actions:
                    for version in (4, 6):
                        self.ns.run("ipset", "flush", f"pushfw-{name}{version}", check=False)
            case _ if action is None:
                self.ns.run("iptables-legacy", "-F", "PUSHFW")
                self.ns.run("ip6tables-legacy", "-F", "PUSHFW")
            case _:
                for (rule_action, net), _exp in self._iptables().items():
                    if rule_action == action:
                        self._delete_rule(net)

    def _flush_nft_sets(self, actions: tuple[str, ...]) -> None:
        listing = json.loads(self.ns.run("nft", "-j", "list", "sets", "inet").stdout)
        for item in listing.get("nftables", []):
            name = _NFT_SET.fullmatch(item["set"]["name"]) if "set" in item else None
            if name and item["set"]["table"] == "pushfw" and name[1] in actions:
                self.ns.run("nft", "flush", "set", "inet", "pushfw", item["set"]["name"])

    def _delete_rule(self, net: str) -> None:
        """``iptables -D`` of the managed rules of ``net`` that :meth:`flush` removes."""
        v6 = ipaddress.ip_network(net).version == 6
        tool = "ip6tables-legacy" if v6 else "iptables-legacy"
        for line in chain_rules(self.ns, v6=v6):
            words = shlex.split(line)
            if "-j" not in words and _net(words[words.index("-s") + 1]) == net:
                self.ns.run(tool, "-D", *words[1:])

    def wipe(self) -> None:
        """Empty the whole firewall, as a reboot does."""
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            self.ns.run(tool, "-F")
            self.ns.run(tool, "-X")
        self.ns.run("nft", "flush", "ruleset", check=False)
        self.ns.run("ipset", "destroy", check=False)


def nft_list_entries(listing: str, name: str) -> list[str]:
    """What the kernel enforces for list ``name`` in ``nft -j list table inet pushfw``: the
    lists of one action share sets, so these are the entries of every loaded list of its
    action (its marker set ``mark_<action>_<name>`` says which): with one such list, its own."""
    items = json.loads(listing or "{}").get("nftables", [])
    names = [item["set"]["name"] for item in items if "set" in item]
    action = next(
        (n.split("_")[1] for n in names if n.startswith("mark_") and n.split("_", 2)[2] == name),
        None,
    )
    found = []
    for item in items:
        parsed = _NFT_LIST_SET.fullmatch(item.get("set", {}).get("name", ""))
        if action is not None and parsed and parsed["action"] == action:
            for raw in item["set"].get("elem", []):
                value = raw["elem"]["val"] if isinstance(raw, dict) else raw
                found.append(_net(f"{value}/{parsed['prefix']}"))
    return found


def ipset_list_entries(saved: str, name: str) -> list[str]:
    """What the kernel enforces for list ``name`` in ``ipset save``: the lists of one action
    share sets, so these are the entries of every loaded list of its action (its marker set
    ``pushfw-m<a|d|w>-<name>`` says which): with one such list, its own."""
    marker = re.search(rf"^create pushfw-m([adw])-{re.escape(name)} ", saved, re.MULTILINE)
    found = []
    for line in saved.splitlines():
        parsed = _IPSET_LIST_LINE.match(line)
        if marker and parsed and parsed["action"] == marker[1]:
            found.append(_net(parsed["net"]))
    return found


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


def kernel_view(ns: Netns, backend: str, dump: bool = False) -> Any:
    """The managed rules the kernel holds, as a ``snapshot`` step lists them, and how many
    kernel entries hold them (a duplicate entry shows as more entries than rules); with
    ``dump``, the whole firewall as text instead."""
    fw = Firewall(ns, backend)
    if dump:
        six = ns.run("ip6tables-legacy-save", check=False).stdout.splitlines()
        lines = [*fw.dump().splitlines(), *(x for x in six if not x.startswith(("#", ":")))]
        return "\n".join(_without_empty_tables(lines))
    rules = sorted([action, net, exp] for (action, net), exp in fw.rules().items())
    entries = len(rules)
    if backend == "iptables":  # one x_tables entry per rule: count them, duplicates included
        entries = sum(" -s " in line for v6 in (False, True) for line in chain_rules(ns, v6=v6))
    return {"rules": rules, "entries": entries}


def _without_empty_tables(lines: list[str]) -> list[str]:
    """Drop ``*table`` / ``COMMIT`` pairs with no rule between: libiptc instantiates the
    built-in x_tables tables (nat, raw, ...) of a namespace, which holds no rule the more."""
    out: list[str] = []
    for line in lines:
        if line == "COMMIT" and out and out[-1].startswith("*"):
            out.pop()
        else:
            out.append(line)
    return out


def by_family(entries: list[str]) -> list[str]:
    """Networks sorted IPv4 first, then by address and length (how list contents compare)."""

    def order(entry: str) -> tuple[int, Any]:
        network = ipaddress.ip_network(entry)
        return network.version, network

    return sorted(entries, key=order)


def list_content(
    backend_name: str, name: str, backend: Any = None, ns: Netns | None = None
) -> list[str]:
    """The entries the kernel (or the memory backend) holds for list ``name``, sorted, read
    with the operator's tools (``nft -j list table``, ``ipset save``), never through the
    backend under test. ``ns`` None: this process is inside the namespace already."""
    if backend_name == "memory":
        return by_family(list(backend.lists.get(name, (None, set()))[1]))
    prefix = ["ip", "netns", "exec", ns.name] if ns else []
    if backend_name == "nftables":
        listing = subprocess.run(
            [*prefix, "nft", "-j", "list", "table", "inet", "pushfw"],
            capture_output=True,
            text=True,
        ).stdout
        return by_family(nft_list_entries(listing, name))
    saved = subprocess.run([*prefix, "ipset", "save"], capture_output=True, text=True).stdout
    return by_family(ipset_list_entries(saved, name))
