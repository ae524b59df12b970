"""Rules as elements of ipset sets, matched by one iptables rule per set.

One ``hash:net`` set per action and family, with kernel timeouts, counters and each timed
rule's exact expiry as a comment (so the index can be rebuilt from the kernel); the managed
chain matches the watch sets (a rule with no target: it counts, and the chain goes on), then
the accept sets, then the drop sets. Each batch is one ``ipset -exist
restore`` fed on stdin, never a shell, undone by a second restore if the kernel refuses a
line. Named lists of one action share one set per family (:mod:`.union`). The layout and why:
docs/internals.md, "Kernel layouts".
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pushfw.producer.contract import Action
from pushfw.worker.backends.base import Rule, RuleKey, no_wait_told, wall_ms
from pushfw.worker.backends.entries import gc_paused
from pushfw.worker.backends.index import IndexedBackend, RuleIndex
from pushfw.worker.backends.ipset_cmd import (
    SET_NAME_MAX,
    add_line,
    kernel_timeout_s,
    parse_save,
    restore,
    run,
)
from pushfw.worker.backends.ipset_lists import LIST_ACTIONS, LIST_NAME, IpsetLists
from pushfw.worker.backends.xtables import (
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


_RESIZE_SUFFIX = "-resize"
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")
_TARGETS = {Action.WATCH: "", Action.ACCEPT: "ACCEPT", Action.DROP: "DROP"}
"""Each action's match rule target, in the chain's order; a watch's has none."""


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


