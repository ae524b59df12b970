"""The backend interface: stage changes, commit them as one batch, list what is applied."""

from __future__ import annotations

import abc
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pushfw.producer.contract import Action, Network
from pushfw.producer.records import rule_id


@dataclass(frozen=True, order=True, slots=True)
class RuleKey:
    """A rule's identity: one action for one network. Drop and accept of one network coexist."""

    action: Action
    network: Network
    packed: int = field(init=False, repr=False, compare=False)
    """The network's address and prefix in one integer, as the packed index stores it."""
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A key is looked up and hashed several times per command (index, plan view,
        # expiry queue), and an ipaddress network computes its hash anew each time.
        network = self.network
        packed = int(network.network_address) << 8 | network.prefixlen
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "_hash", hash((self.action, network.version, packed)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return rule_id(self.action.value, str(self.network))


@dataclass(frozen=True, slots=True)
class Rule:
    """A managed rule as the kernel holds it; ``expires_ms`` is absolute (Redis clock)."""

    key: RuleKey
    expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class BlockList:
    """A named list as one host's kernel holds it: every entry shares action and expiry.

    ``version`` is the content id the importer gave it (a hash of the entries), so two
    hosts holding one version hold the same entries.
    """

    name: str
    action: Action
    version: str
    expires_ms: int | None = None


class PackedRules(Protocol):
    """The committed rules as integers (:class:`~.index.RuleIndex` is one), for a
    reconcile that compares a million rules without building one object per rule."""

    def packed_of(self, action: Action) -> Iterator[tuple[int, int, int]]:
        """``(version, packed network, expiry or 0)`` of each rule of ``action``."""
        ...

    def expiry_of(self, action: Action, version: int, packed: int) -> int | None:
        """The rule's expiry (0: none), or None when no such rule is held."""
        ...


class Backend(abc.ABC):
    """A kernel firewall that pushfw manages, changed in batches.

    A backend owns its chains/sets/table and touches nothing else. Changes are staged with
    :meth:`add` and :meth:`delete` and reach the kernel only on :meth:`commit`.

    The contract, in three parts:

    - the core every backend implements: :meth:`open`, :meth:`close`, :meth:`add`,
      :meth:`delete`, :meth:`commit` (whose docstring says what holds after it),
      :meth:`discard` and :meth:`snapshot`;
    - views of the committed rules, answered from the backend's index without a kernel
      call (:meth:`committed_index`, which every backend keeps packed, and :meth:`get`,
      :meth:`committed`, :meth:`timed`, :meth:`size`, :meth:`action_counts`): derived
      from :meth:`snapshot` here, faster in
      :class:`~pushfw.worker.backends.index.IndexedBackend`;
    - the kernel's health: :meth:`intact`, :meth:`hits`, :meth:`uninstall`, with harmless
      defaults for a backend that has no kernel.

    Named lists are an optional capability, :class:`ListBackend`, asked for once with
    :func:`lists_of`. Implementations give their methods one-line docstrings.
    """

    name: str = "backend"
    actions: frozenset[Action] = frozenset(Action)
    """The actions this backend can hold; the gate refuses the others (:class:`.Policy`)."""
    clock: Callable[[], int] = staticmethod(lambda: int(time.time() * 1000))
    """Milliseconds on Redis's clock; the worker replaces it with its Redis-synced clock.

    Backends with kernel timeouts use it to turn an absolute expiry into time remaining."""
    lock_waited: Callable[[float], None] = staticmethod(lambda seconds: None)
    """Told how long a change waited for a lock another process held (the xtables lock)."""

    @abc.abstractmethod
    def open(self) -> None:
        """Create the managed chains/sets if missing and load the index of managed rules."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release handles. Never removes a rule: bans stay in force while the worker is down."""

    @abc.abstractmethod
    def snapshot(self) -> dict[RuleKey, Rule]:
        """The managed rules as last committed (from the in-memory index, not the kernel)."""

    @abc.abstractmethod
    def add(self, rule: Rule) -> None:
        """Stage a rule; a rule with the same key but another expiry replaces it."""

    @abc.abstractmethod
    def delete(self, key: RuleKey) -> None:
        """Stage the removal of a managed rule."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Send every staged change to the kernel.

        What holds after ``commit()`` returns:

        - every staged change is in the kernel, and :meth:`snapshot` reflects it;
        - ``add`` of a rule already present and ``delete`` of a rule absent are harmless
          (idempotent), so a replayed batch has the effect of one;
        - per table and address family the batch is all-or-nothing.

        On failure the staged changes are discarded, :meth:`snapshot` still describes the
        kernel, and the error says whether retrying can help.

        Raises:
            TransientBackendError: the kernel was busy (xtables lock, concurrent commit).
            PermanentBackendError: this batch will never apply as it is.
            BackendError: anything else the kernel refused.
        """

    @abc.abstractmethod
    def discard(self) -> None:
        """Forget the staged changes."""

    @abc.abstractmethod
    def committed_index(self) -> PackedRules:
        """The committed rules packed (the index :meth:`snapshot` reads), for a reconcile
        that compares integers. Read-only for callers: only :meth:`commit` changes it."""

    def get(self, key: RuleKey) -> Rule | None:
        """The committed rule with this key, answered from the index without a kernel call."""
        return self.snapshot().get(key)

    def committed(self) -> Iterator[tuple[RuleKey, Rule]]:
        """The committed rules one by one: a pass over all of them without a dict of them."""
        return iter(self.snapshot().items())

    def timed(self) -> Iterator[Rule]:
        """The committed rules that expire, one by one (the expiry queue is rebuilt from them)."""
        return (rule for _, rule in self.committed() if rule.expires_ms is not None)

    def intact(self) -> bool:
        """Does the kernel still hold what the index says, as far as a cheap look can tell?

        False when something a hand flush removes is gone: a managed chain, table or set, a
        hook's jump or rule leading to it, or managed rules (fewer than the index counts). The
        worker then reconciles at once instead of at the next periodic reconcile.

        It is called at every heartbeat (default every 5 s) and must stay cheap: it reads
        headers, counts and hook rules, and never lists set elements or builds an object per
        managed rule. It never raises: a kernel it cannot read now (a busy xtables lock, an
        odd error) answers True, and the next commit or reconcile reports the problem.
        """
        return True

    def hits(self) -> dict[RuleKey, tuple[int, int]]:
        """Each managed rule's kernel counters: ``(packets, bytes)`` it matched so far.

        Read in one dump of the kernel's objects (the chain's entries, the sets' elements),
        so its cost grows with the number of rules: the worker calls it once a minute (see
        :mod:`pushfw.worker.hits`), never per heartbeat or per scrape. A rule the kernel
        keeps no counter for (a set created before counters, until it is migrated) is left
        out; so is anything pushfw did not write. A counter starts at zero when its rule is
        (re)written, and a renewal may rewrite it.

        Raises:
            TransientBackendError: the kernel was busy (the xtables lock).
            BackendError: the kernel could not be read.
        """
        return {}

    def uninstall(self) -> str:
        """Remove everything this backend created in the kernel; say what, in a few words."""
        return "nothing to remove"

    def size(self) -> int:
        """How many managed rules are committed."""
        return len(self.snapshot())

    def action_counts(self) -> dict[Action, int]:
        """How many managed rules of each action are committed."""
        return dict(Counter(key.action for key in self.snapshot()))


@runtime_checkable
class ListBackend(Protocol):
    """A backend that holds named lists (``pushfw import``): kernel objects of their own,
    apart from rules. ipset, nftables and memory have them; iptables keeps no sets.

    An optional capability: ask :func:`lists_of` once, where the list keeper is built,
    rather than probing a backend in each caller.
    """

    name: str

    def list_names(self) -> set[str]:
        """The names of the lists whose kernel objects exist now (read from the kernel)."""
        ...

    def load_list(self, spec: BlockList, networks: Iterable[str]) -> None:
        """Make the kernel hold exactly ``networks`` as list ``spec.name``, in one transaction.

        ``networks`` (read once) are canonical CIDR strings of both families (``192.0.2.0/24``,
        ``2001:db8::1/128``), without duplicates or overlaps. Creates the list's kernel
        objects (and the rule matching them: accept lists before every drop) if missing;
        the lists of one action may share them (the rules a packet walks must not grow with
        the number of lists), and then an entry stays while any list holds it;
        a list already there is replaced whole, so packets meet the old content or the new,
        never a gap. Every entry expires in the kernel at ``spec.expires_ms`` (rounded up,
        plus a second), so a timed list ends even while the worker is away.

        Raises:
            TransientBackendError, PermanentBackendError, BackendError: as
            :meth:`Backend.commit`; on any failure the kernel keeps what it held before.
        """
        ...

    def change_list(self, spec: BlockList, add: Sequence[str], remove: Sequence[str]) -> None:
        """Apply a difference to a list the kernel holds, in one transaction.

        ``spec`` has the same action and expiry as the list already loaded (else the worker
        calls :meth:`load_list`). Adding an entry present or removing one absent is harmless.

        Raises:
            as :meth:`load_list`; on any failure the kernel keeps what it held before.
        """
        ...

    def remove_list(self, name: str) -> None:
        """Remove the list's kernel objects and the rule matching them; absent is harmless."""
        ...


def lists_of(backend: Backend) -> ListBackend | None:
    """The backend's list capability, or None when it keeps no sets (iptables)."""
    return backend if isinstance(backend, ListBackend) else None


EntryHits = dict[str, tuple[int, int]]
"""A list's entries that matched packets: CIDR -> (packets, bytes)."""


@runtime_checkable
class ListCounters(Protocol):
    """A list backend whose kernel counts each list entry's packets (nftables and ipset:
    their shared list sets carry a counter per element). Optional, as :class:`ListBackend`:
    ask :func:`list_counters_of` once, where the hits reader is built.
    """

    def held_entries(self) -> int:
        """How many entries the lists loaded since this start hold (overlaps counted per
        list): what a reading of :meth:`list_hits` costs grows with it."""
        ...

    def list_hits(self) -> dict[str, EntryHits]:
        """Per list loaded since this start, the counters of its entries that matched.

        Read in one dump of the lists' shared sets, so, as :meth:`Backend.hits`, its cost
        grows with the entries held: the worker reads it with the rules' counters, on the
        same schedule. The lists of one action share one kernel element per entry, so an
        entry two lists hold counts for both. Entries that matched nothing are left out.

        Raises:
            BackendError: the kernel could not be read.
        """
        ...


def list_counters_of(backend: Backend) -> ListCounters | None:
    """The backend's per-entry list counters, or None when it keeps none (iptables, memory)."""
    return backend if isinstance(backend, ListCounters) else None
