"""Redis stream entry ids (``<ms>-<seq>``): their order, their time, the id just before.

Producers, the CLI and workers all compare ids (results after a command, a host past a
command, the newest command for a rule); the reading of an id is written here once.
https://redis.io/docs/latest/develop/data-types/streams/#entry-ids
"""

from __future__ import annotations

__all__ = ["before", "entry_ms", "entry_order", "is_entry_id"]

_U64 = 1 << 64


def entry_order(entry_id: str) -> tuple[int, int]:
    """The id as a tuple that sorts the way Redis orders ids (``<ms>`` alone is ``<ms>-0``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def entry_ms(entry_id: str) -> int:
    """When Redis stamped the entry: its id's milliseconds, on Redis's clock."""
    return int(entry_id.partition("-")[0])


def before(entry_id: str) -> str:
    """The greatest id below ``entry_id``, for a read that must include the entry itself."""
    ms, seq = entry_order(entry_id)
    return f"{ms}-{seq - 1}" if seq > 0 else f"{max(ms - 1, 0)}"


def is_entry_id(text: str) -> bool:
    """Whether ``text`` is a stream entry id as ``XREAD`` takes it: ``<ms>-<seq>`` or ``<ms>``."""
    ms, dash, seq = text.partition("-")
    seq = seq if dash else "0"
    if not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return False
    return len(ms) <= 20 and len(seq) <= 20 and int(ms) < _U64 and int(seq) < _U64
