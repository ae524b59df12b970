"""journald's severity for the lines a pushfw process writes to stderr.

Under systemd, when stderr is the journal's stream (``JOURNAL_STREAM`` names it, see
systemd.exec(5)), a line that starts with its syslog priority, ``<4>`` for a warning
(sd-daemon(3)), is stored with that severity, so ``journalctl -p warning`` finds it.
Anywhere else a line has no prefix. The worker's log (``pushfw.worker.log``) and the
CrowdSec bridge (``pushfw crowdsec``) both write through these.
"""

from __future__ import annotations

import logging
import os
from typing import TextIO

__all__ = ["PriorityFormatter", "journal_stream", "syslog_priority", "with_priority"]

_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    for floor, priority in _PRIORITIES:
        if levelno >= floor:
            return priority
    return 7


def journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald stream systemd connected (``JOURNAL_STREAM`` holds
    its ``device:inode``): a variable inherited by a process whose stderr went elsewhere
    (a redirect, a pipe to another program) does not count."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError):  # closed, or no descriptor (io.UnsupportedOperation)
        return False
    return (found.st_dev, found.st_ino) == (int(device), int(inode))


def with_priority(text: str, levelno: int) -> str:
    """Each line of ``text`` with the priority of ``levelno`` (a traceback's lines too:
    journald reads the prefix line by line)."""
    prefix = f"<{syslog_priority(levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


class PriorityFormatter(logging.Formatter):
    """A plain ``fmt`` formatter whose lines carry their priority when ``journal`` is set."""

    def __init__(self, fmt: str, journal: bool) -> None:
        super().__init__(fmt)
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return with_priority(text, record.levelno) if self._journal else text
