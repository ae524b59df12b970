"""The backend interface: stage changes, commit them as one batch, list what is applied."""

from __future__ import annotations

import abc
import time
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


def wall_ms() -> int:
    """Milliseconds on this machine's clock: a backend's clock when none is given."""
    return int(time.time() * 1000)


def no_wait_told(seconds: float) -> None:
    """A backend's lock accounting when none is given: the waits go untold."""


class CommittedRules(Protocol):
    """The rules a backend committed, as its packed index answers for them (read-only).

    :class:`~.index.RuleIndex` is the one implementation: it keeps a rule in integers and
    builds a :class:`RuleKey` or :class:`Rule` only when asked for one, so counting,
    looking up and comparing a million rules builds no object per rule.
    """

    def get(self, key: RuleKey) -> Rule | None:
        """The committed rule with this key, or None."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int:
        """How many rules are committed."""
        ...

    def __iter__(self) -> Iterator[RuleKey]:
        """Every committed rule's key, built as it goes."""
        ...

    def pairs(self) -> Iterator[tuple[RuleKey, Rule]]:
        """Every committed rule with its key, built as it goes: a pass without a dict."""
        ...

    def timed(self) -> Iterator[Rule]:
        """The rules that expire, one by one; permanent ones are skipped as integers."""
        ...

    def counts(self) -> dict[Action, int]:
        """How many rules of each action are committed, counted without building them."""
        ...

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

    The interface:

    - what it is: :attr:`name`, and the :attr:`actions` it can hold;
    - its lifecycle: :meth:`open` and :meth:`close`;
    - a batch: :meth:`add`, :meth:`delete`, then :meth:`commit` (whose docstring says what
      holds after it) or :meth:`discard`;
    - what it holds: :meth:`committed`, one read-only view of the committed rules answered
      from the backend's packed index without a kernel call (look-up, count, the timed
      rules, a pass over all of them, integers for reconcile);
    - the kernel's health: :meth:`intact` and :meth:`uninstall`, with harmless defaults
      for a backend that has no kernel.

    The clock and the lock accounting are given to the constructor, never set later.
    Optional capabilities are Protocols, each asked for once where its user is built:
    named lists (:class:`ListBackend`, :func:`lists_of`), the rules' hit counters
    (:class:`RuleCounters`, :func:`rule_counters_of`) and the lists' (:class:`ListCounters`,
    :func:`list_counters_of`). Implementations give their methods one-line docstrings.
    """

    name: str = "backend"
    actions: frozenset[Action] = frozenset(Action)
    """The actions this backend can hold; the gate refuses the others (:class:`.Policy`)."""

    def __init__(
        self,
        *,
        clock: Callable[[], int] = wall_ms,
        lock_waited: Callable[[float], None] = no_wait_told,
    ) -> None:
        """Keep what the backend is given to work with; nothing sets it later.

        Args:
            clock: milliseconds on Redis's clock (the worker's Redis-synced clock); backends
                with kernel timeouts turn an absolute expiry into time remaining with it.
            lock_waited: told how long a change waited for a lock another process held
                (the xtables lock).
        """
        self.clock = clock
        self.lock_waited = lock_waited

    @abc.abstractmethod
    def open(self) -> None:
        """Create the managed chains/sets if missing and load the index of managed rules."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release handles. Never removes a rule: bans stay in force while the worker is down."""

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

        - every staged change is in the kernel, and :meth:`committed` reflects it;
        - ``add`` of a rule already present and ``delete`` of a rule absent are harmless
          (idempotent), so a replayed batch has the effect of one;
        - per table and address family the batch is all-or-nothing.

        On failure the staged changes are discarded, :meth:`committed` still describes the
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
    def committed(self) -> CommittedRules:
        """The managed rules as last committed (from the in-memory index, not the kernel).

        A live, read-only view: :meth:`commit` and :meth:`open` change what it answers, so
        a caller that compares before and after copies it (``dict(view.pairs())``), and asks
        for it again after :meth:`open`.
        """

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

    def uninstall(self) -> str:
        """Remove everything this backend created in the kernel; say what, in a few words."""
        return "nothing to remove"


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

    def settle(self) -> set[str]:
        """The lists loaded since this start are all there are: forget the others.

        Shared kernel objects cannot tell the entries of a list the kernel held before this
        start from those of other lists, so changes delete nothing while such a list is not
        loaded again. The list keeper calls this once it knows those lists will not be
        (their content is gone, or refused): their objects go, and the shared ones hold
        exactly the loaded lists. Returns the names forgotten.

        Raises:
            as :meth:`load_list`; on any failure the kernel keeps what it held before.
        """
        ...


def lists_of(backend: Backend) -> ListBackend | None:
    """The backend's list capability, or None when it keeps no sets (iptables)."""
    return backend if isinstance(backend, ListBackend) else None


@runtime_checkable
class RuleCounters(Protocol):
    """A backend whose kernel counts each managed rule's packets (iptables, ipset,
    nftables). Optional, as :class:`ListBackend`: the memory backend has no kernel to count;
    ask :func:`rule_counters_of` once, where the hits reader is built.
    """

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
        ...


def rule_counters_of(backend: Backend) -> RuleCounters | None:
    """The backend's per-rule counters, or None when it has no kernel to count (memory)."""
    return backend if isinstance(backend, RuleCounters) else None


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

        Read in one dump of the lists' shared sets, so, as :meth:`RuleCounters.hits`, its cost
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
