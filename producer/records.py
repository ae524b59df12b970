"""What the workers keep in Redis besides streams: ledger records, heartbeats, hit counts.

Both are JSON values in hashes, read by ``pushfw list`` / ``pushfw status`` and by every
worker; the models here are the one definition of their shape.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pushfw.producer.contract import targets
from pushfw.producer.entry_ids import entry_ms

__all__ = [
    "HeldList",
    "HostStatus",
    "IdsAhead",
    "ListHits",
    "ListRecord",
    "RoleState",
    "RuleHits",
    "RuleRecord",
    "rule_id",
]


def rule_id(action: str, network: str) -> str:
    """A rule's identity in the ledger: one action for one network, e.g. ``drop 192.0.2.1/32``."""
    return f"{action} {network}"


class RuleRecord(BaseModel):
    """The newest command for one rule (a tombstone when ``deleted``).

    ``id`` is the stream entry id that set this state; folds compare it so that an older
    command arriving late never overwrites a newer one.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    action: str
    network: str
    expires_ms: int | None = None
    target: list[str] = Field(default_factory=list)
    reason: str = ""
    origin: str = ""
    deleted: bool = False
    seen_ms: int | None = None
    """Redis's time when the command was first seen, where the entry id is ahead of it."""
    signed: dict[str, str] = Field(default_factory=dict)
    """A signed command's signed fields and ``sig``, so a strict host can verify it itself."""
    checked: bool = False
    """The worker that folded it held the key and verified ``signed``: the fold then keeps
    it in ``{pushfw}:held`` when an unverified command replaces it. Every strict host
    verifies ``signed`` again itself."""
    expired_id: str | None = None
    """On the scheduler's ttl tombstones: the entry whose timed state this one ended."""
    expired_ms: int | None = None
    """On the scheduler's ttl tombstones: the expiry that ended."""
    voided: str | None = None
    """A ttl delete this command overrode: it renewed the rule before that delete was folded."""

    @property
    def rule_id(self) -> str:
        return rule_id(self.action, self.network)

    @property
    def is_expiry(self) -> bool:
        """A tombstone the scheduler's claim wrote (folds never write one)."""
        return self.deleted and self.origin == "ttl" and self.expired_id is not None

    @property
    def order_id(self) -> str:
        """The id this state is ordered by: a ttl tombstone ranks as the entry it expired.

        So any command added after that entry, even one folded after the delete was
        emitted (a renewal behind a backlog), wins over the expiry.
        """
        return self.expired_id if self.is_expiry and self.expired_id else self.id

    def targets(self, host: str, labels: frozenset[str]) -> bool:
        return targets(self.target, host, labels)

    def active_at(self, now_ms: int) -> bool:
        return not self.deleted and (self.expires_ms is None or self.expires_ms > now_ms)


class ListRecord(BaseModel):
    """The newest command for one named list, in ``{pushfw}:lists`` (field: the list's name).

    Folded by the same compare-and-set on the entry id as rules; ``deleted`` marks a list
    removed by ``list.delete``. Its entries are in ``{pushfw}:list:<name>:<version>``.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    version: str = ""
    action: str = "drop"
    size: int = 0
    expires_ms: int | None = None
    target: list[str] = Field(default_factory=list)
    reason: str = ""
    deleted: bool = False
    seen_ms: int | None = None
    signed: dict[str, str] = Field(default_factory=dict)
    """A signed command's signed fields and ``sig``, so a strict host can verify it itself."""
    checked: bool = False
    """As :attr:`RuleRecord.checked`: kept in ``{pushfw}:held-lists`` when replaced unverified."""

    def targets(self, host: str, labels: frozenset[str]) -> bool:
        return targets(self.target, host, labels)

    def active_at(self, now_ms: int) -> bool:
        return not self.deleted and (self.expires_ms is None or self.expires_ms > now_ms)

    def counted_by(self, hits: ListHits) -> bool:
        """Whether ``hits`` count this list as it is: read after its newest command. Counts
        read before may be of another action or content (a watch list re-imported as a
        drop), so they are not shown for it until the host's next reading."""
        return hits.ms >= entry_ms(self.id)


