"""Rules as elements of ipset sets, matched by one iptables rule per set.

One ``hash:net`` set per action and family (``pushfw-accept4``, ``pushfw-drop4``,
``pushfw-accept6``, ``pushfw-drop6``), created with ``timeout 0``, ``counters`` and
``comment``: every element may carry a kernel timeout (0 means permanent), counts the packets
and bytes it matched (:meth:`IpsetBackend.hits`), and a timed element carries its exact
expiry as a comment (``exp=<ms>``), so the index, and timed rules' expiry, can be rebuilt from
the kernel. A set made before counters is moved to one with them at open, as a ``maxelem``
change is (a new set, one restore, an atomic ``swap``). A timed element's kernel timeout is
the time remaining, rounded up, plus a second, so a ban ends even if the worker is down; the
worker still deletes it at the exact millisecond, first.

The managed chain (the iptables backend's chain, jumped to once from each hook chain) holds
two rules per family: match the accept set and ACCEPT, then match the drop set and DROP, so an
allow always wins over a ban. Any other rule in that chain is left alone.

Each batch is one ``ipset -exist restore`` process fed on stdin (never a shell), its lines
built only from ``ipaddress`` network strings and integers. ``restore`` stops at the first
line the kernel refuses but keeps the lines before it, so a failed batch is undone by a second
restore that puts back the previous state of every element the batch touched.

Needs the ``ip_set`` and ``xt_set`` kernel modules; sets, like chains, are per network
namespace.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pushfw.producer.contract import Action, Network
from pushfw.worker.backends.base import IndexedBackend, Rule, RuleKey
from pushfw.worker.backends.iptables import (
    blank_rule,
    chain_entries,
    chain_removed,
    commit_table,
    count_entries,
    ensure_chain,
    filter_table,
    iptables_variant,
    remove_chain,
    xtables_lock,
)
from pushfw.worker.errors import BackendError, ConfigError, PermanentBackendError

logger = logging.getLogger(__name__)

MAX_TIMEOUT_S = 2_147_483
"""The largest element timeout ipset accepts (about 24.8 days)."""

_RUN_TIMEOUT_S = 300.0
_RESIZE_SUFFIX = "-resize"
_SET_NAME_MAX = 31  # IPSET_MAXNAMELEN - 1
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")
_SAVED = re.compile(  # one line of ``ipset save``, in the order ipset prints the options
    r"^add (?P<set>\S+) (?P<addr>[^\s/]+)(?:/(?P<prefix>\d{1,3}))?"
    r"(?: timeout (?P<timeout>\d+))?(?: packets (?P<packets>\d+) bytes (?P<bytes>\d+))?"
    r'(?: comment "(?:exp=(?P<exp>\d{1,19})|[^"]*)")?(?P<rest>.*)$',
    re.MULTILINE,
)
_FAMILIES: dict[int, tuple[socket.AddressFamily, type[Network], int]] = {
    4: (socket.AF_INET, ipaddress.IPv4Network, 32),
    6: (socket.AF_INET6, ipaddress.IPv6Network, 128),
}
_TARGETS = {Action.ACCEPT: "ACCEPT", Action.DROP: "DROP"}


class Element(NamedTuple):
    """One element as ``ipset save`` prints it."""

    network: Network
    timeout_s: int
    expires_ms: int | None
    counters: tuple[int, int] | None = None
    """(packets, bytes) in a set created with ``counters``."""


def kernel_timeout_s(expires_ms: int, now_ms: int) -> int:
    """The element timeout for an expiry: seconds remaining rounded up, plus one.

    The worker deletes the element at the exact millisecond; the kernel's timeout is the
    backstop for a worker that is down. The extra second keeps the kernel from removing an
    element first whenever the worker is late by a fraction of a second: the heartbeat's
    count check (:meth:`IpsetBackend.intact`) would take that for a hand flush and reconcile.
    Past ipset's limit the element is permanent in the kernel (0) and only the worker's own
    delete ends it: a ban must never end early.
    """
    remaining_s = max(1, -(-(expires_ms - now_ms) // 1000)) + 1
    return remaining_s if remaining_s <= MAX_TIMEOUT_S else 0


def parse_save(text: str, set_name: str, version: int) -> Iterator[Element]:
    """The elements of ``set_name`` in ``ipset save`` output (which prints /32 and /128 bare).

    Fast enough for a million elements: the addresses go through ``inet_pton``, not the much
    slower ``ipaddress`` string parser.
    """
    family, network_type, max_prefixlen = _FAMILIES[version]
    for found in _SAVED.finditer(text):
        if found["set"] != set_name:
            continue
        if found["rest"].strip():  # nomatch, counters...: not an element pushfw writes
            logger.warning("set %s holds %s, not written by pushfw", set_name, found[0][:80])
            continue
        try:
            address = int.from_bytes(socket.inet_pton(family, found["addr"]))
            prefixlen = int(found["prefix"] or max_prefixlen)
            network = network_type((address, prefixlen), strict=False)
        except (OSError, ValueError):
            logger.warning("set %s holds %s, not a network", set_name, found[0][:80])
            continue
        exp, packets = found["exp"], found["packets"]
        counters = (int(packets), int(found["bytes"])) if packets is not None else None
        yield Element(network, int(found["timeout"] or 0), int(exp) if exp else None, counters)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC, which a million new (acyclic) objects set off over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class _Set:
    name: str
    action: Action
    version: int

    @property
    def family(self) -> str:
        return "inet" if self.version == 4 else "inet6"

    def create_args(self, name: str, maxelem: int) -> list[str]:
        # timeout 0: elements may carry a timeout, 0 (the default) keeping one for ever
        options = ["family", self.family, "timeout", "0", "counters", "comment"]
        options += ["maxelem", str(maxelem)]
        return [name, "hash:net", *options]


class IpsetBackend(IndexedBackend):
    """Four ``hash:net`` sets matched from the managed chain; one ``ipset restore`` per batch."""

    name = "ipset"

    def __init__(
        self,
        chain: str = "PUSHFW",
        hooks: Sequence[str] = ("INPUT",),
        set_prefix: str = "pushfw",
        maxelem: int = 1_000_000,
        lock_timeout_s: float = 5.0,
    ) -> None:
        import iptc  # deferred: loading libiptc needs the iptables libraries installed

        super().__init__()

        prefix_max = _SET_NAME_MAX - len(f"-accept6{_RESIZE_SUFFIX}")
        if not _PREFIX.fullmatch(set_prefix) or len(set_prefix) > prefix_max:
            raise ConfigError(
                f"set prefix {set_prefix!r}: use 1 to {prefix_max} letters, digits, '-', '_', '.'"
            )
        if not 1 <= maxelem < 2**32:
            raise ConfigError(f"maxelem {maxelem}: must be between 1 and 2**32 - 1")
        self.chain = chain
        self.hooks = tuple(hooks)
        self.set_prefix = set_prefix
        self.maxelem = maxelem
        self.lock_timeout_s = lock_timeout_s
        self._iptc = iptc
        self._exe = shutil.which("ipset")
        self._sets = {
            (action, version): _Set(f"{set_prefix}-{action.value}{version}", action, version)
            for version in (4, 6)
            for action in (Action.ACCEPT, Action.DROP)
        }
        self._counts = dict.fromkeys((s.name for s in self._sets.values()), 0)
        self._chain_entries: dict[int, int | None] = {}

    def open(self) -> None:
        if iptables_variant() == "nf_tables":
            logger.info(
                "host iptables is the nf_tables variant; pushfw writes the legacy tables "
                "(both filter packets): see its rules with iptables-legacy -S %s",
                self.chain,
            )
        for ipset in self._sets.values():
            self._ensure_set(ipset)
        for version in (4, 6):
            with xtables_lock(self.lock_timeout_s, self.lock_waited):
                table = filter_table(self._iptc, version)
                table.refresh()
                ensure_chain(self._iptc, table, version, self.chain, self.hooks)
                self._ensure_match_rules(table, version)
                commit_table(self._iptc, table)
                self._chain_entries[version] = chain_entries(table, self.chain, self.hooks)
        self._index = self._read_index()
        logger.info(
            "ipset sets %s-{accept,drop}{4,6} ready in chain %s: %d rules",
            self.set_prefix,
            self.chain,
            len(self._index),
        )

    def _ensure_set(self, ipset: _Set) -> None:
        try:
            self._run("-exist", "create", *ipset.create_args(ipset.name, self.maxelem))
            return
        except BackendError as exc:
            refusal = exc  # the set exists with other options, or ipset cannot work here
        try:
            header = self._run("list", "-t", ipset.name)
        except BackendError:
            raise refusal from None
        words = dict(re.findall(r"^(Type|Header): (.*)$", header, re.MULTILINE))
        options = words.get("Header", "").split()
        compatible = (
            words.get("Type") == "hash:net"
            and options[:2] == ["family", ipset.family]
            and {"timeout", "comment", "maxelem"} <= set(options)
            and options[options.index("timeout") + 1] == "0"
        )
        if not compatible:
            raise ConfigError(
                f"set {ipset.name} exists with other options ({header.strip()!r}); "
                "remove it (pushfw-worker uninstall) and start again"
            ) from refusal
        old_maxelem = int(options[options.index("maxelem") + 1])
        changes = (
            [] if old_maxelem == self.maxelem else [f"maxelem {old_maxelem} -> {self.maxelem}"]
        )
        if "counters" not in options:
            changes.append("counters added (hit counts start at 0)")
        self._resize(ipset, ", ".join(changes) or "recreated")

    def _resize(self, ipset: _Set, changes: str) -> None:
        """Move a set's elements to a set with the configured options (``maxelem``,
        ``counters``), which ipset cannot change in place; counts already kept go along."""
        temp = f"{ipset.name}{_RESIZE_SUFFIX}"
        logger.warning("set %s: %s", ipset.name, changes)
        self._run("-exist", "destroy", temp)  # left over by an interrupted resize
        self._run("create", *ipset.create_args(temp, self.maxelem))
        try:
            elements = parse_save(self._run("save", ipset.name), ipset.name, ipset.version)
            now_ms = self.clock()
            lines = (_add_line(temp, e, now_ms) for e in elements)
            self._run("-exist", "restore", stdin="".join(lines))
            self._run("swap", ipset.name, temp)  # atomic: rules matching the set keep working
        finally:
            self._run("destroy", temp)

    def _match_rule(self, version: int, action: Action) -> Any:
        ipt_rule = blank_rule(self._iptc, version)
        match = ipt_rule.create_match("set")
        match.match_set = [self._sets[(action, version)].name, "src"]
        ipt_rule.create_target(_TARGETS[action])
        return ipt_rule

    def _which_match_rule(self, ipt_rule: Any, version: int) -> Action | None:
        """The action whose set this rule matches, if it is exactly a rule pushfw writes."""
        for action in (Action.ACCEPT, Action.DROP):
            if ipt_rule == self._match_rule(version, action):  # matches, addresses, target
                return action
        return None

    def _ensure_match_rules(self, table: Any, version: int) -> None:
        """Make the chain hold our accept rule then our drop rule; leave other rules alone."""
        chain = self._iptc.Chain(table, self.chain)
        rules = chain.rules
        ours = [(self._which_match_rule(r, version), r) for r in rules]
        ours = [(action, r) for action, r in ours if action is not None]
        if len(ours) < len(rules):
            logger.warning(
                "chain %s (IPv%d) holds %d rules the ipset backend did not write; left alone "
                "(rules of the iptables backend? 'pushfw-worker uninstall' clears the chain)",
                self.chain,
                version,
                len(rules) - len(ours),
            )
        if [action for action, _ in ours] == [Action.ACCEPT, Action.DROP]:
            return
        for _, ipt_rule in ours:
            chain.delete_rule(ipt_rule)
        chain.insert_rule(self._match_rule(version, Action.DROP))
        chain.insert_rule(self._match_rule(version, Action.ACCEPT))

    def _read_index(self) -> dict[RuleKey, Rule]:
        """The sets' elements; also counts them per set, as :meth:`intact` compares."""
        index: dict[RuleKey, Rule] = {}
        counts = {}
        for ipset in self._sets.values():
            saved = self._run("save", ipset.name)
            before = len(index)
            with _gc_paused():
                for element in parse_save(saved, ipset.name, ipset.version):
                    key = RuleKey(ipset.action, element.network)
                    index[key] = Rule(key, element.expires_ms)
            counts[ipset.name] = len(index) - before
        self._counts = counts
        return index

    def intact(self) -> bool:
        """The chain holds its match rules behind each hook's jump, and no set holds fewer
        elements than the index counts: a flushed set holds none, and an element the kernel
        timed out still counts until its garbage collector runs, so more is no alarm."""
        chain = count_entries(self._iptc, self.chain, self.hooks)
        if chain is not None and chain != self._chain_entries:
            return False
        try:
            headers = self._run("list", "-t")  # every set's header, none of their elements
        except BackendError as exc:
            logger.debug("ipset sets not checked: %s", exc)
            return True
        names: set[str] = set()
        held: dict[str, int] = {}
        for label, _, value in (line.partition(": ") for line in headers.splitlines()):
            if label == "Name":
                names.add(value)
                name = value
            elif label == "Number of entries" and names:
                held[name] = int(value)
        return all(
            name in names and held.get(name, count) >= count for name, count in self._counts.items()
        )

    def hits(self) -> dict[RuleKey, tuple[int, int]]:
        """Each element's counters, from one ``ipset save`` per set."""
        found: dict[RuleKey, tuple[int, int]] = {}
        for ipset in self._sets.values():
            saved = self._run("save", ipset.name)
            with _gc_paused():
                for element in parse_save(saved, ipset.name, ipset.version):
                    if element.counters is not None:
                        found[RuleKey(ipset.action, element.network)] = element.counters
        return found

    def commit(self) -> None:
        staged, self._staged = self._staged, []
        if not staged:
            return
        now_ms = self.clock()
        lines = [self._line(key, rule, now_ms) for key, rule in staged]  # checks before any I/O
        started = time.monotonic()
        try:
            self._restore(lines)
        except BackendError:
            self._roll_back([key for key, _ in staged], now_ms)
            raise
        for key, rule in staged:
            name = self._sets[(key.action, key.network.version)].name
            if self._index.pop(key, None) is not None:
                self._counts[name] -= 1
            if rule is not None:
                self._index[key] = rule
                self._counts[name] += 1
        logger.debug("ipset restore: %d changes in %.3f s", len(staged), time.monotonic() - started)

    def _roll_back(self, keys: list[RuleKey], now_ms: int) -> None:
        """Put back the committed state of every element a failed batch touched."""
        touched = dict.fromkeys(keys)
        removals = [self._line(key, None, now_ms) for key in touched if key not in self._index]
        restores = [self._line(k, self._index[k], now_ms) for k in touched if k in self._index]
        try:
            self._restore(removals + restores)  # removals first: a full set has room again
        except BackendError as exc:
            logger.error("undoing a failed ipset batch failed too (%s); reading the sets", exc)
            try:
                self._index = self._read_index()
            except BackendError as read_exc:
                logger.error("cannot read the ipset sets (%s); the index may be stale", read_exc)

    def _line(self, key: RuleKey, rule: Rule | None, now_ms: int) -> str:
        net = key.network
        if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise PermanentBackendError(f"not a network: {net!r}")  # lines carry no free text
        name = self._sets[(key.action, net.version)].name
        if rule is None:
            return f"del {name} {net}\n"
        if net.prefixlen == 0:
            raise PermanentBackendError(f"an ipset hash:net cannot hold {net}")
        if rule.expires_ms is None:
            return f"add {name} {net} timeout 0\n"
        expires_ms = int(rule.expires_ms)
        timeout_s = kernel_timeout_s(expires_ms, now_ms)
        return f'add {name} {net} timeout {timeout_s} comment "exp={expires_ms}"\n'

    def _restore(self, lines: Iterable[str]) -> None:
        # -exist: an add of a present element renews its timeout and comment, a del of an
        # absent one is a no-op, so a replayed batch has the effect of one.
        self._run("-exist", "restore", stdin="".join(lines))

    def _run(self, *args: str, stdin: str | None = None) -> str:
        """Run ``ipset`` with these arguments (no shell); its refusal becomes a BackendError."""
        if self._exe is None:
            raise ConfigError("the ipset command is not installed")
        command = next(a for a in args if not a.startswith("-"))
        try:
            proc = subprocess.run(
                [self._exe, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_RUN_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"ipset {command}: {exc}") from exc
        if proc.returncode == 0:
            return proc.stdout
        message = " ".join(proc.stderr.split())[:300] or f"exit status {proc.returncode}"
        # ipset reports errors only as text, so a full set can only be told by its words
        # ("Hash is full, cannot add more elements"); the lines we send carry no free text
        # that could fake them. Adding to a full set never succeeds by retrying.
        if command == "restore" and "is full" in message:
            raise PermanentBackendError(f"ipset {command}: {message}")
        raise BackendError(f"ipset {command}: {message}")

    def uninstall(self) -> str:
        """Remove the jumps, the managed chain and pushfw's sets; other rules and sets stay."""
        if self._exe is None:
            raise ConfigError("the ipset command is not installed")
        found = []
        for version in (4, 6):
            with xtables_lock(self.lock_timeout_s, self.lock_waited):
                table = filter_table(self._iptc, version)
                table.refresh()
                if remove_chain(self._iptc, table, self.chain, self.hooks):
                    found.append(f"IPv{version}")
                commit_table(self._iptc, table)
        present = set(self._run("list", "-n").split())
        ours = [s.name for s in self._sets.values()]
        ours += [f"{name}{_RESIZE_SUFFIX}" for name in ours]
        removed = [name for name in ours if name in present]
        for name in removed:
            self._run("destroy", name)
        self._index = {}
        sets = ", ".join(removed) if removed else "none present"
        return f"{chain_removed(self.chain, found)}; sets: {sets}"


def _add_line(set_name: str, element: Element, now_ms: int) -> str:
    """An element copied to another set; ``save`` rounds timeouts down, so recompute them."""
    timeout_s = element.timeout_s
    if element.expires_ms is not None and timeout_s:
        timeout_s = kernel_timeout_s(element.expires_ms, now_ms)
    line = f"add {set_name} {element.network} timeout {int(timeout_s)}"
    if element.counters is not None:
        line += f" packets {int(element.counters[0])} bytes {int(element.counters[1])}"
    if element.expires_ms is not None:
        line += f' comment "exp={int(element.expires_ms)}"'
    return line + "\n"
