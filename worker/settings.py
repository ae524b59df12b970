"""The worker's settings, read from ``PUSHFW_*`` environment variables."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pushfw.producer.contract import Network, parse_network
from pushfw.producer.keys import DEFAULT_PREFIX


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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

    @field_validator("redis_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
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
    def consumer_name(self) -> str:
        """Stable across restarts, so a restarted worker re-reads its own pending entries."""
        return self.consumer or self.host_name
