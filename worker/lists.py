"""The list keeper: make the named lists in this host's kernel follow the stream and ledger.

A ``list.load`` command names a list and a version (the hash of its packed entries, stored
once in ``{pushfw}:list:<name>:<version>``). The keeper reads that content, checks its hash,
asks the gate (:func:`pushfw.worker.decide.decide_list`, then
:func:`~pushfw.worker.decide.refused_entries` for each entry) what this host may hold, and
changes the kernel in one transaction: the difference from the version it holds when the
action and expiry are the same, else the whole list. Each list lives in kernel objects of
its own (:meth:`pushfw.worker.backends.base.Backend.load_list`), so a list never touches
single rules and ``pushfw undrop`` of one address does not punch a hole in a list.

Lists follow the rules' guarantees: results and acknowledgement through the applier, the
newest command per list wins (a late retry of an older one is superseded), reconcile makes
the kernel hold exactly the ledger's lists for this host (the whole content at start, since
the kernel's sets are not read back), and a timed list ends on the kernel's own timeouts
even while the worker is away, and is removed by the keeper at its expiry.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import redis

from pushfw.producer.connection import text
from pushfw.producer.contract import CommandRejected, Status
from pushfw.producer.entry_ids import entry_order
from pushfw.producer.keys import Keys
from pushfw.producer.lists import (
    ListCommand,
    ListContent,
    difference,
    parse_list_command,
    read_content,
)
from pushfw.producer.records import HeldList, ListRecord
from pushfw.producer.render import plural
from pushfw.worker.backends.base import Backend, BlockList, ListBackend, lists_of
from pushfw.worker.copies import ContentCopies
from pushfw.worker.decide import (
    ListDecision,
    ListRequest,
    Load,
    Policy,
    Report,
    Unload,
    decide_list,
    decide_list_record,
    list_cover_refusal,
    over_list_cap,
    refused_entries,
)
from pushfw.worker.errors import BackendError, PermanentBackendError, TransientBackendError
from pushfw.worker.expiry import expired
from pushfw.worker.heap import LARGE, give_back_memory
from pushfw.worker.stream import Entry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one list command came to on this host; ``status`` None: retry it later."""

    status: Status | None
    detail: str = ""
    report: bool = True
    permanent: bool = False
    busy: bool = False


@dataclass(frozen=True, slots=True)
class ListDrift:
    """What a reconcile did to the lists, a count of lists each: the summary's second half."""

    loaded: int = 0
    """Loaded where the kernel held no such list (new, or gone in a hand flush)."""
    changed: int = 0
    """Loaded over another version (action, expiry) of it that this worker held."""
    reloaded: int = 0
    """Loaded whole again over what the kernel held from before this worker started: the
    kernel's sets are not read back, so each start reloads every list. Not drift."""
    kept: int = 0
    removed: int = 0
    refused: int = 0
    """Lists the gate or the kernel refused here (their reasons are the host's problems)."""

    @property
    def found(self) -> int:
        """Lists the kernel or this worker held before the reconcile."""
        return self.changed + self.reloaded + self.kept + self.removed

    @property
    def drifted(self) -> bool:
        """Whether the kernel's lists were not what this host had committed."""
        return bool(self.loaded or self.changed or self.removed)

    def __str__(self) -> str:
        counts = [
            f"{count} {what}"
            for what, count in (
                ("loaded", self.loaded),
                ("changed", self.changed),
                ("reloaded", self.reloaded),
                ("kept", self.kept),
                ("removed", self.removed),
                ("refused", self.refused),
            )
            if count
        ]
        return "lists: " + ", ".join(counts) if counts else "no lists"


@dataclass(frozen=True, slots=True)
class Held:
    """A list as this host's kernel holds it, and the command that put it there."""

    spec: BlockList
    content: ListContent
    refused: int
    id: str