class IpsetBackend(IpsetLists, IndexedBackend):
    """Six ``hash:net`` sets matched from the managed chain; one ``ipset restore`` per batch."""

    name = "ipset"

    def __init__(
        self,
        chain: str = "PUSHFW",
        hooks: Sequence[str] = ("INPUT",),
        set_prefix: str = "pushfw",
        maxelem: int = 1_000_000,
        lock_timeout_s: float = 5.0,
        *,
        clock: Callable[[], int] = wall_ms,
        lock_waited: Callable[[float], None] = no_wait_told,
    ) -> None:
        import iptc  # deferred: loading libiptc needs the iptables libraries installed

        super().__init__(clock=clock, lock_waited=lock_waited)

        prefix_max = SET_NAME_MAX - len(f"-accept6{_RESIZE_SUFFIX}")
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
            for action in _TARGETS
        }
        self._counts = dict.fromkeys((s.name for s in self._sets.values()), 0)
        self._chain_entries: dict[int, int | None] = {}
        self._list_set = re.compile(  # a list's own set, before lists shared sets
            rf"{re.escape(set_prefix)}-(?P<action>[ad])(?P<version>[46])(?P<temp>[-+])"
            rf"(?P<name>{LIST_NAME})"
        )
        self._mark = re.compile(
            rf"{re.escape(set_prefix)}-m(?P<action>[{''.join(LIST_ACTIONS.values())}])-"
            rf"(?P<name>{LIST_NAME})"
        )
        self._lists_sets = {
            (action, version): f"{set_prefix}-lists-{LIST_ACTIONS[action]}{version}"
            for version in (4, 6)
            for action in LIST_ACTIONS
        }
        """Per action and family, the ``hash:net`` set the lists of that action share."""
        self._forget_lists()

    def open(self) -> None:
        if iptables_variant() == "nf_tables":
            logger.info(
                "host iptables is the nf_tables variant; pushfw writes the legacy tables "
                "(both filter packets): see its rules with iptables-legacy -S %s",
                self.chain,
            )
        for ipset in self._sets.values():
            self._ensure_set(ipset)
        present = self._run("list", "-n").split()
        self._marks = self._marks_in(present)  # kept: the worker decides which stay
        self._held = {  # an open again (a reconcile) keeps what this process loaded
            n: held for n, held in self._held.items() if self._marks.get(n) is held.action
        }
        self._unknown = set(self._marks) - set(self._held)
        self._restore(  # entries of no list that is held (its marker deleted by hand)
            f"flush {name}\n"
            for (action, _), name in self._lists_sets.items()
            if action not in self._marks.values() and name in present
        )
        self._write_rules(warn=True)
        for name in present:  # a list's own sets, from before lists shared sets
            if self._list_set.fullmatch(name):
                self._run("-exist", "destroy", name)
        self._index = self._read_index()
        logger.info(
            "ipset sets %s-{watch,accept,drop}{4,6} ready in chain %s: %d rules",
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
            lines = (add_line(temp, e, now_ms) for e in elements)
            self._run("-exist", "restore", stdin="".join(lines))
            self._run("swap", ipset.name, temp)  # atomic: rules matching the set keep working
        finally:
            self._run("destroy", temp)

    def _write_rules(self, warn: bool = False) -> None:
        """Make each family's chain hold the match rules of the sets and lists, in order."""
        present = set(self._run("list", "-n").split())  # a rule needs its set in the kernel
        for version in (4, 6):
            with xtables_lock(self.lock_timeout_s, self.lock_waited):
                table = filter_table(self._iptc, version)
                table.refresh()
                ensure_chain(self._iptc, table, version, self.chain, self.hooks)
                self._ensure_match_rules(table, version, present, warn)
                commit_table(self._iptc, table)
                self._chain_entries[version] = chain_entries(table, self.chain, self.hooks)

    def _match_rule(self, version: int, set_name: str, action: Action) -> Any:
        ipt_rule = blank_rule(self._iptc, version)
        match = ipt_rule.create_match("set")
        match.match_set = [set_name, "src"]  # the kernel must know the set already
        ipt_rule.create_target(_TARGETS[action])
        return ipt_rule

    def _set_action(self, set_name: str, version: int) -> Action | None:
        """The action of one of our sets (a rule set or a list's live set) in this family."""
        for (action, set_version), ipset in self._sets.items():
            if ipset.name == set_name and set_version == version:
                return action
        for (action, set_version), lists_set in self._lists_sets.items():
            if lists_set == set_name and set_version == version:
                return action
        parsed = self._list_set.fullmatch(set_name)
        if parsed and parsed["temp"] == "-" and int(parsed["version"]) == version:
            return Action.ACCEPT if parsed["action"] == "a" else Action.DROP
        return None

    def _which_match_rule(self, ipt_rule: Any, version: int) -> str | None:
        """The set this rule matches, if it is exactly a rule pushfw writes for that set."""
        for match in ipt_rule.matches:
            words = match.get_all_parameters().get("match-set", []) if match.name == "set" else []
            action = self._set_action(words[0], version) if words else None
            if action is not None and ipt_rule == self._match_rule(version, words[0], action):
                return str(words[0])
        return None

    def _wanted_rules(self, version: int, present: set[str]) -> list[str]:
        """The sets the chain matches, in order: watches (set, then lists), accepts, drops.
        The lists of an action are matched by one rule, present while there is such a list."""
        wanted: list[str] = []
        for action in _TARGETS:
            wanted.append(self._sets[(action, version)].name)
            lists_set = self._lists_sets[(action, version)]
            if action in self._marks.values() and lists_set in present:
                wanted.append(lists_set)
        return wanted

    def _ensure_match_rules(self, table: Any, version: int, present: set[str], warn: bool) -> None:
        """Make the chain hold our match rules in order; leave other rules alone."""
        chain = self._iptc.Chain(table, self.chain)
        rules = chain.rules
        ours = [(self._which_match_rule(r, version), r) for r in rules]
        ours = [(name, r) for name, r in ours if name is not None]
        if warn and len(ours) < len(rules):
            logger.warning(
                "chain %s (IPv%d) holds %d rules the ipset backend did not write; left alone "
                "(rules of the iptables backend? 'pushfw-worker uninstall' clears the chain)",
                self.chain,
                version,
                len(rules) - len(ours),
            )
        wanted = self._wanted_rules(version, present)
        if [name for name, _ in ours] == wanted:
            return
        for _, ipt_rule in ours:
            chain.delete_rule(ipt_rule)
        for name in reversed(wanted):
            action = self._set_action(name, version)
            assert action is not None  # wanted holds only our sets
            chain.insert_rule(self._match_rule(version, name, action))

    def _read_index(self) -> RuleIndex:
        """The sets' elements; also counts them per set, as :meth:`intact` compares."""
        index = RuleIndex()
        counts = {}
        for ipset in self._sets.values():
            saved = self._run("save", ipset.name)
            before = len(index)
            with gc_paused():
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
            held = self._headers()
        except BackendError as exc:
            logger.debug("ipset sets not checked: %s", exc)
            return True
        marks = [self._mark_name(a, n) for n, a in self._marks.items()]
        shared = [n for (a, _), n in self._lists_sets.items() if a in self._marks.values()]
        return (
            all(name in held for name in [*marks, *shared])
            and all(held.get(name, -1) >= count for name, count in self._counts.items())
            and not self._emptied(held)
        )

    def _headers(self) -> dict[str, int]:
        """Every set's entry count, from their headers alone (``ipset list -t``)."""
        held: dict[str, int] = {}
        name = ""
        for label, _, value in (
            line.partition(": ") for line in self._run("list", "-t").splitlines()
        ):
            if label == "Name":
                name = value
                held[name] = 0
            elif label == "Number of entries" and name:
                held[name] = int(value)
        return held

    def hits(self) -> dict[RuleKey, tuple[int, int]]:
        """Each element's counters, from one ``ipset save`` per set."""
        found: dict[RuleKey, tuple[int, int]] = {}
        for ipset in self._sets.values():
            saved = self._run("save", ipset.name)
            with gc_paused():
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
        """``ipset -exist restore`` fed ``lines`` (see :func:`.ipset_cmd.restore`)."""
        if self._exe is None:
            raise ConfigError("the ipset command is not installed")
        restore(self._exe, lines)

    def _run(self, *args: str, stdin: str | None = None) -> str:
        """Run ``ipset`` with these arguments (no shell); its refusal becomes a BackendError."""
        if self._exe is None:
            raise ConfigError("the ipset command is not installed")
        return run(self._exe, *args, stdin=stdin)

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
        ours = sorted(self._lists_sets.values())
        ours += [f"{name}+" for name in ours]
        ours += sorted(name for name in present if self._mark.fullmatch(name))
        ours += [s.name for s in self._sets.values()]
        ours += [f"{s.name}{_RESIZE_SUFFIX}" for s in self._sets.values()]
        ours += sorted(name for name in present if self._list_set.fullmatch(name))
        self._forget_lists()
        removed = [name for name in ours if name in present]
        for name in removed:
            self._run("destroy", name)
        self._index.clear()
        sets = ", ".join(removed) if removed else "none present"
        return f"{chain_removed(self.chain, found)}; sets: {sets}"