class HeldList(BaseModel):
    """A list as one host's kernel holds it, in that host's heartbeat."""

    model_config = ConfigDict(frozen=True)

    version: str
    entries: int
    """Entries in the kernel: the list's size less those this host's policy refused."""
    refused: int = 0


class RoleState(BaseModel):
    """One role of a worker as its heartbeat tells it: ``ok``, or failing since when and why."""

    model_config = ConfigDict(frozen=True)

    state: str = "ok"
    since_ms: int | None = None
    failures: int = 0
    error: str = ""


class HostStatus(BaseModel):
    """One worker's heartbeat in ``{pushfw}:hosts``."""

    model_config = ConfigDict(frozen=True)

    host: str
    labels: list[str] = Field(default_factory=list)
    version: str = ""
    backend: str = ""
    last_seen_ms: int
    started_ms: int = 0
    rules: int = 0
    lag: int | None = None
    pending: int = 0
    interval_s: float = 5.0
    state: str = "running"
    """``starting`` until the first reconcile is done, then ``running``."""
    ledger_lost: bool = False
    """The ledger is not the one this host converged with: it keeps rules the ledger lacks."""
    problems: list[str] = Field(default_factory=list)
    """What keeps a role of this worker from doing its job (a failing scheduler, reconcile)."""
    ids_ahead: int = 0
    """Entries this worker found with ids ahead of Redis's clock (a producer chose them)."""
    done_id: str = ""
    """The newest command this host has answered and acknowledged."""
    reads: str = "group"
    """Where this host reads the command stream: ``group`` (its consumer group on the
    primary), ``replica`` (a follower, ``read_url``), or ``primary`` (a follower whose
    replica cannot be read now)."""
    position: str = ""
    """A follower's position: it has carried out every entry up to this id (its state file
    holds it too). Empty for a host with a consumer group, whose group says where it is."""
    counts: dict[str, int] = Field(default_factory=dict)
    """Commands this host answered since it started, by status: its progress, also for
    commands that asked for no result entry."""
    roles: dict[str, RoleState] = Field(default_factory=dict)
    """Each role's health: startup, applier, ledger, expiry, reconcile, heartbeat, trimming, ..."""
    lists: dict[str, HeldList] = Field(default_factory=dict)
    """The named lists this host's kernel holds, by name."""
    instance: str = ""
    """The worker process's random id: two live ids under one host name are twins."""
    boot_id: str = ""
    """The machine's boot id, with ``pid``: a restarted worker tells its crashed
    predecessor's heartbeat from a twin's."""
    pid: int = 0
    duplicate: str = ""
    """Another live worker's instance id under this host name (empty: none seen)."""


class IdsAhead(BaseModel):
    """``{pushfw}:ahead``: commands whose entry ids were ahead of Redis's clock when first seen."""

    count: int
    max_id: str
    max_ahead_ms: int
    first_ms: int
    last_ms: int


class RuleHits(BaseModel):
    """One rule's kernel counters on one host, in ``{pushfw}:hits:<host>`` (field: rule id).

    The counts are the kernel's since the rule was last written there (a renewal or a
    reconcile that rewrites it starts them again); ``ms`` is when they were read (Redis clock).
    """

    model_config = ConfigDict(frozen=True)

    packets: int
    bytes: int
    ms: int


TOP_LIST_ENTRIES = 100
"""Entries of one list published per host, the most packets first (a host holds at most
``max_lists`` lists, so its hash stays small however large the lists are)."""


class ListHits(BaseModel):
    """One list's kernel counters on one host, in ``{pushfw}:list-hits:<host>`` (field: the
    list's name).

    ``packets`` and ``bytes`` sum every entry that matched; ``entries`` are the busiest
    :data:`TOP_LIST_ENTRIES` as ``[cidr, packets, bytes]``, most packets first. The lists of
    one action share one kernel element per entry, so an entry two lists hold counts in
    both. ``ms`` is when they were read (Redis clock).
    """

    model_config = ConfigDict(frozen=True)

    packets: int = Field(ge=0)
    bytes: int = Field(ge=0)
    ms: int
    entries: list[tuple[str, int, int]] = Field(default=[], max_length=TOP_LIST_ENTRIES)
