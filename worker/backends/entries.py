"""A named list's entries as kernel tools take them: checked, canonical, by family and length.

Shared by the set backends (:mod:`.nftables`, :mod:`.ipset`), which must never hand a kernel
tool anything but an address libc parsed.
"""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Iterable, Iterator

from pushfw.worker.errors import PermanentBackendError

_FAMILIES = {4: (socket.AF_INET, 32), 6: (socket.AF_INET6, 128)}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC, which a million new (acyclic) objects set off over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def list_entries(networks: Iterable[str]) -> dict[tuple[int, int], list[str]]:
    """A list's entries by (IP version, prefix length), as canonical address strings.

    Checked before any I/O, with ``inet_pton`` (a million entries in about a second, where
    ``ipaddress`` takes several): only what libc parses as an address reaches a kernel tool,
    never a name that nft would look up in the DNS nor a word that would end an ipset line.

    Raises:
        PermanentBackendError: an entry is not a network, has host bits set, or is ``/0``
            (which a hash:net set cannot hold, and which would match every address).
    """
    grouped: dict[tuple[int, int], list[str]] = {}
    with gc_paused():
        for entry in networks:
            version, prefixlen, address = _list_entry(entry)
            grouped.setdefault((version, prefixlen), []).append(address)
    return grouped


def _list_entry(entry: str) -> tuple[int, int, str]:
    """(version, prefix length, canonical address) of one list entry."""
    address, slash, length = entry.partition("/")
    for version, (family, max_prefixlen) in _FAMILIES.items():
        try:
            packed = socket.inet_pton(family, address)
        except OSError:
            continue
        digits = length.isascii() and length.isdecimal()
        prefixlen = int(length) if digits else 0 if slash else max_prefixlen
        host_bits = (1 << max(0, max_prefixlen - prefixlen)) - 1
        if 0 < prefixlen <= max_prefixlen and not int.from_bytes(packed) & host_bits:
            return version, prefixlen, socket.inet_ntop(family, packed)
        break
    raise PermanentBackendError(f"list entry {entry[:60]!r} is not a network (or is /0)")
