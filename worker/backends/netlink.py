"""A small nf_tables netlink reader: the kernel's own replies, where libnftables is too slow.

``nft list`` builds every element of a set as JSON (minutes for a million); these dumps read
set names, a set's first reply or the rules' set lookups straight from the kernel, so the
nftables backend's heartbeat check costs the same whatever the sets hold.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

_NETLINK_NETFILTER = 12
_NFT_GETRULE, _NFT_GETSET, _NFT_GETSETELEM = 7, 10, 13  # enum nf_tables_msg_types
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_DUMP_INTR = 0x10  # the ruleset changed during the dump: its replies may disagree
_DUMP_REQUEST = 0x301  # NLM_F_REQUEST | NLM_F_DUMP
_NFPROTO_INET = 1
_NETLINK_TIMEOUT_S = 2.0


def _nla(kind: int, text: str) -> bytes:
    """One netlink string attribute, padded to 4 bytes."""
    payload = text.encode() + b"\0"
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _nlas(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The netlink attributes in ``data``: (type without its flag bits, payload)."""
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _text(payload: bytes) -> str:
    return payload.rstrip(b"\0").decode(errors="replace")


def _lookups(expressions: bytes) -> Iterator[str]:
    """The sets a rule's expressions (NFTA_RULE_EXPRESSIONS) look up, by name."""
    for _, element in _nlas(expressions):
        expression = dict(_nlas(element))  # NFTA_EXPR_NAME 1, NFTA_EXPR_DATA 2
        if _text(expression.get(1, b"")) == "lookup":
            yield _text(dict(_nlas(expression.get(2, b""))).get(1, b""))  # NFTA_LOOKUP_SET


def _dump(message: int, attributes: bytes, first_only: bool = False) -> list[bytes]:
    """The replies of one nf_tables netlink dump (``inet`` family), as attribute bytes.

    With ``first_only`` the dump stops after one reply: the kernel fills its replies as they
    are read, so a set of a million elements costs no more than an empty one.

    Raises:
        OSError: the kernel's refusal (``ENOENT``: no such table or set), an interrupted
            dump (``EINTR``), or no answer in time.
    """
    kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    with socket.socket(socket.AF_NETLINK, kind, _NETLINK_NETFILTER) as sock:
        sock.settimeout(_NETLINK_TIMEOUT_S)
        body = struct.pack("=BBH", _NFPROTO_INET, 0, 0) + attributes  # struct nfgenmsg
        header = struct.pack("=IHHII", 16 + len(body), 10 << 8 | message, _DUMP_REQUEST, 1, 0)
        sock.send(header + body)
        replies: list[bytes] = []
        while True:
            data, offset = sock.recv(1 << 16), 0
            while offset + 16 <= len(data):  # struct nlmsghdr, then the payload
                length, reply, flags = struct.unpack_from("=IHH", data, offset)
                payload = data[offset + 16 : offset + length]
                offset += (length + 3) & ~3
                if reply == _NLMSG_ERROR and (code := struct.unpack_from("=i", payload)[0]):
                    raise OSError(-code, os.strerror(-code))
                if flags & _NLM_F_DUMP_INTR:
                    raise OSError(errno.EINTR, "the ruleset changed during the dump")
                if reply in (_NLMSG_ERROR, _NLMSG_DONE):
                    return replies
                replies.append(payload[4:])  # after struct nfgenmsg
                if first_only:
                    return replies


def set_names(table: str) -> set[str]:
    """The names of the sets of ``inet table``, from one netlink dump that fetches no element.

    Raises:
        OSError: as :func:`_dump` (``ENOENT``: no such table).
    """
    return {_text(dict(_nlas(r)).get(2, b"")) for r in _dump(_NFT_GETSET, _nla(1, table))}


def set_element_count(table: str, set_name: str) -> int:
    """How many elements the kernel's set ``inet table set_name`` holds, read over netlink.

    ``nft list`` takes minutes for a million elements; this dump reads the kernel's own
    replies and counts them (tools and benchmarks check the kernel with it).

    Raises:
        OSError: as :func:`_dump`.
    """
    replies = _dump(_NFT_GETSETELEM, _nla(1, table) + _nla(2, set_name))
    return sum(
        sum(1 for _ in _nlas(value))
        for reply in replies
        for kind, value in _nlas(reply)
        if kind == 3
    )


def set_is_empty(table: str, set_name: str) -> bool:
    """Does the kernel's set ``inet table set_name`` hold no element? Reads one reply.

    Raises:
        OSError: as :func:`_dump`.
    """
    replies = _dump(_NFT_GETSETELEM, _nla(1, table) + _nla(2, set_name), first_only=True)
    return not any(kind == 3 and value for r in replies for kind, value in _nlas(r))


def rule_lookups(table: str) -> dict[str, list[str]]:
    """Per chain of ``inet table``, the sets its rules look up, from one rule dump.

    Raises:
        OSError: as :func:`_dump`; struct.error or ValueError for a reply not understood.
    """
    lookups: dict[str, list[str]] = {}
    for reply in _dump(_NFT_GETRULE, _nla(1, table)):
        rule = dict(_nlas(reply))  # NFTA_RULE_CHAIN 2, NFTA_RULE_EXPRESSIONS 4
        lookups.setdefault(_text(rule.get(2, b"")), []).extend(_lookups(rule.get(4, b"")))
    return lookups
