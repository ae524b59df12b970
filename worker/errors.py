"""Errors the worker tells apart, by type.

Exception tree::

    PushfwError
    ├── ConfigError            bad settings: the worker refuses to start
    │   └── HostNameTaken      another live worker has this host name
    └── BackendError           the kernel refused a change
        ├── TransientBackendError   retry the same batch soon (table busy, xtables lock)
        └── PermanentBackendError   this change will not succeed by retrying (set full, ...)

A plain :class:`BackendError` is retried with backoff, counted per delivery, and ends in the
dead-letter stream after ``max_deliveries``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "HostNameTaken",
    "PermanentBackendError",
    "PushfwError",
    "TransientBackendError",
]


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
