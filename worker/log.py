"""Log records as JSON lines for machines (journald, collectors) or as text for people.

``auto`` picks JSON when stderr is not a terminal. A JSON line holds ``time``, ``level``,
``logger``, ``message``, every ``extra=`` field of the call and, for an exception, ``exc``.
Both formats scrub the secrets they are given (the Redis password, secret settings) from
the finished line, so no code path can leak one by logging a URL or an error text.

Under systemd, when stderr is the journal's stream, each line starts with its syslog
priority, ``<4>`` for a warning, so ``journalctl -p warning`` finds the worker's warnings
(``pushfw.producer.journal``, which the CrowdSec bridge uses too). Anywhere else a line
has no prefix.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

from pushfw.producer.journal import journal_stream, syslog_priority, with_priority

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "error_line",
    "journal_stream",
    "setup",
    "syslog_priority",
]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_MASK = "***"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def error_line(text: str) -> str:
    """``text`` for stderr as an error: with journald's ``<3>`` when stderr is the journal
    (the one-line failures a process prints before or instead of logging)."""
    return f"<{syslog_priority(logging.ERROR)}>{text}" if journal_stream(sys.stderr) else text


class _Scrubbing(logging.Formatter):
    def __init__(
        self, secrets: Iterable[str] = (), fmt: str | None = None, journal: bool = False
    ) -> None:
        super().__init__(fmt)
        found = [s for s in secrets if s]
        # A secret inside a JSON string may appear escaped; scrub that spelling too.
        found += [json.dumps(s, ensure_ascii=False)[1:-1] for s in found]
        self._secrets = sorted(set(found), key=len, reverse=True)
        self._journal = journal

    def scrub(self, line: str) -> str:
        for secret in self._secrets:
            line = line.replace(secret, _MASK)
        return line

    def finish(self, text: str, record: logging.LogRecord) -> str:
        """``text`` scrubbed and, for journald, each of its lines with the record's priority
        (a text traceback's lines too: journald reads the prefix line by line)."""
        text = self.scrub(text)
        return with_priority(text, record.levelno) if self._journal else text


class JsonFormatter(_Scrubbing):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return self.finish(json.dumps(doc, default=str, ensure_ascii=False), record)


class TextFormatter(_Scrubbing):
    """``time LEVEL logger: message key=value ...`` for a terminal."""

    def __init__(self, secrets: Iterable[str] = (), journal: bool = False) -> None:
        super().__init__(secrets, "%(asctime)s %(levelname)s %(name)s: %(message)s", journal)

    def formatMessage(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        line = super().formatMessage(record)
        return line + "".join(f" {k}={v}" for k, v in extras.items())

    def format(self, record: logging.LogRecord) -> str:
        return self.finish(super().format(record), record)


def setup(
    log_format: Literal["auto", "json", "text"] = "auto",
    verbose: bool = False,
    secrets: Iterable[str] = (),
) -> None:
    """Send every record to stderr in ``log_format`` (``auto``: JSON unless a terminal),
    with its syslog priority first when stderr is the journal's stream.

    ``verbose`` turns on DEBUG for pushfw's own loggers only; libraries stay at INFO.
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    journal = journal_stream(sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(secrets, journal=journal) if use_json else TextFormatter(secrets, journal)
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("pushfw").setLevel(logging.DEBUG if verbose else logging.INFO)
