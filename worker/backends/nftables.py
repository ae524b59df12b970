"""Rules as elements of sets in a table of pushfw's own (``inet pushfw``), via libnftables JSON.

Sets (plain for addresses, one ``interval`` set per prefix length for networks) carry each
rule's exact expiry as a comment and a kernel timeout, so the index can be rebuilt from the
kernel and a ban ends even while the worker is away; the chains' rules are a pure function
of the sets, and every batch is one nft transaction. Named lists of one action
share one set per prefix length (:mod:`.union`), so packets walk the same rules however
many lists there are. The layout and why: docs/internals.md, "Kernel layouts".
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from pushfw.producer.contract import Action, Network
from pushfw.worker.backends.base import Rule, RuleKey, wall_ms
from pushfw.worker.backends.index import IndexedBackend, RuleIndex
from pushfw.worker.backends.netlink import rule_lookups, set_is_empty, set_names
from pushfw.worker.backends.nft_lists import UNION, NftLists, mark_name, union_set_name
from pushfw.worker.errors import BackendError, ConfigError, PermanentBackendError
from pushfw.worker.expiry import kernel_timeout_s

logger = logging.getLogger(__name__)

_HOOKS = {"INPUT": "input", "FORWARD": "forward", "DOCKER-USER": "forward"}
_PRIORITY = -10
_SET_NAME = re.compile(r"(?P<action>drop|accept|watch)(?P<version>[46])(?:_(?P<prefix>\d{1,3}))?")
_MAX_PREFIXLEN = {4: 32, 6: 128}
Json = dict[str, Any]


def set_name(key: RuleKey) -> str:
    """The set holding this rule: ``drop4`` for addresses, ``drop4_24`` for /24 networks."""
    net = key.network
    base = f"{key.action.value}{net.version}"
    return base if net.prefixlen == net.max_prefixlen else f"{base}_{net.prefixlen}"


def _elem_value(net: Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _parse_elem(raw: Any) -> tuple[Network, str]:
    """An element as nft lists it: ``"1.2.3.4"``, ``{"prefix": ...}`` or ``{"elem": {...}}``."""
    elem = raw["elem"] if isinstance(raw, dict) and "elem" in raw else {"val": raw}
    value = elem["val"]
    if isinstance(value, dict) and "prefix" in value:
        prefix = value["prefix"]
        return ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}"), str(
            elem.get("comment", "")
        )
    return ipaddress.ip_network(str(value)), str(elem.get("comment", ""))


def _version(name: str) -> int:
    parsed = _SET_NAME.fullmatch(name) or UNION.fullmatch(name)
    return int(parsed["version"]) if parsed else 4


def _source(name: str) -> Json:
    """What a rule looks up in set ``name``: the source address, masked for a list's prefix."""
    version = _version(name)
    saddr: Json = {"payload": {"protocol": "ip6" if version == 6 else "ip", "field": "saddr"}}
    parsed = UNION.fullmatch(name)
    if parsed is None or int(parsed["prefix"]) == _MAX_PREFIXLEN[version]:
        return saddr
    mask = ipaddress.ip_network(f"{'::' if version == 6 else '0.0.0.0'}/{parsed['prefix']}")
    return {"&": [saddr, str(mask.netmask)]}