def read_records(client: redis.Redis, keys: Keys, held: bool = False) -> dict[str, ListRecord]:
    """Every list's ledger record (deleted ones too), by name; ``held``: the held records.

    A record that does not parse, or names another list than its field, is left out with a
    warning: it is input, and one must not stop the others."""
    raw: Any = client.hgetall(keys.held_lists if held else keys.lists)
    records = {}
    for key, value in raw.items():
        name = text(key)
        try:
            record = ListRecord.model_validate_json(value)
        except ValueError as exc:
            logger.warning("list %r: ledger record left out, it does not parse: %s", name, exc)
            continue
        if record.name != name:
            logger.warning("list %r: ledger record left out, it names list %r", name, record.name)
            continue
        records[name] = record
    return records


class ListKeeper:
    """The named lists of one host's kernel.

    Args:
        client: the worker's Redis connection (bytes replies).
        keys: key names under the configured prefix.
        backend: the host's firewall.
        policy: the host's policy, the same the rules pass.
        kernel: wraps kernel work, as the applier's does (the expiry alarm waits for it).
        copies: where a host with ``require_signature`` keeps the content it loads
            (:mod:`pushfw.worker.copies`); None: nowhere.
        alive: called before each large kernel call: the worker pings systemd's watchdog.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        backend: Backend,
        policy: Policy,
        kernel: Callable[[], AbstractContextManager[None]],
        copies: ContentCopies | None = None,
        alive: Callable[[], None] = lambda: None,
    ) -> None:
        self.copies = copies
        self.client = client
        self.keys = keys
        self.backend = lists_of(backend)
        """The backend's lists, asked once; None: it keeps no sets (iptables)."""
        self._backend_name = backend.name
        self.policy = policy
        self.kernel = kernel
        self.alive = alive
        """Called before each large kernel call: the worker pings systemd's watchdog."""
        self.held: dict[str, Held] = {}
        self._removed: dict[str, str] = {}
        """Per list removed here, the id of the command that removed it (newest wins)."""
        self.problems: dict[str, str] = {}
        """Per list, why its newest command could not be carried out here (the heartbeat's
        problems, so ``pushfw status`` shows it); cleared once one is."""

    def handle(self, entry: Entry, seen_ms: int, now_ms: int) -> tuple[Outcome, ListCommand | None]:
        """Apply one ``list.*`` entry; returns the outcome and the parsed command (or None).

        Never raises but for Redis being unreachable: whatever one list command runs into is
        that command's result, and the applier goes on with the next entry.
        """
        assert entry.fields is not None
        try:
            cmd = parse_list_command(entry.fields)
        except CommandRejected as exc:
            return Outcome(Status.REJECTED, str(exc)), None
        newest = self._newest_id(cmd.name)
        if newest is not None and entry_order(newest) > entry_order(entry.id):
            return Outcome(Status.UNCHANGED, f"superseded by newer command {newest}"), cmd
        request = ListRequest.from_entry(entry, cmd, seen_ms)
        outcome = self._guarded(
            cmd.name, lambda: self._carry_out(decide_list(request, self.policy, now_ms), entry.id)
        )
        return outcome, cmd

    def _guarded(self, name: str, carry_out: Callable[[], Outcome]) -> Outcome:
        """``carry_out()``, with an unexpected error made a retried failure of this list's
        command (dead-lettered after ``max_deliveries``) and every failure a problem."""
        try:
            outcome = carry_out()
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # Redis is down: the loop waits for it, the command stays pending
        except Exception as exc:
            logger.exception("list %s: unexpected error", name)
            outcome = Outcome(None, f"unexpected error: {exc!r}")
        if outcome.status in (Status.REJECTED, Status.FAILED, None):
            self.problems[name] = f"list {name}: {outcome.detail}"
        else:
            self.problems.pop(name, None)
        return outcome

    def _newest_id(self, name: str) -> str | None:
        held = self.held.get(name)
        return held.id if held is not None else self._removed.get(name)

    def _carry_out(self, decision: ListDecision, entry_id: str) -> Outcome:
        if isinstance(decision, Report):
            return Outcome(decision.status, decision.detail)
        if isinstance(decision, Unload):
            return self._unload(decision, entry_id)
        return self._load(decision, entry_id)

    def _unload(self, decision: Unload, entry_id: str) -> Outcome:
        name = decision.name
        present = name in self.held or name in self._kernel_names()
        if present:
            try:
                with self.kernel():
                    self._sets().remove_list(name)
            except BackendError as exc:
                return _failed(exc)
            self.held.pop(name, None)
            if self.copies is not None:
                self.copies.drop(name)
            logger.info("list %s removed", name)
        self._removed[name] = entry_id
        status = decision.status
        if status is Status.APPLIED and not present:
            status = Status.UNCHANGED
        detail = decision.detail or ("removed" if present else "not held here")
        return Outcome(status, detail, decision.report)

    def _no_sets(self) -> str:
        return f"the {self._backend_name} backend keeps no sets: lists need ipset or nftables"

    def _sets(self) -> ListBackend:
        """The backend's lists; one without them refuses as its kernel would."""
        if self.backend is None:
            raise PermanentBackendError(self._no_sets())
        return self.backend

    def _kernel_names(self) -> set[str]:
        try:
            with self.kernel():
                return self._sets().list_names()
        except BackendError:
            return set()

    def _load(self, decision: Load, entry_id: str) -> Outcome:
        spec = decision.list
        if self.backend is None:
            return Outcome(Status.REJECTED, self._no_sets())
        content = over_list_cap(spec.name, self.held, self.policy) or self._read(
            spec, decision.size
        )
        if isinstance(content, str):
            return Outcome(Status.REJECTED, content)
        if content is None:
            return self._content_gone(spec, entry_id)
        admitted = self._admit(spec, content)
        if isinstance(admitted, str):
            return Outcome(Status.REJECTED, admitted)
        kept, refused = admitted
        try:
            changed, detail = self._change_kernel(spec, kept)
        except BackendError as exc:
            return _failed(exc)
        if kept.size >= LARGE:
            give_back_memory()
        self.held[spec.name] = Held(spec, kept, len(refused), entry_id)
        if self.copies is not None:
            self.copies.save(spec.name, content)
        self._removed.pop(spec.name, None)
        if refused:
            detail += f"; {plural(len(refused), 'entry', 'entries')} refused: {refused[0]}"
            if len(refused) > 1:
                detail += ", ..."
        return Outcome(Status.APPLIED if changed else Status.UNCHANGED, detail)

    def _admit(self, spec: BlockList, content: ListContent) -> tuple[ListContent, list[str]] | str:
        """The gate for a list's entries: those this host may hold and why it leaves out the
        others, or why it refuses the list as a whole (what it covers together)."""
        kept, refused = refused_entries(content, spec.action, self.policy)
        self.alive()
        others = (
            h.content
            for n, h in self.held.items()
            if n != spec.name and h.spec.action is spec.action
        )
        too_wide = list_cover_refusal(kept, spec.action, self.policy, others)
        if too_wide is not None:
            return too_wide
        for reason in refused[:3]:
            logger.warning("list %s: left out %s", spec.name, reason)
        return kept, refused

    def _read(self, spec: BlockList, size: int) -> ListContent | str | None:
        """The version's content, from Redis or else this host's copy (None: gone; a str:
        why what Redis holds is refused)."""
        try:
            content = read_content(self.client, self.keys, spec.name, spec.version, size)
        except ValueError as exc:
            return self._copy(spec, f"is refused ({exc})") or f"content: {exc}"
        return content if content is not None else self._copy(spec, "is gone from Redis")

    def _copy(self, spec: BlockList, why: str) -> ListContent | None:
        """This host's copy of the version, written back to Redis (None: no copy)."""
        if self.copies is None:
            return None
        content = self.copies.load(spec.name, spec.version)
        if content is not None:
            logger.warning(
                "list %s: version %s %s: loaded this host's copy, stored it again",
                spec.name,
                spec.version,
                why,
            )
            self.client.set(self.keys.list_content(spec.name, spec.version), content.to_bytes())
        return content

    def _keep_in_redis(self, spec: BlockList) -> None:
        """Write this host's copy back if the content left Redis: for hosts joining later."""
        key = self.keys.list_content(spec.name, spec.version)
        if self.copies is not None and not self.client.exists(key):
            self._copy(spec, "is gone from Redis")

    def _change_kernel(self, spec: BlockList, kept: ListContent) -> tuple[bool, str]:
        """Make the kernel hold ``kept`` as ``spec``; whether that changed it, and how."""
        held = self.held.get(spec.name)
        if (
            held is not None
            and (held.spec.action, held.spec.expires_ms) == (spec.action, spec.expires_ms)
            and spec.name in self._kernel_names()
        ):
            added, removed = difference(held.content, kept)
            if not added and not removed:
                return False, f"{plural(kept.size, 'entry', 'entries')} held already"
            with self.kernel():
                self._sets().change_list(spec, added, removed)
            logger.info(
                "list %s: version %s, %d added, %d removed",
                spec.name,
                spec.version[:12],
                len(added),
                len(removed),
            )
            return True, f"{len(added)} added, {len(removed)} removed: {kept.size} entries"
        with self.kernel():
            self._sets().load_list(spec, kept.networks())
        logger.info(
            "list %s: version %s loaded, %s",
            spec.name,
            spec.version[:12],
            plural(kept.size, "entry", "entries"),
        )
        return True, f"loaded {plural(kept.size, 'entry', 'entries')}"

    def _content_gone(self, spec: BlockList, entry_id: str) -> Outcome:
        """The content was replaced and has expired: a newer command brings the list."""
        record = read_records(self.client, self.keys).get(spec.name)
        if record is not None and entry_order(record.id) > entry_order(entry_id):
            return Outcome(Status.UNCHANGED, f"superseded by newer command {record.id}")
        return Outcome(
            Status.FAILED,
            f"version {spec.version} of list {spec.name} is not in Redis; import the list again",
        )

    def reconcile(self, now_ms: int, remove_extras: bool = True) -> ListDrift:
        """Make the kernel's lists exactly the ledger's lists for this host; what it did.

        A list held at the ledger's version, action and expiry is only put through the gate
        again (:meth:`recheck`); every other one is loaded whole; lists the kernel holds that
        the ledger does not give this host are removed, unless ``remove_extras`` is False (a
        ledger this host does not trust: Redis may have lost its data, see
        :mod:`pushfw.worker.generation`). What fails is in :attr:`problems`, what the kernel
        held of that list stays until the keeper knows it will not be loaded (:meth:`_settle`).
        """
        self.recheck()
        done: Counter[str] = Counter()
        unsure: set[str] = set()  # lists a refused record or a retry may still bring back
        wanted: set[str] = set()
        in_kernel = self._kernel_names()
        present = in_kernel | set(self.held)
        records = read_records(self.client, self.keys)
        verified = (
            read_records(self.client, self.keys, held=True) if self.policy.signing.required else {}
        )
        for name in sorted(records.keys() | verified.keys()):
            found = decide_list_record(records.get(name), verified.get(name), self.policy, now_ms)
            request, decision = found if found is not None else (None, None)
            if request is None or decision is None or isinstance(decision, Report):
                if name in present:
                    wanted.add(name)  # held: a record this host refuses changes nothing here
                    unsure.add(name)
                continue
            if isinstance(decision, Load):
                wanted.add(name)
                label = self._reconcile_one(decision, request.id, name in in_kernel)
                if label == "retried":
                    unsure.add(name)
                done["refused" if label == "retried" else label] += 1
        if remove_extras:
            for name in present - wanted:
                outcome = self._unload(Unload(name), self._removed.get(name, "0-0"))
                done["removed" if outcome.status is not None else "refused"] += 1
            self._settle(unsure - set(self.held))
        return ListDrift(**done)

    def _settle(self, unsure: set[str]) -> None:
        """Let the backend forget the lists the kernel held before this start that were not
        loaded again (content gone, or refused): until then a set backend deletes no entry,
        and one another list drops would stay. Not while one may still come back (``unsure``:
        a refused newest command, a load to retry)."""
        if unsure or self.backend is None:
            return  # a refused record or a retry may still bring the kernel's list back
        try:
            with self.kernel():
                gone = self.backend.settle()
        except BackendError as exc:
            logger.warning("lists: could not settle the shared sets: %s", exc)
            return
        if gone:
            logger.warning(
                "lists %s: held before this start, not loaded again (see the problems): "
                "removed, with every entry no loaded list holds",
                ", ".join(sorted(gone)),
            )

    def _reconcile_one(self, decision: Load, entry_id: str, in_kernel: bool) -> str:
        """Load one list of the ledger unless the kernel holds it as it says; which
        :class:`ListDrift` count that is."""
        name = decision.list.name
        held = self.held.get(name)
        if held is not None and (held.spec, held.id) == (decision.list, entry_id) and in_kernel:
            self._keep_in_redis(decision.list)  # in_kernel: not gone in a hand flush
            return "kept"
        self.held.pop(name, None)  # the kernel may hold anything: load it whole
        outcome = self._guarded(name, partial(self._load, decision, entry_id))
        if outcome.status is None and not outcome.permanent:
            return "retried"
        if outcome.status not in (Status.APPLIED, Status.UNCHANGED):
            return "refused"
        if not in_kernel:
            return "loaded"
        return "reloaded" if held is None else "changed"

    def recheck(self) -> int:
        """Put every held list through the gate again with this host's policy as it is now,
        and take the entries it refuses now out of the kernel at once; returns how many.

        Protection grows while a worker runs (Redis reached at a new address after a DNS
        change or a failover): a held list must not keep dropping it. Needs no Redis.
        """
        lifted = 0
        for name, held in list(self.held.items()):
            kept, refused = refused_entries(held.content, held.spec.action, self.policy)
            if not refused:
                continue
            _, removed = difference(held.content, kept)
            try:
                with self.kernel():
                    self._sets().change_list(held.spec, [], removed)
            except BackendError as exc:
                self.problems[name] = f"list {name}: could not lift {refused[0]}: {exc}"
                continue
            self.held[name] = replace(held, content=kept, refused=held.refused + len(removed))
            logger.warning(
                "list %s: lifted %d entries refused now: %s", name, len(removed), refused[0]
            )
            lifted += len(removed)
        return lifted

    def expire_due(self, now_ms: int) -> int:
        """Remove the lists whose expiry has passed; returns how many."""
        due = [h for h in self.held.values() if expired(h.spec.expires_ms, now_ms)]
        for held in due:
            outcome = self._unload(Unload(held.spec.name), held.id)
            if outcome.status is None:
                logger.warning(
                    "could not remove expired list %s: %s", held.spec.name, outcome.detail
                )
            else:
                logger.info("list %s expired", held.spec.name)
        return len(due)

    def ms_until_next(self, now_ms: int) -> int | None:
        """Milliseconds until the next list expires (None: none is timed)."""
        due = [h.spec.expires_ms for h in self.held.values() if h.spec.expires_ms is not None]
        return max(0, min(due) - now_ms) if due else None

    def status(self) -> dict[str, HeldList]:
        """What the heartbeat says about lists: what this kernel holds."""
        return {
            name: HeldList(version=h.spec.version, entries=h.content.size, refused=h.refused)
            for name, h in sorted(self.held.items())
        }


def _failed(exc: BackendError) -> Outcome:
    return Outcome(
        None,
        str(exc),
        permanent=isinstance(exc, PermanentBackendError),
        busy=isinstance(exc, TransientBackendError),
    )
