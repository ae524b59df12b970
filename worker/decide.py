"""The one gate into the kernel: may this rule be in this host's kernel, and until when.

Every path that can put a rule into a host's kernel asks :func:`decide`: the applier for
each stream entry, reconcile for each ledger record. So reconcile never installs what the
same host would refuse from the stream. The checks run in one order, the same on every
path: authenticity (the signature policy, the scheduler's own expiries), target,
protected networks and blast radius (for accepts too), expiry. The answer is a frozen value:

- :class:`Add`: the rule belongs in the kernel, with this absolute expiry;
- :class:`Delete`: the rule must not be in the kernel (a delete, a command meant for
  other hosts, a drop of a protected network, an insert that arrived already expired);
- :class:`Report`: change nothing for this rule (the command is refused as a whole, so
  the rule keeps the state older commands gave it).

:func:`decide` does no I/O: it is table-tested without Redis or a kernel.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from pushfw.producer.contract import (
    DEFAULT_MIN_ACCEPT_PREFIX_V4,
    DEFAULT_MIN_ACCEPT_PREFIX_V6,
    DEFAULT_MIN_DROP_PREFIX_V4,
    DEFAULT_MIN_DROP_PREFIX_V6,
    LOOPBACK,
    Action,
    CommandRejected,
    Status,
    targets,
)
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.lists import (
    ListCommand,
    ListContent,
    parse_list_command,
    record_text,
)
from pushfw.producer.records import ListRecord, RuleRecord
from pushfw.producer.wire import ParsedCommand, read_command, read_network
from pushfw.worker.backends.base import BlockList, Rule, RuleKey
from pushfw.worker.expiry import expired, expires_at
from pushfw.worker.protect import Protection
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.signing import Signing
from pushfw.worker.stream import Entry

__all__ = [
    "FORGED_EXPIRY",
    "Add",
    "Decision",
    "Delete",
    "ListBounds",
    "ListDecision",
    "ListRequest",
    "Load",
    "Policy",
    "Report",
    "Request",
    "Unload",
    "decide",
    "decide_list",
    "decide_list_record",
    "decide_record",
    "is_signed",
    "list_cover_refusal",
    "refused_by_every_host",
    "refused_entries",
    "request_from_record",
    "takes_held",
]

_LOOPBACK = Protection(LOOPBACK)
FORGED_EXPIRY = "sig: missing (an unsigned expiry the ledger does not confirm)"


@dataclass(frozen=True, slots=True)
class ListBounds:
    """How much address space lists may cover on one host, each bound a prefix length: a
    list (or all lists of one action together) covers at most as many addresses as one
    network of that length. Per-entry bounds alone let 256 accept entries of /8 be an
    ``accept 0.0.0.0/0``, which no single command may send.
    """

    drop_v4: int
    drop_v6: int
    every_drop_v4: int
    every_drop_v6: int
    accept_v4: int
    accept_v6: int
    every_accept_v4: int
    every_accept_v6: int

    @classmethod
    def from_settings(cls, settings: WorkerSettings | None = None) -> ListBounds:
        """The bounds ``settings`` set (None: the defaults)."""
        s = settings if settings is not None else WorkerSettings.model_construct()
        return cls(
            s.list_drop_cover_v4,
            s.list_drop_cover_v6,
            s.all_drop_lists_cover_v4,
            s.all_drop_lists_cover_v6,
            s.list_accept_cover_v4,
            s.list_accept_cover_v6,
            s.all_accept_lists_cover_v4,
            s.all_accept_lists_cover_v6,
        )

    def prefixes(self, action: Action, version: int) -> tuple[int, int]:
        """(one list's bound, the bound of all lists of ``action``) for one family."""
        if action is Action.DROP:
            return (
                (self.drop_v4, self.every_drop_v4)
                if version == 4
                else (
                    self.drop_v6,
                    self.every_drop_v6,
                )
            )
        return (
            (self.accept_v4, self.every_accept_v4)
            if version == 4
            else (
                self.accept_v6,
                self.every_accept_v6,
            )
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """What one host accepts into its kernel.

    Args:
        host: the host's name, matched against ``target``.
        labels: the host's labels, matched against ``target``.
        protection: networks a drop must never cover.
        signing: the host's signature policy.
        min_drop_prefix_v4: the widest IPv4 network a drop may cover (a prefix length).
        min_drop_prefix_v6: the widest IPv6 network a drop may cover.
        min_accept_prefix_v4: the widest IPv4 network an accept may cover (an accept beats
            every ban, so ``0.0.0.0/0`` would lift them all).
        min_accept_prefix_v6: the widest IPv6 network an accept may cover.
        list_bounds: the address space lists may cover, one list and all of one action.
        max_lists: the most named lists the host holds at once.
        actions: the actions this host's backend can hold (a backend that cannot watch
            refuses a watch here, with ``backend`` named in the reason).
        backend: the backend's name, for that reason.
    """

    host: str
    labels: frozenset[str]
    protection: Protection
    signing: Signing
    min_drop_prefix_v4: int = DEFAULT_MIN_DROP_PREFIX_V4
    min_drop_prefix_v6: int = DEFAULT_MIN_DROP_PREFIX_V6
    min_accept_prefix_v4: int = DEFAULT_MIN_ACCEPT_PREFIX_V4
    min_accept_prefix_v6: int = DEFAULT_MIN_ACCEPT_PREFIX_V6
    list_bounds: ListBounds = field(default_factory=ListBounds.from_settings)
    max_lists: int = 64
    actions: frozenset[Action] = frozenset(Action)
    backend: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """A command as the gate sees it, from a stream entry or from a ledger record.

    ``fields`` are the wire fields a signature covers (None: a record of an unsigned
    command, which has nothing to verify); ``seen_ms`` is Redis's time when the command was
    first seen, from which the signature window is measured.
    """

    id: str
    key: RuleKey
    insert: bool
    expires_ms: int | None
    target: tuple[str, ...]
    origin: str
    seen_ms: int
    fields: Mapping[bytes, bytes] | None
    command: ParsedCommand | None = None
    confirmed: bool = False
    """A ttl tombstone of the ledger's: the scheduler's claim wrote it, nothing to verify."""

    @property
    def is_expiry(self) -> bool:
        """An unsigned ``*.delete`` with ``origin ttl``: what the scheduler's claim emits."""
        return not self.insert and self.origin == "ttl" and not is_signed(self.fields)

    @classmethod
    def from_entry(cls, entry: Entry, cmd: ParsedCommand, seen_ms: int) -> Request:
        return cls(
            id=entry.id,
            key=RuleKey(cmd.action, cmd.network),
            insert=cmd.is_insert,
            expires_ms=expires_at(seen_ms, cmd.ttl_s),
            target=cmd.target,
            origin=cmd.origin,
            seen_ms=seen_ms,
            fields=entry.fields,
            command=cmd,
        )


@dataclass(frozen=True, slots=True)
class Add:
    """Put this rule in the kernel (replacing one of the same key with another expiry)."""

    rule: Rule


@dataclass(frozen=True, slots=True)
class Delete:
    """This rule must not be in the kernel.

    ``status``/``detail`` are what to report; ``report`` False for a command meant for other
    hosts. ``expiring_by`` (the scheduler's expiries): remove only a timed rule that expires
    by then, so a renewal this host already applied is not cut short.
    """

    key: RuleKey
    status: Status = Status.APPLIED
    detail: str = ""
    report: bool = True
    expiring_by: int | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """Change nothing for this rule; report ``status`` with ``detail``."""

    status: Status
    detail: str


Decision = Add | Delete | Report


def is_signed(fields: Mapping[bytes, bytes] | None) -> bool:
    """Whether the fields carry a ``sig`` (checked or not, depending on the host's key)."""
    return fields is not None and any(name.lower() == b"sig" for name in fields)


def refused_by_every_host(cmd: ParsedCommand, fields: Mapping[bytes, bytes] | None) -> bool:
    """What the ledger never records: a drop of loopback (every host protects it) and an
    unsigned ttl delete (the scheduler's claim folded its own; any other is forged).

    Everything else a host may refuse depends on that host's policy, so the ledger keeps it
    and each host's :func:`decide` refuses it at reconcile as it does on the stream.
    """
    if cmd.origin == "ttl" and not cmd.is_insert and not is_signed(fields):
        return True
    return cmd.action is Action.DROP and _LOOPBACK.covering(cmd.network) is not None


def decide(
    request: Request, policy: Policy, now_ms: int, record: RuleRecord | None = None
) -> Decision:
    """The one decision for one command on one host.

    Args:
        request: the command.
        policy: the host's policy.
        now_ms: Redis's clock now.
        record: the ledger's record for the rule; consulted only for the scheduler's
            unsigned expiries, which count only where the ledger holds their tombstone.
    """
    if request.is_expiry:
        return _confirm_expiry(request, record)
    refused = None if request.confirmed else _authentic(request, policy)
    if refused is not None:
        return refused
    key = request.key
    if not targets(request.target, policy.host, policy.labels):
        return Delete(key, Status.UNCHANGED, report=False)  # the newest command is for others
    if not request.insert:
        return Delete(key)
    if key.action not in policy.actions:
        return Delete(key, Status.REJECTED, cannot_hold(key.action, policy))
    unsafe = _unsafe_drop(key, policy) if key.action is Action.DROP else _too_wide(key, policy)
    if unsafe is not None:
        return Delete(key, Status.REJECTED, f"ip: {unsafe}")
    if expired(request.expires_ms, now_ms):
        assert request.expires_ms is not None
        return Delete(key, Status.EXPIRED, f"expired {now_ms - request.expires_ms} ms ago")
    return Add(Rule(key, request.expires_ms))


def cannot_hold(action: Action, policy: Policy) -> str:
    """Why this host refuses every rule or list of ``action``."""
    return f"action: the {policy.backend or 'configured'} backend cannot {action.value}"


def _authentic(request: Request, policy: Policy) -> Report | None:
    return _authentic_fields(request.fields, request.seen_ms, policy)


def _unsafe_drop(key: RuleKey, policy: Policy) -> str | None:
    network = key.network
    protected = policy.protection.covering(network)
    if protected is not None:
        return f"{network} overlaps protected network {protected}"
    widest = policy.min_drop_prefix_v4 if network.version == 4 else policy.min_drop_prefix_v6
    if network.prefixlen < widest:
        return f"{network} is wider than /{widest}, the widest network a drop may cover here"
    return None


def _too_wide(key: RuleKey, policy: Policy) -> str | None:
    """An accept's or a watch's bound. A watch blocks nothing, so no protected network
    refuses it, but it shares the accept bounds: a watch of 0.0.0.0/0 counts nothing useful
    and would fill the sets an operator reads."""
    network = key.network
    widest = policy.min_accept_prefix_v4 if network.version == 4 else policy.min_accept_prefix_v6
    if network.prefixlen < widest:
        return (
            f"{network} is wider than /{widest}, the widest network "
            f"a{'n' if key.action is Action.ACCEPT else ''} {key.action.value} may cover here"
        )
    return None


def _confirm_expiry(request: Request, record: RuleRecord | None) -> Decision:
    """The scheduler's expiry counts where the ledger holds its tombstone; else it is void."""
    if record is not None and record.id == request.id and record.is_expiry:
        return Delete(request.key, expiring_by=record.expired_ms)
    if record is not None and record.voided == request.id:
        return Report(Status.UNCHANGED, f"renewed by {record.id} before it expired")
    if record is not None and entry_order(record.order_id) > entry_order(request.id):
        return Report(Status.UNCHANGED, f"superseded by newer command {record.id}")
    return Report(Status.REJECTED, FORGED_EXPIRY)


def request_from_record(record: RuleRecord) -> Request | None:
    """The command a ledger record holds, as the gate sees it (None: not a valid rule).

    A signed record is rebuilt from its signed fields, so a strict host trusts nothing the
    folding worker wrote beside them.
    """
    try:
        network = read_network(record.network)
        action = Action(record.action)
    except ValueError:
        return None
    key = RuleKey(action, network)
    seen_ms = record.seen_ms if record.seen_ms is not None else entry_order(record.id)[0]
    if record.signed:
        fields = {k.encode(): v.encode() for k, v in record.signed.items()}
        try:
            cmd = read_command(fields)
        except CommandRejected:
            return None
        if RuleKey(cmd.action, cmd.network) != key:
            return None
        return Request(
            id=record.id,
            key=key,
            insert=cmd.is_insert,
            expires_ms=expires_at(seen_ms, cmd.ttl_s),
            target=cmd.target,
            origin=cmd.origin,
            seen_ms=seen_ms,
            fields=fields,
            command=cmd,
        )
    return Request(
        id=record.id,
        key=key,
        insert=not record.deleted,
        expires_ms=record.expires_ms,
        target=tuple(record.target),
        origin="" if record.is_expiry else record.origin,
        seen_ms=seen_ms,
        fields=None,
        confirmed=record.is_expiry,
    )


def takes_held(policy: Policy, decision: object) -> bool:
    """Whether a host takes the ledger's held record instead of the newest one: a host with
    ``require_signature`` that refuses the newest command as a whole. Every command it ever
    took was verified, so the newest verified state is the state it held; other hosts take
    the newest command, whatever it is (I3)."""
    return policy.signing.required and (decision is None or isinstance(decision, Report))


def decide_record(
    record: RuleRecord | None, held: RuleRecord | None, policy: Policy, now_ms: int
) -> tuple[RuleKey, Decision] | None:
    """The decision for one rule at reconcile: its newest record (None: forgotten) and its
    held record (the newest one a worker verified, see :mod:`pushfw.worker.held`)."""
    request = request_from_record(record) if record is not None else None
    decision = decide(request, policy, now_ms) if request is not None else None
    if held is not None and takes_held(policy, decision):
        instead = request_from_record(held)
        if instead is not None and (request is None or instead.key == request.key):
            verified = decide(instead, policy, now_ms)
            if not isinstance(verified, Report):
                return instead.key, verified
    if request is None or decision is None:
        return None
    return request.key, decision


# --- named lists ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListRequest:
    """A list command as the gate sees it, from a stream entry or from a ledger record."""

    id: str
    list: BlockList
    load: bool
    target: tuple[str, ...]
    seen_ms: int
    fields: Mapping[bytes, bytes] | None
    size: int = 0
    """The entry count the command states; the stored content must hold exactly that."""

    @classmethod
    def from_entry(cls, entry: Entry, cmd: ListCommand, seen_ms: int) -> ListRequest:
        return cls(
            id=entry.id,
            list=BlockList(
                cmd.name,
                cmd.action,
                cmd.version,
                expires_at(seen_ms, cmd.ttl_s),
            ),
            load=cmd.is_insert,
            target=cmd.target,
            seen_ms=seen_ms,
            fields=entry.fields,
            size=cmd.size,
        )

    @classmethod
    def from_record(cls, record: ListRecord) -> ListRequest | None:
        """The command a list's ledger record holds (None: not a valid list command).

        A signed record is rebuilt from its signed fields, as :func:`request_from_record`
        does for rules."""
        try:
            first_seen_ms = entry_order(record.id)[0]
        except ValueError:
            return None
        seen_ms = record.seen_ms if record.seen_ms is not None else first_seen_ms
        if record.signed:
            fields = {k.encode(): v.encode() for k, v in record.signed.items()}
            try:
                cmd = parse_list_command(fields)
            except CommandRejected:
                return None
            if cmd.name != record.name:
                return None
            return cls.from_entry(Entry(record.id, fields), cmd, seen_ms)
        try:
            action = Action(record.action)
        except ValueError:
            return None
        return cls(
            id=record.id,
            list=BlockList(record.name, action, record.version, record.expires_ms),
            load=not record.deleted,
            target=tuple(record.target),
            seen_ms=seen_ms,
            fields=None,
            size=record.size,
        )


@dataclass(frozen=True, slots=True)
class Load:
    """Hold this list in the kernel (its entries then pass :func:`refused_entries`, and
    together :func:`list_cover_refusal`); ``size`` is the entry count its command states."""

    list: BlockList
    size: int = 0


@dataclass(frozen=True, slots=True)
class Unload:
    """This list must not be in the kernel; ``report`` False for a list meant for others."""

    name: str
    status: Status = Status.APPLIED
    detail: str = ""
    report: bool = True


ListDecision = Load | Unload | Report


def decide_list(request: ListRequest, policy: Policy, now_ms: int) -> ListDecision:
    """The one decision for one list command on one host, in the order :func:`decide`
    checks a rule: authenticity, target, expiry. Entries are checked one by one by
    :func:`refused_entries` once the content is read."""
    refused = _authentic_fields(request.fields, request.seen_ms, policy)
    if refused is not None:
        return refused
    name = request.list.name
    if not targets(request.target, policy.host, policy.labels):
        return Unload(name, Status.UNCHANGED, report=False)
    if not request.load:
        return Unload(name)
    if request.list.action not in policy.actions:
        return Unload(name, Status.REJECTED, cannot_hold(request.list.action, policy))
    expires_ms = request.list.expires_ms
    if expired(expires_ms, now_ms):
        assert expires_ms is not None
        return Unload(name, Status.EXPIRED, f"expired {now_ms - expires_ms} ms ago")
    return Load(request.list, request.size)


def decide_list_record(
    record: ListRecord | None, held: ListRecord | None, policy: Policy, now_ms: int
) -> tuple[ListRequest, ListDecision] | None:
    """The decision for one list at reconcile, as :func:`decide_record` for a rule."""
    request = ListRequest.from_record(record) if record is not None else None
    decision = decide_list(request, policy, now_ms) if request is not None else None
    if held is not None and takes_held(policy, decision):
        instead = ListRequest.from_record(held)
        if instead is not None and (request is None or instead.list.name == request.list.name):
            verified = decide_list(instead, policy, now_ms)
            if not isinstance(verified, Report):
                return instead, verified
    if request is None or decision is None:
        return None
    return request, decision


def over_list_cap(name: str, held: Collection[str], policy: Policy) -> str | None:
    """Why loading list ``name`` would pass the host's cap on lists (None: it would not).

    A list already held may always be loaded again: only a new one counts.
    """
    if name in held or len(held) < policy.max_lists:
        return None
    return (
        f"this host holds {len(held)} lists, its cap (max_lists {policy.max_lists}): "
        "remove a list first, or raise PUSHFW_MAX_LISTS"
    )


def refused_entries(
    content: ListContent, action: Action, policy: Policy
) -> tuple[ListContent, list[str]]:
    """The entries of a list this host may hold, and why it leaves out the others.

    The checks a single command's ``ip`` meets: a drop never covers a protected network,
    and no entry is wider than the host's blast-radius bounds.
    """
    refused: dict[int, dict[bytes, str]] = {4: {}, 6: {}}
    bounds = (
        {4: policy.min_drop_prefix_v4, 6: policy.min_drop_prefix_v6}
        if action is Action.DROP
        else {4: policy.min_accept_prefix_v4, 6: policy.min_accept_prefix_v6}
    )
    for version, widest in bounds.items():
        for rec in content.narrower_than(version, widest):
            refused[version][rec] = (
                f"{record_text(rec)} is wider than /{widest}, the widest network "
                f"a{'n' if action is Action.ACCEPT else ''} {action.value} may cover here"
            )
    if action is Action.DROP:
        for protected in policy.protection.networks:
            start = int(protected.network_address)
            end = int(protected.broadcast_address)
            for rec in content.overlapping(protected.version, start, end):
                refused[protected.version].setdefault(
                    rec, f"{record_text(rec)} overlaps protected network {protected}"
                )
    if not refused[4] and not refused[6]:
        return content, []
    kept = content.without(set(refused[4]), set(refused[6]))
    return kept, [*refused[4].values(), *refused[6].values()]


def _authentic_fields(
    fields: Mapping[bytes, bytes] | None, seen_ms: int, policy: Policy
) -> Report | None:
    signing = policy.signing
    if fields is None:
        return Report(Status.REJECTED, "sig: missing") if signing.required else None
    try:
        signing.check(fields, seen_ms)
    except CommandRejected as exc:
        return Report(Status.REJECTED, str(exc))
    return None


def list_cover_refusal(
    content: ListContent, action: Action, policy: Policy, others: Iterable[ListContent]
) -> str | None:
    """Why this host refuses a list as a whole for what its entries cover together (None:
    within the bounds): more than one list of ``action`` may cover, or, with ``others`` (the
    other lists of ``action`` this host holds), more than all of them may.

    ``content`` is what the host would hold (after :func:`refused_entries`); entries of one
    list never overlap, so its cover is exact; lists are summed, overlaps counted twice.
    """
    others = list(others)
    for version, bits in ((4, 32), (6, 128)):
        one, every = policy.list_bounds.prefixes(action, version)
        covered = content.cover(version)
        if covered > 1 << (bits - one):
            return (
                f"the list covers {_share(covered, bits)} of the IPv{version} space, more than "
                f"one {action.value} list may here (a /{one})"
            )
        total = covered + sum(other.cover(version) for other in others)
        if total > 1 << (bits - every):
            return (
                f"with the {len(others)} other {action.value} lists held here it would cover "
                f"{_share(total, bits)} of the IPv{version} space, more than all "
                f"{action.value} lists may together (a /{every})"
            )
    return None


def _share(addresses: int, bits: int) -> str:
    return f"{addresses / (1 << bits):.3%}"
