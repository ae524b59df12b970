"""The worker's settings: ``PUSHFW_*`` environment variables over ``worker.toml`` over defaults.

The file is read by :func:`pushfw.worker.config.load`, which hands its values to
:meth:`WorkerSettings.with_file`; the environment still wins over them.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pushfw.producer.connection import parse_target
from pushfw.producer.contract import Network, parse_network
from pushfw.producer.keys import DEFAULT_PREFIX


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# The values of the config file being loaded, for the one source that reads them (below env).
_FILE_VALUES: ContextVar[Mapping[str, Any] | None] = ContextVar("pushfw_file_values", default=None)


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:9477, [::1]:9477)")
    return host, int(port)


class WorkerSettings(BaseSettings):
    """Every knob of ``pushfw-worker``; lists are comma-separated strings in the environment."""

    model_config = SettingsConfigDict(env_prefix="PUSHFW_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    host_name: str = Field(default_factory=socket.gethostname)
    host_labels: str = ""
    consumer: str = ""
    backend: Literal["auto", "nftables", "ipset", "iptables", "memory"] = "auto"
    set_size: int = Field(default=1_000_000, ge=1, le=100_000_000)
    key_prefix: str = DEFAULT_PREFIX
    chain: str = "PUSHFW"
    hooks: str = "INPUT"
    protect: str = ""
    min_drop_prefix_v4: int = Field(
        default=8, ge=0, le=32, description="the widest IPv4 network a drop may cover"
    )
    min_drop_prefix_v6: int = Field(
        default=16, ge=0, le=128, description="the widest IPv6 network a drop may cover"
    )
    min_accept_prefix_v4: int = Field(
        default=8, ge=0, le=32, description="the widest IPv4 network an accept may cover"
    )
    min_accept_prefix_v6: int = Field(
        default=16, ge=0, le=128, description="the widest IPv6 network an accept may cover"
    )
    state_dir: str = Field(
        default="/var/lib/pushfw",
        description="where the worker remembers the ledger generation it converged with",
    )
    batch_size: int = Field(default=500, ge=1, le=10_000)
    block_ms: int = Field(default=1000, ge=10, le=60_000)
    max_deliveries: int = Field(default=5, ge=1, le=1000)
    claim_idle_ms: int = Field(default=60_000, ge=100)
    retry_base_ms: int = Field(default=200, ge=1)
    retry_max_ms: int = Field(default=30_000, ge=1)
    results_maxlen: int = Field(default=100_000, ge=100)
    dead_maxlen: int = Field(default=100_000, ge=100)
    memory_fail: str = ""
    reconcile_interval: int = Field(default=300, ge=0, description="seconds; 0 turns it off")
    host_expiry: int = Field(
        default=900, ge=10, description="seconds of silence before a host stops holding the stream"
    )
    heartbeat_interval: float = Field(default=5.0, gt=0)
    trim_interval: float = Field(default=60.0, gt=0)
    expiry_events: bool = True
    scheduler_poll: float = Field(default=0.25, gt=0, le=1.0)
    metrics_listen: str = Field(default="", description="host:port of /metrics; empty: off")
    log_format: Literal["auto", "json", "text"] = "auto"
    hmac_key: SecretStr | None = Field(default=None, description="shared command-signing key")
    require_signature: bool = False
    signature_window: int = Field(default=300, ge=1, le=86_400, description="seconds")

    @field_validator("hmac_key")
    @classmethod
    def _hmac_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and 0 < len(value.get_secret_value()) < 16:
            raise ValueError("is shorter than 16 characters")
        return value if value is not None and value.get_secret_value() else None

    @field_validator("require_signature")
    @classmethod
    def _signing(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("hmac_key") is None:
            raise ValueError("needs a key to check signatures with (PUSHFW_HMAC_KEY)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        file_values = dict(_FILE_VALUES.get() or {})
        file_settings = InitSettingsSource(settings_cls, init_kwargs=file_values)
        return init_settings, env_settings, file_settings

    @classmethod
    def with_file(cls, values: Mapping[str, Any]) -> WorkerSettings:
        """Settings with ``values`` (a config file's keys) below the environment."""
        token = _FILE_VALUES.set(values)
        try:
            return cls()
        finally:
            _FILE_VALUES.reset(token)

    @field_validator("host_labels", "hooks", "protect", "memory_fail", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        """A TOML array is the same list as a comma-separated string."""
        if isinstance(value, list | tuple):
            if not all(isinstance(item, str) for item in value):
                raise ValueError("a list may hold only strings")
            return ",".join(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_target(value)
        return value

    @field_validator("host_name", "consumer", "chain")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"{value!r} may hold only letters, digits, '-', '_' and '.'")
        if len(value) > 63:
            raise ValueError("is longer than 63 characters")
        return value

    @field_validator("protect", "memory_fail")
    @classmethod
    def _networks(cls, value: str) -> str:
        for text in _split(value):
            parse_network(text)
        return value

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(_split(self.host_labels))

    @property
    def hook_chains(self) -> tuple[str, ...]:
        return tuple(_split(self.hooks))

    @property
    def protected(self) -> list[str]:
        return _split(self.protect)

    @property
    def fail_networks(self) -> list[Network]:
        return [parse_network(text) for text in _split(self.memory_fail)]

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_listen(self.metrics_listen) if self.metrics_listen else None

    @property
    def consumer_name(self) -> str:
        """Stable across restarts, so a restarted worker re-reads its own pending entries."""
        return self.consumer or self.host_name
