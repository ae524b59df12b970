"""The worker's settings: ``PUSHFW_*`` environment variables over ``worker.toml`` over defaults.

The file is read by :func:`pushfw.worker.config.load`, which hands its values to
:meth:`WorkerSettings.with_file`; the environment still wins over them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pushfw.producer.connection import parse_target
from pushfw.producer.contract import (
    DEFAULT_MIN_ACCEPT_PREFIX_V4,
    DEFAULT_MIN_ACCEPT_PREFIX_V6,
    DEFAULT_MIN_DROP_PREFIX_V4,
    DEFAULT_MIN_DROP_PREFIX_V6,
    Network,
    parse_network,
)
from pushfw.producer.keys import DEFAULT_PREFIX

logger = logging.getLogger(__name__)


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


RENAMED = {
    "reconcile_interval": "reconcile_interval_s",
    "host_expiry": "host_expiry_s",
    "heartbeat_interval": "heartbeat_interval_s",
    "trim_interval": "trim_interval_s",
    "scheduler_poll": "scheduler_poll_s",
    "signature_window": "signature_window_s",
}
"""Settings whose names now carry their unit: the old names still work, with a warning."""


def renamed(values: Mapping[str, Any], spell: Callable[[str], str] = str) -> dict[str, Any]:
    """``values`` with old setting names put under their new ones (a new name wins)."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
            logger.warning("%s is now %s; the old name still works", spell(old), spell(new))
    return out


def _env_name(name: str) -> str:
    return f"PUSHFW_{name.upper()}"