class NftablesBackend(NftLists, IndexedBackend):
    """Sets in ``inet <table>``; one nft transaction per batch."""

    name = "nftables"

    def __init__(
        self,
        table: str = "pushfw",
        hooks: Sequence[str] = ("INPUT",),
        set_size: int = 1_000_000,
        *,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        import nftables  # deferred: loads the system's libnftables

        super().__init__(clock=clock)

        unknown = [h for h in hooks if h.upper() not in _HOOKS]
        if unknown:
            raise ConfigError(f"nftables backend: unsupported hook(s) {unknown}; use INPUT/FORWARD")
        self.table = table
        self.set_size = set_size
        self.hooks = sorted({_HOOKS[h.upper()] for h in hooks})
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._sets: set[str] = set()
        self._counts: Counter[str] = Counter()  # elements per set, as the index has them
        self._uncounted: set[str] = set()  # sets made before counters, moved at open
        self._chains: set[str] = set()
        self._forget_lists()
        self.readd_renews: bool | None = None

    def _run(self, commands: list[Json]) -> Any:
        rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise BackendError(f"nft: {str(error).strip()[:500]}")
        return output

    def _t(self, **fields: Any) -> Json:
        return {"family": "inet", "table": self.table, **fields}

    def open(self) -> None:
        self._run([{"add": {"table": {"family": "inet", "name": self.table}}}])
        listing, names = self._listing()
        self._read(listing)
        stale = self._open_lists(names)  # the worker decides which lists stay
        self._sets |= {f"{a.value}{v}" for a in Action for v in (4, 6)}
        if self._uncounted:
            self._add_counters()
        cmds = self._hook_commands()  # no rule may hold a set while it is deleted
        cmds += [{"delete": {"set": self._t(name=n)}} for n in stale]
        if stale:  # a refill cut short, or a list's own sets from before lists shared sets
            logger.warning("nftables: removing the list sets %s", ", ".join(stale))
        self._run(cmds + self._schema_commands(self._sets))
        if self.readd_renews is None:
            self.readd_renews = self._probe_renewal()
        logger.info(
            "nftables table inet %s ready: %d rules; re-adding an element %s its timeout "
            "(pushfw renews by delete + add in one transaction either way)",
            self.table,
            len(self._index),
            "renews" if self.readd_renews else "does not renew",
        )

    def _matched_sets(self) -> set[str]:
        """The sets the table's rules look up (none known if the rules cannot be read)."""
        try:
            return {n for found in rule_lookups(self.table).values() for n in found}
        except (OSError, struct.error, ValueError) as exc:
            logger.debug("nftables: rules not read: %s", exc)
            return set()

    def _listing(self) -> tuple[Json, set[str]]:
        """The table's chains and rule sets with their elements, and every set's name.

        One listing per rule set: a ``list table`` would fetch the lists' elements too.
        """
        names = self._set_names()
        chains = self._run([{"list": {"chains": {"family": "inet"}}}]) or {}
        items = [
            item
            for item in chains.get("nftables", [])
            if "chain" in item and item["chain"].get("table") == self.table
        ]
        for name in sorted(n for n in names if _SET_NAME.fullmatch(n)):
            items += (self._run([{"list": {"set": self._t(name=name)}}]) or {}).get("nftables", [])
        return {"nftables": items}, names

    def _set_names(self) -> set[str]:
        """The names of the table's sets, from one netlink dump that fetches no element."""
        try:
            return set_names(self.table)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return set()
            raise BackendError(f"nftables table inet {self.table} not readable: {exc}") from exc

    def _read(self, listing: Any) -> None:
        """Take the index, the sets and their element counts from a listing of the table."""
        index = RuleIndex()
        sets: set[str] = set()
        self._uncounted, self._chains = set(), set()
        for item in (listing or {}).get("nftables", []):
            if "chain" in item:
                self._chains.add(item["chain"]["name"])
            nft_set = item.get("set")
            parsed = _SET_NAME.fullmatch(nft_set["name"]) if nft_set else None
            if nft_set is None or parsed is None:
                continue
            sets.add(nft_set["name"])
            if not any("counter" in stmt for stmt in nft_set.get("stmt", [])):
                self._uncounted.add(nft_set["name"])
            action = Action(parsed["action"])
            for raw in nft_set.get("elem", []):
                network, comment = _parse_elem(raw)
                key = RuleKey(action, network)
                expires_ms = int(comment[4:]) if comment.startswith("exp=") else None
                index[key] = Rule(key, expires_ms)
        self._index, self._sets = index, sets
        self._counts = Counter(set_name(key) for key in index)

    def _add_counters(self) -> None:
        """Move the elements of sets made before counters to sets with them, atomically."""
        old = sorted(self._uncounted)
        logger.warning(
            "nftables sets %s have no counters: moving their %d elements to sets with them",
            ", ".join(old),
            sum(self._counts[name] for name in old),
        )
        cmds: list[Json] = [{"flush": {"chain": self._t(name=c)}} for c in sorted(self._chains)]
        cmds += [{"delete": {"set": self._t(name=name)}} for name in old]
        cmds += self._schema_commands(self._sets)
        moved: dict[str, list[Any]] = {}  # one add per set: a million elements stay one command
        for key, rule in self._index.pairs():
            if set_name(key) in self._uncounted:
                moved.setdefault(set_name(key), []).extend(self._element(key, rule)["elem"])
        cmds += [{"add": {"element": self._t(name=n, elem=e)}} for n, e in sorted(moved.items())]
        self._run(cmds)
        self._uncounted = set()

    def hits(self) -> dict[RuleKey, tuple[int, int]]:
        """Each rule's element counter, from a listing of the rules' sets (lists left out)."""
        listing, _ = self._listing()
        found: dict[RuleKey, tuple[int, int]] = {}
        for item in (listing or {}).get("nftables", []):
            nft_set = item.get("set")
            parsed = _SET_NAME.fullmatch(nft_set["name"]) if nft_set else None
            if nft_set is None or parsed is None:
                continue
            action = Action(parsed["action"])
            for raw in nft_set.get("elem", []):
                elem = raw.get("elem") if isinstance(raw, dict) else None
                counter = elem.get("counter") if isinstance(elem, dict) else None
                if isinstance(counter, dict):  # absent in a set made before counters
                    network, _ = _parse_elem(raw)
                    found[RuleKey(action, network)] = (counter["packets"], counter["bytes"])
        return found

    def _put(self, key: RuleKey, rule: Rule | None) -> None:
        """Add, replace (``rule``) or remove (None) one index entry, keeping the counts."""
        if self._index.pop(key, None) is not None:
            self._counts[set_name(key)] -= 1
        if rule is not None:
            self._index[key] = rule
            self._counts[set_name(key)] += 1

    def intact(self) -> bool:
        """The sets, each hook chain's rules matching them, and an element in every set the
        index fills, read with small netlink dumps (:mod:`.netlink`); cost is independent of
        how many elements the sets hold. Elements are not counted: nf_tables keeps no count."""
        try:
            sets = set_names(self.table)
            found = rule_lookups(self.table)
            lookups = {hook: found.get(hook, []) for hook in self.hooks}
            emptied = [n for n in sorted(self._sets) if self._counts[n] > 0 and self._empty(n)]
            emptied += [str(g) for g in sorted(self._emptied_groups(), key=str)]
        except OSError as exc:
            logger.debug("nftables table inet %s not checked: %s", self.table, exc)
            return exc.errno != errno.ENOENT
        except (struct.error, ValueError) as exc:  # a reply this reader does not understand
            logger.debug("nftables table inet %s not checked: %s", self.table, exc)
            return True
        matched = self._sets | {
            union_set_name(a, *g, self._slot[a]) for a, g in self._live_groups()
        }
        want = sorted(matched)
        hooked = all(sorted(lookups[hook]) == want for hook in self.hooks)
        marks = {mark_name(a, n) for n, a in self._marks.items()}
        return matched | marks <= sets and hooked and not emptied

    def _empty(self, name: str) -> bool:
        """Does the kernel's set hold no element? Only the dump's first reply is read."""
        return set_is_empty(self.table, name)

    def _schema_commands(
        self, sets: set[str], unions: dict[Action, list[str]] | None = None
    ) -> list[Json]:
        """Rule sets, base chains and their rules, rewritten as one transaction: watch rules
        and lists (no verdict, so first), accept rules, accept lists, drop rules, drop lists.
        Lists' shared sets must exist already."""
        cmds: list[Json] = []
        for name in sorted(sets):
            version = _version(name)
            spec = self._t(
                name=name, type=f"ipv{version}_addr", flags=["timeout"], size=self.set_size
            )
            spec["stmt"] = [{"counter": None}]  # a counter in every element: hits()
            if "_" in name:
                spec["flags"] = ["interval", "timeout"]
            cmds.append({"add": {"set": spec}})
        if unions is None:
            unions = {
                a: sorted(union_set_name(a, *g, self._slot[a]) for g in gs)
                for a, gs in self._union.items()
            }
        ordered: list[tuple[str, Action]] = []
        for action in (Action.WATCH, Action.ACCEPT, Action.DROP):  # watch sees every packet
            ordered += [(n, action) for n in sorted(sets) if n.startswith(action.value)]
            ordered += [(n, action) for n in unions.get(action, [])]
        cmds += self._hook_commands()
        for hook in self.hooks:
            for name, action in ordered:
                match = {"op": "==", "left": _source(name), "right": f"@{name}"}
                # A watch has no verdict: its element counter counts, evaluation goes on.
                verdict = [] if action is Action.WATCH else [{action.value: None}]
                rule = self._t(chain=hook, expr=[{"match": match}, *verdict])
                cmds.append({"add": {"rule": rule}})
        return cmds

    def _hook_commands(self) -> list[Json]:
        """Each hook's base chain, created if missing, and emptied (of rules only)."""
        cmds: list[Json] = []
        for hook in self.hooks:
            chain = self._t(name=hook, type="filter", hook=hook, prio=_PRIORITY, policy="accept")
            cmds.append({"add": {"chain": chain}})
            cmds.append({"flush": {"chain": self._t(name=hook)}})
        return cmds

    def _probe_renewal(self) -> bool:
        """Does re-adding an element renew its timeout on this kernel (>= 6.12)?

        Asked once per process, in a set of its own that no rule matches: a probe in a live
        set would flap a real ban of the probe address, and fail when that set is full.
        """
        name = "probe6"
        spec = self._t(name=name, type="ipv6_addr", flags=["timeout"], size=1)
        probe = self._t(name=name, elem=[{"elem": {"val": "100::1", "timeout": 60}}])
        bigger = self._t(name=name, elem=[{"elem": {"val": "100::1", "timeout": 3600}}])
        try:
            self._run([{"add": {"set": spec}}, {"add": {"element": probe}}])
            self._run([{"add": {"element": bigger}}])
            listing = self._run([{"list": {"set": self._t(name=name)}}])
            return "3600" in json.dumps(listing)
        except BackendError as exc:
            logger.info("could not probe timeout renewal (%s); assuming it does not renew", exc)
            return False
        finally:
            with contextlib.suppress(BackendError):
                self._run([{"delete": {"set": self._t(name=name)}}])

    def _element(self, key: RuleKey, rule: Rule | None) -> Json:
        if rule is None:
            return self._t(name=set_name(key), elem=[_elem_value(key.network)])
        elem: Json = {"val": _elem_value(key.network)}
        if rule.expires_ms is not None:
            # One second beyond the expiry: the worker deletes the element at the exact ms,
            # and nft fails a whole batch on deleting an element the kernel already timed out.
            elem["timeout"] = self._timeout_s(rule.expires_ms)
            elem["comment"] = f"exp={rule.expires_ms}"
        return self._t(name=set_name(key), elem=[{"elem": elem}])

    def _timeout_s(self, expires_ms: int) -> int:
        """The kernel timeout for an expiry (:func:`.expiry.kernel_timeout_s`)."""
        return kernel_timeout_s(expires_ms, self.clock())

    def _batch(self, undo: list[tuple[RuleKey, Rule | None]]) -> tuple[list[Json], set[str]]:
        """The transaction for the staged changes; updates the index, noting how to undo it."""
        cmds: list[Json] = []
        new_sets: set[str] = set()
        for key, rule in self._staged:
            undo.append((key, self._index.get(key)))
            if key in self._index:
                cmds.append({"delete": {"element": self._element(key, None)}})
            if rule is not None:
                if set_name(key) not in self._sets:
                    new_sets.add(set_name(key))
                cmds.append({"add": {"element": self._element(key, rule)}})
            self._put(key, rule)
        if new_sets:
            cmds = self._schema_commands(self._sets | new_sets) + cmds
        return cmds, new_sets

    def commit(self) -> None:
        if not self._staged:
            return
        touches_present = any(key in self._index for key, _ in self._staged)
        try:
            try:
                self._commit_once()
            except BackendError as first:
                if not touches_present:
                    self._raise_if_full(first, first)
                    raise
                # The kernel may have timed an element out before the worker deleted it, and
                # one absent element fails the whole batch: re-read the kernel, try once more.
                # A batch of new elements only (a full set) has no such cause: no re-read.
                self._read(self._listing()[0])
                try:
                    self._commit_once()
                except BackendError as exc:
                    self._raise_if_full(exc, first)
                    raise
        finally:
            self.discard()

    def _raise_if_full(self, exc: BackendError, cause: BackendError) -> None:
        """libnftables reports only text; a full set surfaces as ENFILE's message."""
        if "Too many open files" in str(exc):
            raise PermanentBackendError(
                f"a set is full (size {self.set_size}; raise PUSHFW_SET_SIZE): {exc}"
            ) from cause

    def _commit_once(self) -> None:
        """One transaction; the index is changed in place (copying it cost O(rules) per batch)."""
        undo: list[tuple[RuleKey, Rule | None]] = []
        cmds, new_sets = self._batch(undo)
        try:
            if cmds:
                self._run(cmds)
        except BackendError:
            for key, old in reversed(undo):
                self._put(key, old)
            raise
        self._sets |= new_sets

    def uninstall(self) -> str:
        """Delete pushfw's table (its sets and chains); nothing else is touched."""
        try:
            self._run([{"delete": {"table": {"family": "inet", "name": self.table}}}])
        except BackendError as exc:
            if "No such file" not in str(exc):
                raise
            return f"no table inet {self.table}"
        self._read(None)
        self._forget_lists()
        return f"removed table inet {self.table}"
