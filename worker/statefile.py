"""The worker's own files in ``state_dir``: written whole, read without trusting them.

A state file may be cut short by a full disk, edited by hand, left by another version, or
not be pushfw's at all. None of that may stop a worker at every start: a file that cannot
be read, or whose content its reader refuses, counts as missing. The worker says so once,
with the reason, and starts as a host without that file does (from the ledger). A write
goes to a temporary file that then replaces the old one, so a crash never leaves half a file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

__all__ = ["MAX_STATE_BYTES", "read_state", "write_state"]

logger = logging.getLogger(__name__)

MAX_STATE_BYTES = 16 << 20
"""A state file larger than this is not one of pushfw's (the largest, a follower position
with its unfinished entries, holds a few kB)."""

T = TypeVar("T")


def read_state(path: Path, parse: Callable[[bytes], T], what: str) -> T | None:
    """The content of ``path`` as ``parse`` reads it; None if there is no such file, and
    None with one warning if it cannot be read or ``parse`` refuses it.

    Args:
        path: the state file.
        parse: the content's reader; raises ``ValueError`` (a pydantic ``ValidationError``,
            a ``UnicodeDecodeError``, a ``json.JSONDecodeError`` are ones) for content it
            does not accept.
        what: the file's name for people, in the warning (``follower position``).
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("ignoring the %s in %s: %s", what, path, exc.strerror or exc)
        return None
    try:
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        return parse(raw)
    except ValueError as exc:
        logger.warning("ignoring the %s in %s: %s", what, path, _why(exc))
        return None


def write_state(path: Path, content: bytes, mode: int = 0o777) -> None:
    """Replace ``path`` with ``content`` whole (its directory made with ``mode`` if missing).

    Not fsynced: these files matter only while the kernel's rules do, and a reboot empties
    both. Raises OSError; callers keep the state in memory then and warn once.
    """
    path.parent.mkdir(mode=mode, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(content)
    os.replace(partial, path)


def _why(exc: ValueError) -> str:
    """One line: pydantic's errors as ``field: message``, others their first line."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'content'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:3]
        )
    text = str(exc).splitlines()
    return text[0][:200] if text else type(exc).__name__
