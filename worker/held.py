"""The held verified state: the newest state a host with ``require_signature`` may take.

A command a worker holding the key verified is folded with ``checked``
(:func:`verifies`). When a command nobody verified (unsigned, forged, or folded by a worker
without the key) replaces a checked record, the fold moves the checked one to
``{pushfw}:held`` (lists: ``{pushfw}:held-lists``), in the same step; a newer checked command
clears it (:data:`pushfw.worker.ledger_lua.FOLD`, :data:`~pushfw.worker.ledger_lua.LIST_FOLD`).
So the ledger always holds the newest state a host with ``require_signature`` may take,
even after an unsigned ``undrop`` or ``list.delete``, and such a host reconciles to it
(:func:`pushfw.worker.decide.decide_record`). Hosts without ``require_signature`` never read
it: for them the newest command wins. Retention forgets held records once they expired.
"""

from __future__ import annotations

import redis

from pushfw.producer.connection import text
from pushfw.producer.contract import CommandRejected
from pushfw.producer.keys import Keys
from pushfw.producer.records import RuleRecord
from pushfw.worker.decide import is_signed
from pushfw.worker.signing import Signing
from pushfw.worker.stream import Entry


def verifies(signing: Signing | None, entry: Entry, seen_ms: int) -> bool:
    """Whether the folding worker holds the key and the entry's signature passes it."""
    if signing is None or signing.key is None or not is_signed(entry.fields):
        return False
    assert entry.fields is not None
    try:
        signing.check(entry.fields, seen_ms)
    except CommandRejected:
        return False
    return True


def held_records(client: redis.Redis, keys: Keys) -> dict[str, RuleRecord]:
    """The held records (the newest verified state of rules whose newest command nobody
    verified), by rule id, read in HSCAN pages."""
    return {
        text(k): RuleRecord.model_validate_json(v)
        for k, v in client.hscan_iter(keys.held, count=1000)
    }
