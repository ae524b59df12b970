"""Checking command signatures (HMAC-SHA256 over the fields, see ``contract.signing_payload``).

With a key and ``require_signature``, only signed commands are taken; with a key alone, a
signed command is still checked in full and a bad one rejected. A signed command carries
``ts`` (the producer's clock, unix ms) inside what is signed, and must have been added to
the stream within ``window_s`` of it, so a captured command cannot be replayed much later.

The scheduler's own ``*.delete`` entries (``origin ttl``) are written from Lua, which has
no HMAC, so they are unsigned: :mod:`pushfw.worker.decide` takes them only where the ledger
holds their tombstone, before any signature policy applies.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from pushfw.producer.contract import CommandRejected, signature
from pushfw.worker.settings import WorkerSettings

_TS = re.compile(rb"[0-9]{1,15}")


def _envelope(fields: Mapping[bytes, bytes], name: bytes) -> bytes | None:
    """The value of ``name`` in any case (the signed fields are checked for duplicates)."""
    found = [value for key, value in fields.items() if key.lower() == name]
    if len(found) > 1:
        raise CommandRejected(f"{name.decode()}: appears more than once")
    return found[0] if found else None


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
            secret.encode("utf-8") or None, settings.require_signature, settings.signature_window_s
        )

    def check(self, fields: Mapping[bytes, bytes], seen_ms: int) -> None:
        """Check one command's signature; ``seen_ms``: Redis's time when it was first seen.

        Raises:
            CommandRejected: unsigned while signatures are required, or signed badly
                (wrong signature, missing or malformed ``ts``, ``ts`` outside the window).
        """
        if self.key is None:
            return
        sig = _envelope(fields, b"sig")
        if sig is None:
            if self.required:
                raise CommandRejected("sig: missing")
            return
        ts = _envelope(fields, b"ts")
        if ts is None:
            raise CommandRejected("ts: missing (a signed command carries its time)")
        if not _TS.fullmatch(ts):
            raise CommandRejected("ts: is not a whole number of milliseconds")
        expected = signature(fields, self.key).encode()
        if not hmac.compare_digest(expected, sig.lower()):
            raise CommandRejected("sig: does not match")
        age_ms = seen_ms - int(ts)
        if abs(age_ms) > self.window_s * 1000:
            when = "before" if age_ms > 0 else "after"
            raise CommandRejected(
                f"ts: outside the {self.window_s} s window "
                f"(signed {abs(age_ms) // 1000} s {when} it was added)"
            )