class _RenamedEnv(PydanticBaseSettingsSource):
    """``PUSHFW_<OLD NAME>`` variables, read below the ones with the new names."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items()}
        found = {old: env[_env_name(old)] for old in RENAMED if _env_name(old) in env}
        return renamed(found, _env_name)


class WorkerSettings(BaseSettings):
    """Every knob of ``pushfw-worker``; lists are comma-separated strings in the environment."""

    model_config = SettingsConfigDict(env_prefix="PUSHFW_", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="the Redis holding the streams: `redis://`, `rediss://` (TLS), `unix://`, "
        "`redis+sentinel://` or `redis+cluster://`",
    )
    read_url: str = Field(
        default="",
        description="follower mode for large fleets: read the command stream with `XREAD` "
        "from this Redis (a replica of `redis_url`) after a position kept in `state_dir`, "
        "instead of a consumer group on the primary; heartbeats, results, dead letters and "
        "the ledger stay on `redis_url`. Empty: a consumer group on `redis_url`",
    )
    host_name: str = Field(
        default_factory=socket.gethostname,
        description="this host's name: its consumer group is `host:<name>` and a command's "
        "`target` matches it; letters, digits, `-_.`, at most 63 characters",
    )
    host_labels: str = Field(
        default="", description="labels a command's `target` may name besides the host name"
    )
    consumer: str = Field(
        default="",
        description="consumer name in the host's group (empty: `host_name`); keep it stable so a "
        "restarted worker re-reads its own pending entries",
    )
    backend: Literal["auto", "nftables", "ipset", "iptables", "memory"] = Field(
        default="auto",
        description="the firewall to drive: `auto` picks nftables where libnftables works, else "
        "ipset, else iptables; `memory` keeps rules in memory (dry runs, no root)",
    )
    set_size: int = Field(
        default=1_000_000,
        ge=1,
        le=100_000_000,
        description="most elements per set (nftables `size`, ipset `maxelem`); a command that "
        "finds its set full goes to the dead letters",
    )
    key_prefix: str = Field(
        default=DEFAULT_PREFIX,
        description="prefix of every Redis key; keep the {hash tag} so that on Redis Cluster "
        "every key lives in one slot",
    )
    chain: str = Field(
        default="PUSHFW",
        description="the worker's own chain, IPv4 and IPv6 (iptables, ipset backends); in lower "
        "case, the name of the nftables backend's table",
    )
    hooks: str = Field(
        default="INPUT",
        description="chains that jump to the worker's chain: add `FORWARD` or `DOCKER-USER` where "
        "traffic is forwarded",
    )
    protect: str = Field(
        default="",
        description="networks never to drop, on top of loopback and every address of the "
        "worker's Redis",
    )
    min_drop_prefix_v4: int = Field(
        default=DEFAULT_MIN_DROP_PREFIX_V4,
        ge=0,
        le=32,
        description="the widest IPv4 network a drop may cover, as a prefix length (a wider "
        "drop is rejected)",
    )
    min_drop_prefix_v6: int = Field(
        default=DEFAULT_MIN_DROP_PREFIX_V6,
        ge=0,
        le=128,
        description="the widest IPv6 network a drop may cover, as a prefix length",
    )
    min_accept_prefix_v4: int = Field(
        default=DEFAULT_MIN_ACCEPT_PREFIX_V4,
        ge=0,
        le=32,
        description="the widest IPv4 network an accept may cover (an accept beats every ban: "
        "`0.0.0.0/0` would lift them all)",
    )
    min_accept_prefix_v6: int = Field(
        default=DEFAULT_MIN_ACCEPT_PREFIX_V6,
        ge=0,
        le=128,
        description="the widest IPv6 network an accept may cover, as a prefix length",
    )
    list_drop_cover_v4: int = Field(
        default=1,
        ge=0,
        le=32,
        description="the most IPv4 addresses one drop list may cover together, as the prefix "
        "length of one network that size (1: half the IPv4 space)",
    )
    list_drop_cover_v6: int = Field(
        default=1,
        ge=0,
        le=128,
        description="the most IPv6 addresses one drop list may cover, as a prefix length",
    )
    all_drop_lists_cover_v4: int = Field(
        default=1,
        ge=0,
        le=32,
        description="the most IPv4 addresses all drop lists of this host may cover together, "
        "as a prefix length",
    )
    all_drop_lists_cover_v6: int = Field(
        default=1,
        ge=0,
        le=128,
        description="the most IPv6 addresses all drop lists of this host may cover together",
    )
    list_accept_cover_v4: int = Field(
        default=4,
        ge=0,
        le=32,
        description="the most IPv4 addresses one accept list may cover, as a prefix length "
        "(4: 16 times the widest accept; 256 accepts of /8 would be `accept 0.0.0.0/0`)",
    )
    list_accept_cover_v6: int = Field(
        default=12,
        ge=0,
        le=128,
        description="the most IPv6 addresses one accept list may cover, as a prefix length",
    )
    all_accept_lists_cover_v4: int = Field(
        default=3,
        ge=0,
        le=32,
        description="the most IPv4 addresses all accept lists of this host may cover together",
    )
    all_accept_lists_cover_v6: int = Field(
        default=11,
        ge=0,
        le=128,
        description="the most IPv6 addresses all accept lists of this host may cover together",
    )
    max_lists: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="most named lists a host holds; a `list.load` of one more is rejected. "
        "Packets walk the same few rules however many lists there are (the lists of one "
        "action share sets), but each list costs the worker its entries in memory and a load "
        "at every start; 64 is far above the handful of feeds a host combines",
    )
    state_dir: str = Field(
        default="/var/lib/pushfw",
        description="where the worker remembers the ledger generation it converged with, "
        "a follower its position in the stream, and a host with `require_signature` a copy "
        "of the content of each list it holds (the unit's `StateDirectory=`)",
    )
    batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="entries read and committed to the kernel at once",
    )
    block_ms: int = Field(
        default=1000,
        ge=10,
        le=60_000,
        description="how long one read waits for new entries; under a systemd watchdog, "
        "lowered to a quarter of its interval at most",
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="deliveries of a failing command before it becomes a dead letter",
    )
    claim_idle_ms: int = Field(
        default=60_000,
        ge=100,
        description="how long another consumer may leave an entry pending (the host's group, "
        "the ledger's) before this one claims it",
    )
    retry_base_ms: int = Field(
        default=200,
        ge=1,
        description="first retry delay of a failing command (doubling, with jitter)",
    )
    retry_max_ms: int = Field(default=30_000, ge=1, description="longest retry delay")
    results_maxlen: int = Field(
        default=100_000,
        ge=100,
        description="approximate length the results stream is trimmed to",
    )
    dead_maxlen: int = Field(
        default=100_000,
        ge=100,
        description="approximate length the dead-letter stream is trimmed to",
    )
    memory_fail: str = Field(
        default="",
        description="memory backend only: networks whose changes always fail (fault "
        "injection for tests)",
    )
    reconcile_interval_s: int = Field(
        default=300,
        ge=0,
        description="seconds between reconciliations with the ledger; `0`: only at start and "
        "after each Redis reconnect",
    )
    host_expiry_s: int = Field(
        default=900,
        ge=10,
        description="seconds a host may stay silent before its group stops holding the command "
        "stream back",
    )
    retire_after_s: int = Field(
        default=7 * 86_400,
        ge=0,
        description="seconds a host may stay silent before it is retired: its consumer group "
        "and heartbeat are removed and it starts from the ledger if it returns; `0`: never",
    )
    heartbeat_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="seconds between heartbeats in `{pushfw}:hosts` (and metric gauge updates)",
    )
    trim_interval_s: float = Field(
        default=60.0, gt=0, description="seconds between trims of the streams"
    )
    hits_max_rules: int = Field(
        default=100_000,
        ge=0,
        description="most managed rules at which per-rule hit counters are still read (once a "
        "minute, for `pushfw list --hits`); past it they are not, since one reading lists "
        "every element and a million took seconds and a gigabyte; so for the entries of the "
        "named lists, counted apart (`pushfw lists` HITS); 0: never read them",
    )
    expiry_events: bool = Field(
        default=True,
        description="turn on Redis key-expiry events (`notify-keyspace-events Ex`) to wake the "
        "scheduler early; its timer alone meets the 1 s bound",
    )
    scheduler_poll_s: float = Field(
        default=0.25,
        gt=0,
        le=1.0,
        description="the longest the scheduler sleeps without looking at the expiry queue, "
        "in seconds",
    )
    metrics_listen: str = Field(
        default="",
        description="`host:port` (`[::1]:9477` for IPv6) serving Prometheus `/metrics`, without "
        "authentication; empty: off",
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="`auto`: JSON lines unless stderr is a terminal; `json` or `text` forces one",
    )
    hmac_key: SecretStr | None = Field(
        default=None,
        description="key shared with the producers to check command signatures, at least 16 "
        "characters (shown masked)",
    )
    require_signature: bool = Field(
        default=False,
        description="reject every command not signed with `hmac_key` (needs `hmac_key`)",
    )
    signature_window_s: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="seconds a signed command's `ts` may be from when Redis first saw the "
        "command, either way",
    )

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
        file_values = renamed(dict(_FILE_VALUES.get() or {}))
        file_settings = InitSettingsSource(settings_cls, init_kwargs=file_values)
        if isinstance(init_settings, InitSettingsSource):
            kwargs = renamed(init_settings.init_kwargs)
            init_settings = InitSettingsSource(settings_cls, init_kwargs=kwargs)
        return init_settings, env_settings, _RenamedEnv(settings_cls), file_settings

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

    @field_validator("read_url")
    @classmethod
    def _read_url(cls, value: str) -> str:
        if value and parse_target(value).topology not in ("single", "unix"):
            raise ValueError("names one replica: redis://, rediss:// or unix://")
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
