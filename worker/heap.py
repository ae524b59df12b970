"""Handing the heap back after large transient work (glibc ``malloc_trim``).

A million-element kernel transaction, a listing of every element's counter or a reconcile
of a large ledger builds objects it frees again, but glibc keeps the freed pages unless
asked (what that cost: docs/benchmarks.md, "Measurements behind the code").
"""

from __future__ import annotations

import ctypes
from contextlib import suppress

__all__ = ["LARGE", "give_back_memory"]

LARGE = 10_000
"""Work on at least this many rules or entries is followed by :func:`give_back_memory`."""


def give_back_memory() -> None:
    """Return the free pages at the top and inside the heap to the system; a no-op without
    glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
