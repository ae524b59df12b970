"""Checking command signatures (HMAC-SHA256 over the fields, see ``contract.signing_payload``).

With a key and ``require_signature``, only signed commands are taken; with a key alone, a
signed command is still checked in full and a bad one rejected. A signed command carries
``ts`` (the producer's clock, unix ms) inside what is signed, and must have been added to
the stream within ``window_s`` of it, so a captured command cannot be replayed much later.

The scheduler's own ``*.delete`` entries (``origin ttl``) are written from Lua, which has
no HMAC, so they are unsigned. Such an entry is taken only when the ledger shows, for its
rule, the tombstone with that very entry id: the scheduler's claim script writes both in
one atomic step, and a producer cannot write the ledger (its ACL user has no HSET), so an
entry a producer forged never has one. The ledger skips them outright (the claim already
folded them), and an applier asks the ledger (:func:`confirm_expiry`).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from typing import NamedTuple

from pushfw.producer.contract import Command, CommandRejected, Status, signature
from pushfw.producer.records import RuleRecord
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.stream import stream_id_order

_TS = re.compile(rb"[0-9]{1,15}")

FORGED_EXPIRY = "sig: missing (an unsigned expiry the ledger does not confirm)"


class Verdict(NamedTuple):
    """What to report instead of applying an unsigned expiry that is not the scheduler's."""

    status: Status
    detail: str


def _envelope(fields: Mapping[bytes, bytes], name: bytes) -> bytes | None:
    """The value of ``name`` in any case (the signed fields are checked for duplicates)."""
    found = [value for key, value in fields.items() if key.lower() == name]
    if len(found) > 1:
        raise CommandRejected(f"{name.decode()}: appears more than once")
    return found[0] if found else None


def is_expiry(cmd: Command) -> bool:
    """A ``*.delete`` with ``origin ttl``: what the scheduler emits."""
    return cmd.origin == "ttl" and not cmd.is_insert


class Signing:
    """The signature policy of one worker.

    Args:
        key: the shared key (None: signatures are neither checked nor needed).
        required: reject commands without a signature.
        window_s: how far a signed ``ts`` may be from the entry id's time, either way.
    """

    def __init__(self, key: bytes | None = None, required: bool = False, window_s: int = 300):
        if required and not key:
            raise ValueError("require_signature needs a key")
        self.key = key
        self.required = required
        self.window_s = window_s

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Signing:
        secret = settings.hmac_key.get_secret_value() if settings.hmac_key else ""
        return cls(
            secret.encode("utf-8") or None, settings.require_signature, settings.signature_window
        )

    def check(self, fields: Mapping[bytes, bytes], entry_ms: int, cmd: Command) -> bool:
        """Check one entry's signature; True: an unsigned expiry the ledger must confirm.

        Raises:
            CommandRejected: unsigned while signatures are required, or signed badly
                (wrong signature, missing or malformed ``ts``, ``ts`` outside the window).
        """
        if self.key is None:
            return False
        sig = _envelope(fields, b"sig")
        if sig is None:
            if self.required and is_expiry(cmd):
                return True
            if self.required:
                raise CommandRejected("sig: missing")
            return False
        ts = _envelope(fields, b"ts")
        if ts is None:
            raise CommandRejected("ts: missing (a signed command carries its time)")
        if not _TS.fullmatch(ts):
            raise CommandRejected("ts: is not a whole number of milliseconds")
        expected = signature(fields, self.key).encode()
        if not hmac.compare_digest(expected, sig.lower()):
            raise CommandRejected("sig: does not match")
        age_ms = entry_ms - int(ts)
        if abs(age_ms) > self.window_s * 1000:
            when = "before" if age_ms > 0 else "after"
            raise CommandRejected(
                f"ts: outside the {self.window_s} s window "
                f"(signed {abs(age_ms) // 1000} s {when} it was added)"
            )
        return False


def confirm_expiry(entry_id: str, record: RuleRecord | None) -> Verdict | None:
    """Whether an unsigned expiry is the scheduler's; None: it is, apply it.

    A record newer than the entry means a newer command decides the rule anyway: the entry
    is reported ``unchanged`` and changes nothing, whoever wrote it.
    """
    if record is not None and record.id == entry_id:
        if record.deleted and record.origin == "ttl":
            return None
        return Verdict(Status.REJECTED, FORGED_EXPIRY)
    if record is not None and stream_id_order(record.id) > stream_id_order(entry_id):
        return Verdict(Status.UNCHANGED, f"superseded by newer command {record.id}")
    return Verdict(Status.REJECTED, FORGED_EXPIRY)
