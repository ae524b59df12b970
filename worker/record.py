"""What one command writes to the ledger: its record, built once for the fold and for tests.

The rule record's JSON is :class:`~pushfw.producer.records.RuleRecord`'s, written from a
dict: a model per command cost the fold as much as the rest of it. A signed command's
record keeps its signed fields and signature, so every host can check it against its own
policy; ``checked`` says the folding worker verified it (:mod:`pushfw.worker.held`).
"""

from __future__ import annotations

from typing import NamedTuple

from pydantic_core import to_json

from pushfw.producer.contract import LIST_SIGNED_FIELDS, SIGNED_FIELDS
from pushfw.producer.lists import ListCommand
from pushfw.producer.records import ListRecord, RuleRecord, rule_id
from pushfw.producer.wire import ParsedCommand
from pushfw.worker.expiry import expired, expires_at
from pushfw.worker.stream import Entry

_SIGNED = frozenset(name.encode() for name in (*SIGNED_FIELDS, "sig"))
_LIST_SIGNED = frozenset(name.encode() for name in (*LIST_SIGNED_FIELDS, "sig"))


def signed_fields(entry: Entry, names: frozenset[bytes]) -> dict[str, str]:
    """A signed entry's signed fields and ``sig``, kept so every host can verify the record."""
    fields = entry.fields or {}
    if not any(k.lower() == b"sig" for k in fields):
        return {}
    return {
        k.lower().decode("utf-8", "replace"): v.decode("utf-8", "replace")
        for k, v in fields.items()
        if k.lower() in names
    }


class Folded(NamedTuple):
    """What one command writes to the ledger: its rule, entry id, record JSON and expiry."""

    rule_id: str
    id: str
    json: bytes
    expires_ms: int | None
    checked: bool = False


def folded(
    entry: Entry, cmd: ParsedCommand, seen_ms: int, now_ms: int, checked: bool = False
) -> Folded:
    """The ledger state a command sets; an insert already past its expiry is a tombstone.

    ``checked``: the folding worker verified the command's signature with its key.
    """
    expires_ms = expires_at(seen_ms, cmd.ttl_s)
    deleted = expired(expires_ms, now_ms) or not cmd.is_insert
    action = cmd.action.value
    network = str(cmd.network)
    record: dict[str, object] = {"id": entry.id, "action": action, "network": network}
    if not deleted and expires_ms is not None:
        record["expires_ms"] = expires_ms
    _describe(record, cmd)
    if deleted:
        record["deleted"] = True
    if seen_ms != entry.ms:
        record["seen_ms"] = seen_ms
    checked = _sign(record, entry, checked)
    return Folded(
        rule_id(action, network),
        entry.id,
        to_json(record),
        None if deleted else expires_ms,
        checked,
    )


def _describe(record: dict[str, object], cmd: ParsedCommand) -> None:
    """The command's optional words: its target, reason and origin, where given."""
    if cmd.target:
        record["target"] = list(cmd.target)
    if cmd.reason:
        record["reason"] = cmd.reason
    if cmd.origin:
        record["origin"] = cmd.origin


def _sign(record: dict[str, object], entry: Entry, checked: bool) -> bool:
    """Keep a signed entry's signed fields in its record; whether the record is checked."""
    signed = signed_fields(entry, _SIGNED)
    if not signed:
        return False
    record["signed"] = signed
    if checked:
        record["checked"] = True
    return checked


def record_for(entry: Entry, cmd: ParsedCommand, seen_ms: int, now_ms: int) -> RuleRecord:
    """The ledger record a command sets, as a model (what the fold writes, read back)."""
    return RuleRecord.model_validate_json(folded(entry, cmd, seen_ms, now_ms).json)


def list_record_for(
    entry: Entry, cmd: ListCommand, seen_ms: int, checked: bool = False
) -> ListRecord:
    """The ledger state a list command sets (``checked``: as for :func:`folded`)."""
    signed = signed_fields(entry, _LIST_SIGNED)
    return ListRecord(
        id=entry.id,
        name=cmd.name,
        version=cmd.version,
        action=cmd.action.value,
        size=cmd.size,
        expires_ms=expires_at(seen_ms, cmd.ttl_s),
        target=list(cmd.target),
        reason=cmd.reason,
        deleted=not cmd.is_insert,
        seen_ms=seen_ms if seen_ms != entry.ms else None,
        signed=signed,
        checked=checked and bool(signed),
    )
