"""The environment of a pushfw process under test: none of the outer world's settings.

A ``PUSHFW_*`` variable of the machine running the tests (or the test session's own state
directory) must not reach a worker or a CLI that a test or a benchmark starts, nor may
systemd's notify and journal sockets of an outer service.
"""

from __future__ import annotations

import os

__all__ = ["clean_env"]

_OUTER = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"})


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without ``PUSHFW_*`` and systemd's variables, with
    ``settings`` as ``PUSHFW_<NAME>`` (``redis_url="..."`` is ``PUSHFW_REDIS_URL``) and
    Python's output unbuffered, so a log read while the process runs is complete."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHFW_") and k not in _OUTER}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"PUSHFW_{name.upper()}": value for name, value in settings.items()})
    return env
