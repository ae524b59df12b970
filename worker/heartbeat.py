"""Host registration: each worker says in ``{pushfw}:hosts`` that it is alive and how it is."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import redis

from pushfw.producer.keys import Keys
from pushfw.producer.records import HostStatus

logger = logging.getLogger(__name__)


def pushfw_version() -> str:
    try:
        return version("pushfw")
    except PackageNotFoundError:
        return "unknown"


def beat(client: redis.Redis, keys: Keys, status: HostStatus) -> None:
    """HSET this host's heartbeat. https://redis.io/commands/hset/"""
    client.hset(keys.hosts, status.host, status.model_dump_json())


def read_hosts(client: redis.Redis, keys: Keys) -> list[HostStatus]:
    raw: Any = client.hgetall(keys.hosts)
    return sorted((HostStatus.model_validate_json(v) for v in raw.values()), key=lambda h: h.host)
