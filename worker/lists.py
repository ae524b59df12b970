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
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import redis

from pushfw.producer.contract import CommandRejected, Status
from pushfw.producer.keys import Keys
from pushfw.producer.lists import ListCommand, ListContent, difference, parse_list_command
from pushfw.producer.records import HeldList, ListRecord
from pushfw.producer.render import plural
from pushfw.worker.backends.base import Backend, BlockList
from pushfw.worker.decide import (
    ListDecision,
    ListRequest,
    Load,
    Policy,
    Report,
    Unload,
    decide_list,
    over_list_cap,
    refused_entries,
)
from pushfw.worker.errors import BackendError, PermanentBackendError, TransientBackendError
from pushfw.worker.heap import LARGE, give_back_memory
from pushfw.worker.stream import Entry, stream_id_order

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
class Held:
    """A list as this host's kernel holds it, and the command that put it there."""

    spec: BlockList
    content: ListContent
    refused: int
    id: str


def read_records(client: redis.Redis, keys: Keys) -> dict[str, ListRecord]:
    """Every list's ledger record (deleted ones too), by name."""
    raw: Any = client.hgetall(keys.lists)
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): ListRecord.model_validate_json(v)
        for k, v in raw.items()
    }


def read_content(client: redis.Redis, keys: Keys, name: str, version: str) -> ListContent | None:
    """One version of a list's entries (None: gone), checked against its hash.

    Raises:
        ValueError: the content is damaged, or is not the version its key names.
    """
    raw: Any = client.get(keys.list_content(name, version))
    if raw is None:
        return None
    content = ListContent.from_bytes(raw)
    if content.version != version:
        raise ValueError(f"the content stored as version {version} hashes to {content.version}")
    return content


class ListKeeper:
    """The named lists of one host's kernel.

    Args:
        client: the worker's Redis connection (bytes replies).
        keys: key names under the configured prefix.
        backend: the host's firewall.
        policy: the host's policy, the same the rules pass.
        kernel: wraps kernel work, as the applier's does (the expiry alarm waits for it).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        backend: Backend,
        policy: Policy,
        kernel: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.client = client
        self.keys = keys
        self.backend = backend
        self.policy = policy
        self.kernel = kernel
        self.alive: Callable[[], None] = lambda: None
        """Called before each large kernel call: the worker pings systemd's watchdog."""
        self.held: dict[str, Held] = {}
        self._removed: dict[str, str] = {}
        """Per list removed here, the id of the command that removed it (newest wins)."""

    def handle(self, entry: Entry, seen_ms: int, now_ms: int) -> tuple[Outcome, ListCommand | None]:
        """Apply one ``list.*`` entry; returns the outcome and the parsed command (or None)."""
        assert entry.fields is not None
        try:
            cmd = parse_list_command(entry.fields)
        except CommandRejected as exc:
            return Outcome(Status.REJECTED, str(exc)), None
        newest = self._newest_id(cmd.name)
        if newest is not None and stream_id_order(newest) > stream_id_order(entry.id):
            return Outcome(Status.UNCHANGED, f"superseded by newer command {newest}"), cmd
        request = ListRequest.from_entry(entry, cmd, seen_ms)
        return self._carry_out(decide_list(request, self.policy, now_ms), entry.id), cmd

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
                    self.backend.remove_list(name)
            except BackendError as exc:
                return _failed(exc)
            self.held.pop(name, None)
            logger.info("list %s removed", name)
        self._removed[name] = entry_id
        status = decision.status
        if status is Status.APPLIED and not present:
            status = Status.UNCHANGED
        detail = decision.detail or ("removed" if present else "not held here")
        return Outcome(status, detail, decision.report)

    def _kernel_names(self) -> set[str]:
        try:
            with self.kernel():
                return self.backend.list_names()
        except BackendError:
            return set()

    def _load(self, decision: Load, entry_id: str) -> Outcome:
        spec = decision.list
        if not self.backend.supports_lists:
            return Outcome(
                Status.REJECTED,
                f"the {self.backend.name} backend keeps no sets: lists need ipset or nftables",
            )
        over_cap = over_list_cap(spec.name, self.held, self.policy)
        if over_cap is not None:
            return Outcome(Status.REJECTED, over_cap)
        try:
            content = read_content(self.client, self.keys, spec.name, spec.version)
        except ValueError as exc:
            return Outcome(Status.REJECTED, f"version: {exc}")
        if content is None:
            return self._content_gone(spec, entry_id)
        kept, refused = refused_entries(content, spec.action, self.policy)
        self.alive()
        for reason in refused[:3]:
            logger.warning("list %s: left out %s", spec.name, reason)
        try:
            changed, detail = self._change_kernel(spec, kept)
        except BackendError as exc:
            return _failed(exc)
        if kept.size >= LARGE:
            give_back_memory()
        self.held[spec.name] = Held(spec, kept, len(refused), entry_id)
        self._removed.pop(spec.name, None)
        if refused:
            detail += f"; {plural(len(refused), 'entry', 'entries')} refused: {refused[0]}"
            if len(refused) > 1:
                detail += ", ..."
        return Outcome(Status.APPLIED if changed else Status.UNCHANGED, detail)

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
                self.backend.change_list(spec, added, removed)
            logger.info(
                "list %s: version %s, %d added, %d removed",
                spec.name,
                spec.version[:12],
                len(added),
                len(removed),
            )
            return True, f"{len(added)} added, {len(removed)} removed: {kept.size} entries"
        with self.kernel():
            self.backend.load_list(spec, kept.networks())
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
        if record is not None and stream_id_order(record.id) > stream_id_order(entry_id):
            return Outcome(Status.UNCHANGED, f"superseded by newer command {record.id}")
        return Outcome(
            Status.FAILED,
            f"version {spec.version} of list {spec.name} is not in Redis; import the list again",
        )

    def reconcile(self, now_ms: int, remove_extras: bool = True) -> list[str]:
        """Make the kernel's lists exactly the ledger's lists for this host; returns problems.

        A list held at the ledger's version, action and expiry is left alone; every other
        one is loaded whole; lists the kernel holds that the ledger does not give this host
        are removed, unless ``remove_extras`` is False (a ledger this host does not trust:
        Redis may have lost its data, see :mod:`pushfw.worker.generation`).
        """
        problems = []
        wanted: set[str] = set()
        in_kernel = self._kernel_names()
        present = in_kernel | set(self.held)
        for name, record in read_records(self.client, self.keys).items():
            request = ListRequest.from_record(record)
            decision = None if request is None else decide_list(request, self.policy, now_ms)
            if decision is None or isinstance(decision, Report):
                if name in present:
                    wanted.add(name)  # held: a record this host refuses changes nothing here
                continue
            if isinstance(decision, Load):
                wanted.add(name)
                held = self.held.get(name)
                if (
                    held is not None
                    and (held.spec, held.id) == (decision.list, record.id)
                    and name in in_kernel  # not gone in a hand flush
                ):
                    continue
                self.held.pop(name, None)  # the kernel may hold anything: load it whole
                outcome = self._load(decision, record.id)
                if outcome.status not in (Status.APPLIED, Status.UNCHANGED):
                    problems.append(f"list {name}: {outcome.detail}")  # what it held stays
        if remove_extras:
            for name in present - wanted:
                self._unload(Unload(name), self._removed.get(name, "0-0"))
        return problems

    def expire_due(self, now_ms: int) -> int:
        """Remove the lists whose expiry has passed; returns how many."""
        due = [
            h
            for h in self.held.values()
            if h.spec.expires_ms is not None and h.spec.expires_ms <= now_ms
        ]
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
