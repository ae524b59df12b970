"""Rules as elements of ipset sets, matched by one iptables rule per set.

One ``hash:net`` set per action and family, with kernel timeouts, counters and each timed
rule's exact expiry as a comment (so the index can be rebuilt from the kernel); the managed
chain matches the accept sets before the drop sets. Each batch is one ``ipset -exist
restore`` fed on stdin, never a shell, undone by a second restore if the kernel refuses a
line. Named lists get sets of their own, swapped in whole. The layout and why:
docs/internals.md, "Kernel layouts".
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import IO, Any, NamedTuple, NoReturn

from pushfw.producer.contract import Action, Network
from pushfw.worker.backends.base import BlockList, Rule, RuleKey
from pushfw.worker.backends.entries import gc_paused, list_entries
from pushfw.worker.backends.index import IndexedBackend, RuleIndex
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
from pushfw.worker.expiry import kernel_timeout_s as timeout_s

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
_LIST_ACTIONS = {Action.ACCEPT: "a", Action.DROP: "d"}
_LIST_NAME = r"[a-z][a-z0-9_]{0,15}"
_LIST_MAXELEM_MIN = 65536


_CHUNK = 1 << 16
"""Bytes of restore input written at a time."""


def _feed(stdin: IO[bytes], lines: Iterable[str], failed: list[BaseException]) -> None:
    """Write ``lines`` to a restore in chunks, then close its input; a restore that stopped
    at a refused line closes the pipe, and its exit status and message tell why. Anything
    else that goes wrong is put in ``failed`` for the caller (this runs in a thread)."""
    chunk: list[str] = []
    size = 0
    try:
        for line in lines:
            chunk.append(line)
            size += len(line)
            if size >= _CHUNK:
                stdin.write("".join(chunk).encode())
                chunk, size = [], 0
        stdin.write("".join(chunk).encode())
    except BrokenPipeError:
        pass
    except BaseException as exc:  # handed to the caller, which raises it
        failed.append(exc)
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            stdin.close()


def _cidrs(by_prefix: Mapping[int, Sequence[str]]) -> Iterator[str]:
    """``address/prefix`` strings, made as they are read (a million is 70 MB held at once)."""
    for prefixlen, addresses in by_prefix.items():
        for address in addresses:
            yield f"{address}/{prefixlen}"


def _adds(name: str, entries: Iterable[str], timeout_s: int) -> Iterator[str]:
    """The restore lines adding ``entries`` to set ``name``, made as they are read."""
    for entry in entries:
        yield f"add {name} {entry} timeout {timeout_s}\n"


class Element(NamedTuple):
    """One element as ``ipset save`` prints it."""

    network: Network
    timeout_s: int
    expires_ms: int | None
    counters: tuple[int, int] | None = None
    """(packets, bytes) in a set created with ``counters``."""


def kernel_timeout_s(expires_ms: int, now_ms: int) -> int:
    """The element timeout for an expiry (:func:`.expiry.kernel_timeout_s`).

    Past ipset's limit the element is permanent in the kernel (0) and only the worker's own
    delete ends it: a ban must never end early.
    """
    remaining_s = timeout_s(expires_ms, now_ms)
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
        self._list_set = re.compile(  # a list's live set (-) or the one a load fills (+)
            rf"{re.escape(set_prefix)}-(?P<action>[ad])(?P<version>[46])(?P<temp>[-+])"
            rf"(?P<name>{_LIST_NAME})"
        )
        self._lists: dict[str, Action] = {}
        """The lists whose sets (and rules) are in the kernel, by name."""
        self._filled: set[str] = set()
        """Lists' live sets this worker filled: a flush by hand leaves such a set empty."""

    def open(self) -> None:
        if iptables_variant() == "nf_tables":
            logger.info(
                "host iptables is the nf_tables variant; pushfw writes the legacy tables "
                "(both filter packets): see its rules with iptables-legacy -S %s",
                self.chain,
            )
        for ipset in self._sets.values():
            self._ensure_set(ipset)
        self._lists = self._kernel_lists()  # kept, rules and all: the worker decides which stay
        self._write_rules(warn=True)
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
        """The sets the chain matches, in order: accepts (set, then lists), then drops."""
        wanted: list[str] = []
        for action in (Action.ACCEPT, Action.DROP):
            wanted.append(self._sets[(action, version)].name)
            lists = (n for n, a in sorted(self._lists.items()) if a is action)
            wanted += [self._list_name(action, name, version) for name in lists]
        return [name for name in wanted if name in present or not self._list_set.fullmatch(name)]

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
        lists = (self._list_name(a, n, v) for n, a in self._lists.items() for v in (4, 6))
        return (
            all(name in held for name in lists)
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

    def _emptied(self, held: Mapping[str, int]) -> set[str]:
        """The lists with a live set this worker filled that holds no entry now."""
        return {
            name
            for name, action in self._lists.items()
            for version in (4, 6)
            if (live := self._list_name(action, name, version)) in self._filled
            and held.get(live) == 0
        }

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
        """``ipset -exist restore``, fed ``lines`` as they come (no shell).

        -exist: an add of a present element renews its timeout and comment, a del of an
        absent one is a no-op, so a replayed batch has the effect of one. The input is
        streamed in chunks: a million-entry list was a 50 MB string, plus its lines, in the
        worker's memory at once.
        """
        if self._exe is None:
            raise ConfigError("the ipset command is not installed")
        deadline = time.monotonic() + _RUN_TIMEOUT_S
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(
                    [self._exe, "-exist", "restore"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                )
            except OSError as exc:
                raise BackendError(f"ipset restore: {exc}") from exc
            assert proc.stdin is not None
            failed: list[BaseException] = []
            feeder = threading.Thread(
                target=_feed, args=(proc.stdin, lines, failed), name="pushfw-ipset-restore"
            )
            try:
                feeder.start()  # a thread: a restore that stops reading cannot outlast the bound
                feeder.join(timeout=max(0.1, deadline - time.monotonic()))
                if feeder.is_alive() or failed:
                    raise failed[0] if failed else subprocess.TimeoutExpired(proc.args, 0)
                returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BackendError(f"ipset restore: no end within {_RUN_TIMEOUT_S:.0f} s") from None
            finally:
                if proc.poll() is None:  # only a failure leaves it running: end it, and the feed
                    proc.kill()
                proc.wait()
                feeder.join()
            errors.seek(0)
            stderr = errors.read().decode("utf-8", "replace")
        if returncode != 0:
            self._refused("restore", stderr, returncode)

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
        self._refused(command, proc.stderr, proc.returncode)

    @staticmethod
    def _refused(command: str, stderr: str, returncode: int) -> NoReturn:
        message = " ".join(stderr.split())[:300] or f"exit status {returncode}"
        # ipset reports errors only as text, so a full set can only be told by its words
        # ("Hash is full, cannot add more elements"); the lines we send carry no free text
        # that could fake them. Adding to a full set never succeeds by retrying.
        if command == "restore" and "is full" in message:
            raise PermanentBackendError(f"ipset {command}: {message}")
        raise BackendError(f"ipset {command}: {message}")

    # --- named lists ---

    supports_lists = True

    def _list_name(self, action: Action, name: str, version: int, temp: bool = False) -> str:
        """A list's set in one family: the live one, or the one a load fills (``temp``)."""
        set_name = f"{self.set_prefix}-{_LIST_ACTIONS[action]}{version}{'+' if temp else '-'}{name}"
        if not re.fullmatch(_LIST_NAME, name):
            raise PermanentBackendError(f"list name {name[:40]!r}: use {_LIST_NAME}")
        if len(set_name) > _SET_NAME_MAX:
            raise PermanentBackendError(
                f"ipset name {set_name} is longer than {_SET_NAME_MAX} characters: "
                f"shorten the set prefix {self.set_prefix!r} or the list's name"
            )
        return set_name

    def _kernel_lists(self, set_names: Iterable[str] | None = None) -> dict[str, Action]:
        """The lists with a live set in the kernel, read from the names of the sets only
        (``set_names``: those already read)."""
        found: dict[str, Action] = {}
        for set_name in self._run("list", "-n").split() if set_names is None else set_names:
            parsed = self._list_set.fullmatch(set_name)
            if parsed and parsed["temp"] == "-":
                found[parsed["name"]] = Action.ACCEPT if parsed["action"] == "a" else Action.DROP
        return found

    def list_names(self) -> set[str]:
        """The lists with both families' sets, less those with a set this worker filled that
        holds nothing now: one missing or flushed by hand is a list to load again."""
        held = self._headers()
        emptied = self._emptied(held)
        return {
            name
            for name, action in self._kernel_lists(held).items()
            if name not in emptied
            and all(self._list_name(action, name, version) in held for version in (4, 6))
        }

    def load_list(self, spec: BlockList, networks: Iterable[str]) -> None:
        """Fill temporary sets in one restore, swap them in, then write the rules if new."""
        grouped = list_entries(networks)
        by_version = {
            version: (
                sum(len(a) for (v, _), a in grouped.items() if v == version),
                _cidrs({p: a for (v, p), a in grouped.items() if v == version}),
            )
            for version in (4, 6)
        }
        started = time.monotonic()
        self._fill_and_swap(spec, by_version)
        logger.info(
            "ipset list %s (%s): %d entries loaded in %.2f s",
            spec.name,
            spec.action.value,
            sum(count for count, _ in by_version.values()),
            time.monotonic() - started,
        )

    def _fill_and_swap(
        self, spec: BlockList, by_version: Mapping[int, tuple[int, Iterable[str]]], room: int = 0
    ) -> None:
        """Make the list's live sets of these families hold exactly these entries, given as
        (how many, the CIDR strings) per family, with ``room`` for more (``maxelem`` is the
        next power of two past twice what they need).

        The swaps come after every entry is in: a refused entry leaves every live set as it was.
        """
        now_ms = self.clock()
        timeout_s = 0 if spec.expires_ms is None else kernel_timeout_s(spec.expires_ms, now_ms)
        present = set(self._run("list", "-n").split())
        fill: list[Iterable[str]] = []
        swap: list[str] = []
        for version, (count, entries) in sorted(by_version.items()):
            live = self._list_name(spec.action, spec.name, version)
            temp = self._list_name(spec.action, spec.name, version, temp=True)
            family = "inet" if version == 4 else "inet6"
            maxelem = max(_LIST_MAXELEM_MIN, 1 << (2 * (count + room) - 1).bit_length())
            create = (
                f"create {temp} hash:net family {family} timeout 0 counters maxelem {maxelem}\n"
            )
            fill.append((f"destroy {temp}\n" if temp in present else "", create))
            fill.append(_adds(temp, entries, timeout_s))
            swap.append(f"swap {temp} {live}\ndestroy {temp}\n" if live in present else "")
            swap.append("" if live in present else f"rename {temp} {live}\n")
        try:
            self._restore(chain(*fill, swap))
        except BackendError:
            for version in by_version:
                temp = self._list_name(spec.action, spec.name, version, temp=True)
                with contextlib.suppress(BackendError):
                    self._run("-exist", "destroy", temp)
            raise
        for version, (count, _) in by_version.items():
            live = self._list_name(spec.action, spec.name, version)
            (self._filled.add if count else self._filled.discard)(live)
        if self._lists.get(spec.name) is not spec.action:
            self._set_list_rules(spec.name, spec.action)

    def _set_list_rules(self, name: str, action: Action | None) -> None:
        """Give the list the rules of ``action`` (None: no rules), then destroy its other sets."""
        before = dict(self._lists)
        if action is None:
            self._lists.pop(name, None)
        else:
            self._lists[name] = action
        try:
            self._write_rules()
        except BackendError:
            self._lists = before
            raise
        keep = {self._list_name(action, name, v) for v in (4, 6)} if action else set()
        for set_name in sorted(set(self._run("list", "-n").split()) - keep):
            parsed = self._list_set.fullmatch(set_name)
            if parsed and parsed["name"] == name:
                self._run("-exist", "destroy", set_name)
                self._filled.discard(set_name)

    def change_list(self, spec: BlockList, add: Sequence[str], remove: Sequence[str]) -> None:
        """One restore, deletes first; a family that would overflow is moved to a bigger set."""
        if self._kernel_lists().get(spec.name) is not spec.action:
            raise PermanentBackendError(
                f"list {spec.name} is not loaded as {spec.action.value}: load it first"
            )
        adds: dict[int, list[str]] = {4: [], 6: []}
        removes: dict[int, list[str]] = {4: [], 6: []}
        for grouped, into in ((list_entries(add), adds), (list_entries(remove), removes)):
            for (version, prefixlen), addresses in grouped.items():
                into[version] += [f"{address}/{prefixlen}" for address in addresses]
        for version in (4, 6):
            if adds[version]:
                self._grow_if_needed(spec, version, len(adds[version]))
        timeout_s = (
            0 if spec.expires_ms is None else kernel_timeout_s(spec.expires_ms, self.clock())
        )
        lines, undo = [], []
        for version in (4, 6):
            live = self._list_name(spec.action, spec.name, version)
            lines += [f"del {live} {entry}\n" for entry in removes[version]]
            undo += [f"add {live} {entry} timeout {timeout_s}\n" for entry in removes[version]]
        for version in (4, 6):
            live = self._list_name(spec.action, spec.name, version)
            lines += [f"add {live} {entry} timeout {timeout_s}\n" for entry in adds[version]]
            undo += [f"del {live} {entry}\n" for entry in adds[version]]
        try:
            self._restore(lines)
        except BackendError as exc:
            # restore keeps the lines before the one refused: the inverse of every line puts
            # back what the list held (the removed entries were in it, the added were not)
            logger.error("ipset list %s: change refused (%s); undoing it", spec.name, exc)
            with contextlib.suppress(BackendError):
                self._restore(undo)
            raise
        self._note_filled(spec, adds, removes)

    def _note_filled(
        self, spec: BlockList, adds: Mapping[int, list[str]], removes: Mapping[int, list[str]]
    ) -> None:
        for version in (4, 6):
            live = self._list_name(spec.action, spec.name, version)
            if adds[version]:
                self._filled.add(live)
            elif removes[version]:
                self._filled.discard(live)  # it may hold none now: unknown without counting

    def _grow_if_needed(self, spec: BlockList, version: int, adding: int) -> None:
        """Move the live set to one with room for ``adding`` more entries, if it has none."""
        live = self._list_name(spec.action, spec.name, version)
        header = self._run("list", "-t", live)
        words = dict(re.findall(r"^(Header|Number of entries): (.*)$", header, re.MULTILINE))
        options = words.get("Header", "").split()
        maxelem = int(options[options.index("maxelem") + 1]) if "maxelem" in options else 0
        held = int(words.get("Number of entries", "0"))
        if held + adding <= maxelem:
            return
        logger.info(
            "ipset list %s: set %s full (%d of %d), growing it", spec.name, live, held, maxelem
        )
        saved = parse_save(self._run("save", live), live, version)
        entries = [str(element.network) for element in saved]
        self._fill_and_swap(spec, {version: (len(entries), entries)}, room=adding)

    def remove_list(self, name: str) -> None:
        """The list's rules out of the chain first: the kernel keeps a set a rule matches."""
        self._set_list_rules(name, None)

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
        ours += sorted(name for name in present if self._list_set.fullmatch(name))
        self._lists = {}
        removed = [name for name in ours if name in present]
        for name in removed:
            self._run("destroy", name)
        self._index.clear()
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
