"""A named list's entries as kernel tools take them: checked, canonical, by family and length.

Shared by the set backends (:mod:`.nftables`, :mod:`.ipset`), which must never hand a kernel
tool anything but an address libc parsed.
"""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

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


class Addresses(Sequence[str]):
    """One family's addresses, packed (4 or 16 bytes each) and read as canonical strings.

    A million IPv4 addresses are 4 MB here; as strings they were about 70 MB, held from the
    check until the kernel had them all. Backends read them in chunks as they write them.
    """

    __slots__ = ("_family", "_packed", "_width")

    def __init__(self, version: int) -> None:
        self._family = _FAMILIES[version][0]
        self._width = 4 if version == 4 else 16
        self._packed = bytearray()

    def _add(self, packed: bytes) -> None:
        self._packed += packed

    def packed(self) -> bytes:
        """Every address, 4 or 16 bytes each, in the order they were added."""
        return bytes(self._packed)

    def __len__(self) -> int:
        return len(self._packed) // self._width

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self._at(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._at(index)

    def _at(self, index: int) -> str:
        start = index * self._width
        return socket.inet_ntop(self._family, self._packed[start : start + self._width])

    def __iter__(self) -> Iterator[str]:
        family, width, packed = self._family, self._width, self._packed
        for start in range(0, len(packed), width):
            yield socket.inet_ntop(family, packed[start : start + width])


def list_entries(networks: Iterable[str]) -> dict[tuple[int, int], Addresses]:
    """A list's entries by (IP version, prefix length), as canonical addresses.

    Checked before any I/O, with ``inet_pton`` (a million entries in about a second, where
    ``ipaddress`` takes several): only what libc parses as an address reaches a kernel tool,
    never a name that nft would look up in the DNS nor a word that would end an ipset line.

    Raises:
        PermanentBackendError: an entry is not a network, has host bits set, or is ``/0``
            (which a hash:net set cannot hold, and which would match every address).
    """
    grouped: dict[tuple[int, int], Addresses] = {}
    with gc_paused():
        for entry in networks:
            version, prefixlen, packed = _list_entry(entry)
            found = grouped.get((version, prefixlen))
            if found is None:
                found = grouped[(version, prefixlen)] = Addresses(version)
            found._add(packed)
    return grouped


def _list_entry(entry: str) -> tuple[int, int, bytes]:
    """(version, prefix length, packed address) of one list entry."""
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
            return version, prefixlen, packed
        break
    raise PermanentBackendError(f"list entry {entry[:60]!r} is not a network (or is /0)")
