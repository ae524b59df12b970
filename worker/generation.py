"""Which ledger a host converged with, so an empty ledger is told from a lost one.

The ledger's generation marker (``{pushfw}:generation``) is written once, when the ledger
begins. Each host keeps the marker it last reconciled against in a file of its own
(``state_dir``), outside Redis. At reconcile:

- the same marker: the ledger is the truth, even empty: bans lifted (and forgotten by
  trimming) while the host was away are removed;
- another marker, or none: Redis lost its data and a new ledger began (or none yet).
  The host keeps every rule the new ledger does not speak of, says so, and adopts the new
  generation only on ``pushfw-worker reconcile --force``;
- a host with no file yet (new, or an upgrade) trusts the ledger unless the ledger is
  empty while the kernel holds rules: that looks like lost data, so the rules are kept;
- a host whose kernel holds no managed rule has nothing to keep: it adopts the ledger.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pushfw.worker.statefile import read_state, write_state

__all__ = ["GenerationFile", "trusts_ledger"]

logger = logging.getLogger(__name__)


_MAX_TOKEN = 64  # the ledger writes 16 hex digits


def _token(raw: bytes) -> str | None:
    """The marker a generation file holds (None: an empty file)."""
    text = raw.decode("ascii").strip()
    if len(text) > _MAX_TOKEN or not all(c.isprintable() and not c.isspace() for c in text):
        raise ValueError(f"not a ledger generation marker: {text[:_MAX_TOKEN]!r}")
    return text or None


class GenerationFile:
    """``<state_dir>/<host>.generation``; held in memory when the directory is not writable."""

    def __init__(self, state_dir: str, host: str) -> None:
        self.path = Path(state_dir) / f"{host}.generation"
        self._memory: str | None = None
        self._on_disk: str | None = None  # as last read or written: unchanged is not rewritten
        self._warned = False

    def read(self) -> str | None:
        self._on_disk = read_state(self.path, _token, "ledger generation")
        return self._on_disk or self._memory

    def write(self, token: str) -> None:
        self._memory = token
        if self._on_disk == token:
            return
        try:
            write_state(self.path, (token + "\n").encode("ascii"))
            self._on_disk = token
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "cannot keep the ledger generation in %s (%s): remembered until the worker stops",
                self.path,
                exc,
            )


def trusts_ledger(
    marker: str | None, known: str | None, ledger_size: int, kernel_size: int
) -> bool:
    """Whether reconcile may remove managed rules the ledger does not hold."""
    if kernel_size == 0:
        return True  # nothing to keep: a host rebooted after Redis lost its data just adopts
    if known is not None:
        return marker == known
    return marker is not None and ledger_size > 0
