"""Errors the worker tells apart, by type, and which layer retries which of them.

Exception tree::

    PushfwError
    ├── ConfigError            bad settings: the worker refuses to start
    │   └── HostNameTaken      another live worker has this host name
    └── BackendError           the kernel refused a change
        ├── TransientBackendError   retry the same batch soon (table busy, xtables lock)
        └── PermanentBackendError   this change will not succeed by retrying (set full, ...)

The type decides who retries: a :class:`TransientBackendError` is tried again at once
(:func:`retry_busy`), any other :class:`BackendError` is redelivered with backoff and ends in
the dead-letter stream after ``max_deliveries``, a :class:`PermanentBackendError` goes there
at once. Every retry layer in pushfw, and which error each handles, is in one table:
docs/internals.md, "Retries".
"""

from __future__ import annotations

from collections.abc import Callable

from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

__all__ = [
    "QUICK_RETRIES",
    "BackendError",
    "ConfigError",
    "HostNameTaken",
    "PermanentBackendError",
    "PushfwError",
    "TransientBackendError",
    "retry_busy",
]

QUICK_RETRIES = 3
"""Tries of one commit while the kernel is busy, before its entries wait for redelivery."""


class PushfwError(Exception):
    """Base of every error pushfw raises on purpose."""


class ConfigError(PushfwError):
    """The worker's settings are invalid."""


class HostNameTaken(ConfigError):
    """Another worker with this host name is live (a cloned VM keeps its name)."""


class BackendError(PushfwError):
    """The firewall backend could not apply a change."""


class TransientBackendError(BackendError):
    """The kernel was busy; the same batch is likely to succeed when retried."""


class PermanentBackendError(BackendError):
    """Retrying will not help."""


def retry_busy(attempt: Callable[[], None]) -> None:
    """Call ``attempt`` until it does not raise :class:`TransientBackendError`, at most
    :data:`QUICK_RETRIES` times, 25-50 ms then 50-100 ms apart (jittered; at most 500 ms).

    ``attempt`` must stage its changes anew: a failed commit discards what was staged.

    Raises:
        TransientBackendError: still busy after the last try.
        BackendError: any other refusal, at once.
    """
    # redis-py counts failures from 1 where Backoff counts attempts from 0: base 25 ms
    # gives the same first wait (25-50 ms, half of it jitter) as Backoff(0.05, 0.5).
    quick = Retry(
        EqualJitterBackoff(cap=0.5, base=0.025), QUICK_RETRIES - 1, (TransientBackendError,)
    )
    quick.call_with_retry(attempt, lambda _busy: None)
