"""The ipset command as the ipset backend drives it: runs, streamed restores, ``save`` parsed.

No shell is ever involved: arguments are a list, and restore input is lines pushfw made
from parsed networks. Element timeouts are computed here, once, for every writer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, NamedTuple, NoReturn

from pushfw.producer.contract import Network
from pushfw.worker.errors import BackendError, PermanentBackendError
from pushfw.worker.expiry import kernel_timeout_s as timeout_s

logger = logging.getLogger(__name__)

MAX_TIMEOUT_S = 2_147_483
"""The largest element timeout ipset accepts (about 24.8 days)."""
_RUN_TIMEOUT_S = 300.0
SET_NAME_MAX = 31  # IPSET_MAXNAMELEN - 1
_SAVED = re.compile(  # one line of ``ipset save``, in the order ipset prints the options
    r"^add (?P<set>\S+) (?P<addr>[^\s/]+)(?:/(?P<prefix>\d{1,3}))?"
    r"(?: timeout (?P<timeout>\d+))?(?: packets (?P<packets>\d+) bytes (?P<bytes>\d+))?"
    r'(?: comment "(?:exp=(?P<exp>\d{1,19})|[^"]*)")?(?P<rest>.*)$',
    re.MULTILINE,
)
FAMILIES: dict[int, tuple[socket.AddressFamily, type[Network], int]] = {
    4: (socket.AF_INET, ipaddress.IPv4Network, 32),
    6: (socket.AF_INET6, ipaddress.IPv6Network, 128),
}


_CHUNK = 1 << 16
"""Bytes of restore input written at a time."""


def _feed(stdin: IO[bytes], lines: Iterable[str], failed: list[BaseException]) -> None:
    """Write ``lines`` to a restore in chunks, then close its input; a restore that stopped
    at a refused line closes the pipe, and its exit status and message tell why. Anything
    else that goes wrong is put in ``failed`` for the caller (this runs in a thread)."""
    chunk: list[str] = []
    size = 0
    try:
        for line in lines:
            chunk.append(line)
            size += len(line)
            if size >= _CHUNK:
                stdin.write("".join(chunk).encode())
                chunk, size = [], 0
        stdin.write("".join(chunk).encode())
    except BrokenPipeError:
        pass
    except BaseException as exc:  # handed to the caller, which raises it
        failed.append(exc)
    finally:
        with contextlib.suppress(BrokenPipeError, OSError):
            stdin.close()


def _cidrs(by_prefix: Mapping[int, Sequence[str]]) -> Iterator[str]:
    """``address/prefix`` strings, made as they are read (a million is 70 MB held at once)."""
    for prefixlen, addresses in by_prefix.items():
        for address in addresses:
            yield f"{address}/{prefixlen}"


def _adds(name: str, entries: Iterable[str], timeout_s: int) -> Iterator[str]:
    """The restore lines adding ``entries`` to set ``name``, made as they are read."""
    for entry in entries:
        yield f"add {name} {entry} timeout {timeout_s}\n"


class Element(NamedTuple):
    """One element as ``ipset save`` prints it."""

    network: Network
    timeout_s: int
    expires_ms: int | None
    counters: tuple[int, int] | None = None
    """(packets, bytes) in a set created with ``counters``."""


def kernel_timeout_s(expires_ms: int, now_ms: int) -> int:
    """The element timeout for an expiry (:func:`.expiry.kernel_timeout_s`).

    Past ipset's limit the element is permanent in the kernel (0) and only the worker's own
    delete ends it: a ban must never end early.
    """
    remaining_s = timeout_s(expires_ms, now_ms)
    return remaining_s if remaining_s <= MAX_TIMEOUT_S else 0


def parse_save(text: str, set_name: str, version: int) -> Iterator[Element]:
    """The elements of ``set_name`` in ``ipset save`` output (which prints /32 and /128 bare).

    Fast enough for a million elements: the addresses go through ``inet_pton``, not the much
    slower ``ipaddress`` string parser.
    """
    family, network_type, max_prefixlen = FAMILIES[version]
    for found in _SAVED.finditer(text):
        if found["set"] != set_name:
            continue
        if found["rest"].strip():  # nomatch, counters...: not an element pushfw writes
            logger.warning("set %s holds %s, not written by pushfw", set_name, found[0][:80])
            continue
        try:
            address = int.from_bytes(socket.inet_pton(family, found["addr"]))
            prefixlen = int(found["prefix"] or max_prefixlen)
            network = network_type((address, prefixlen), strict=False)
        except (OSError, ValueError):
            logger.warning("set %s holds %s, not a network", set_name, found[0][:80])
            continue
        exp, packets = found["exp"], found["packets"]
        counters = (int(packets), int(found["bytes"])) if packets is not None else None
        yield Element(network, int(found["timeout"] or 0), int(exp) if exp else None, counters)


def add_line(set_name: str, element: Element, now_ms: int) -> str:
    """An element copied to another set; ``save`` rounds timeouts down, so recompute them."""
    timeout_s = element.timeout_s
    if element.expires_ms is not None and timeout_s:
        timeout_s = kernel_timeout_s(element.expires_ms, now_ms)
    line = f"add {set_name} {element.network} timeout {int(timeout_s)}"
    if element.counters is not None:
        line += f" packets {int(element.counters[0])} bytes {int(element.counters[1])}"
    if element.expires_ms is not None:
        line += f' comment "exp={int(element.expires_ms)}"'
    return line + "\n"


def restore(exe: str, lines: Iterable[str]) -> None:
    """``ipset -exist restore``, fed ``lines`` as they come (no shell).

    -exist: an add of a present element renews its timeout and comment, a del of an
    absent one is a no-op, so a replayed batch has the effect of one. The input is
    streamed in chunks: a million-entry list was a 50 MB string, plus its lines, in the
    worker's memory at once.
    """
    deadline = time.monotonic() + _RUN_TIMEOUT_S
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(
                [exe, "-exist", "restore"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        except OSError as exc:
            raise BackendError(f"ipset restore: {exc}") from exc
        assert proc.stdin is not None
        failed: list[BaseException] = []
        feeder = threading.Thread(
            target=_feed, args=(proc.stdin, lines, failed), name="pushfw-ipset-restore"
        )
        try:
            feeder.start()  # a thread: a restore that stops reading cannot outlast the bound
            feeder.join(timeout=max(0.1, deadline - time.monotonic()))
            if feeder.is_alive() or failed:
                raise failed[0] if failed else subprocess.TimeoutExpired(proc.args, 0)
            returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BackendError(f"ipset restore: no end within {_RUN_TIMEOUT_S:.0f} s") from None
        finally:
            if proc.poll() is None:  # only a failure leaves it running: end it, and the feed
                proc.kill()
            proc.wait()
            feeder.join()
        errors.seek(0)
        stderr = errors.read().decode("utf-8", "replace")
    if returncode != 0:
        _refused("restore", stderr, returncode)


def run(exe: str, *args: str, stdin: str | None = None) -> str:
    """Run ``ipset`` with these arguments (no shell); its refusal becomes a BackendError."""
    command = next(a for a in args if not a.startswith("-"))
    try:
        proc = subprocess.run(
            [exe, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_RUN_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"ipset {command}: {exc}") from exc
    if proc.returncode == 0:
        return proc.stdout
    _refused(command, proc.stderr, proc.returncode)


def _refused(command: str, stderr: str, returncode: int) -> NoReturn:
    message = " ".join(stderr.split())[:300] or f"exit status {returncode}"
    # ipset reports errors only as text, so a full set can only be told by its words
    # ("Hash is full, cannot add more elements"); the lines we send carry no free text
    # that could fake them. Adding to a full set never succeeds by retrying.
    if command == "restore" and "is full" in message:
        raise PermanentBackendError(f"ipset {command}: {message}")
    raise BackendError(f"ipset {command}: {message}")
