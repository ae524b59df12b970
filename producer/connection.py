"""Redis URLs for every topology pushfw runs on: one server, TLS, Sentinel, Cluster.

``redis://`` / ``rediss://`` / ``unix://`` are redis-py's own. Two more schemes name the
topologies a single URL cannot::

    redis+sentinel://[user:pass@]host1:26379,host2:26379/<service>[/<db>]
    redis+cluster://[user:pass@]host1:7000,host2:7001[/?...]

(``rediss+sentinel`` / ``rediss+cluster`` for TLS; credentials are the data nodes', the
sentinels are reached without.) Every key pushfw uses shares one hash
tag, so scripts and transactions stay on one cluster slot.

Two helpers read what any client returns, whichever way it was made: :func:`redis_ms`,
Redis's clock (the one clock pushfw decides time by), and :func:`text`, a reply value as
``str`` from a client with or without ``decode_responses``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

__all__ = ["RedisTarget", "connect", "parse_target", "redis_ms", "text", "time_ms"]

SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)


@dataclass(frozen=True)
class RedisTarget:
    """What a URL names: its topology, the host:port pairs in it, and credentials."""

    topology: str
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0
    options: tuple[tuple[str, str], ...] = ()


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """``h1:1,[::1]:2,h3`` -> ((h1, 1), (::1, 2), (h3, default))."""
    pairs = []
    for part in filter(None, (p.strip() for p in netloc.rpartition("@")[2].split(","))):
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = part.partition(":")
        pairs.append((host, int(port) if port.isdigit() else default_port))
    return tuple(pairs)


def parse_target(url: str) -> RedisTarget:
    """Split a pushfw Redis URL into its parts.

    Raises:
        ValueError: the scheme is unknown, or a sentinel URL names no service.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"scheme {parts.scheme!r} is not one of {', '.join(SCHEMES)}")
    base, _, topology = parts.scheme.partition("+")
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    segments = [s for s in parts.path.split("/") if s]
    service = ""
    if topology == "sentinel":
        if not segments:
            raise ValueError("a redis+sentinel URL needs the service name: .../<service>[/<db>]")
        service = segments.pop(0)
    db = int(segments[0]) if segments and segments[0].isdigit() else 0
    default_port = 26379 if topology == "sentinel" else 6379
    return RedisTarget(
        topology=topology or ("unix" if base == "unix" else "single"),
        hosts=_hosts(parts.netloc, default_port) if base != "unix" else (),
        tls=base == "rediss",
        username=unquote(user) or None,
        password=unquote(password) or None,
        service=service,
        db=db,
        options=tuple(parse_qsl(parts.query)),
    )


def untyped(obj: object) -> Any:
    """``obj`` typed as ``Any``, for redis-py API whose annotations come and go between releases.

    redis-py 8.2 annotated ``Sentinel``, ``ClusterNode`` and ``pubsub`` that 8.1 left untyped:
    a ``type: ignore`` that one release needs, the other reports as unused, so calls through
    those go through this instead and type-check the same on every release.
    """
    return obj


def connect(url: str, *, decode_responses: bool, **options: Any) -> redis.Redis:
    """A client for ``url``; Sentinel resolves the master, Cluster routes by slot.

    ``options`` are redis-py connection options (timeouts, keepalive, ...). A cluster
    client is returned typed as ``redis.Redis``: pushfw only uses commands both share.
    """
    target = parse_target(url)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    tls: dict[str, Any] = {"ssl": True, **dict(target.options)} if target.tls else {}
    if target.topology == "sentinel":
        sentinel = untyped(Sentinel)(list(target.hosts), sentinel_kwargs=dict(tls), **options)
        master: redis.Redis = sentinel.master_for(
            target.service, db=target.db, decode_responses=decode_responses, **auth, **tls
        )
        return master
    if target.topology == "cluster":
        nodes = [untyped(ClusterNode)(host, port) for host, port in target.hosts]
        options.pop("health_check_interval", None)
        cluster = RedisCluster(
            startup_nodes=nodes, decode_responses=decode_responses, **auth, **tls, **options
        )
        return cast(redis.Redis, cluster)
    return redis.Redis.from_url(url, decode_responses=decode_responses, **options)


def time_ms(seconds: str | bytes | int, micros: str | bytes | int) -> int:
    """A ``TIME`` reply (seconds and microseconds, as any client returns them) in ms."""
    return int(seconds) * 1000 + int(micros) // 1000


def redis_ms(client: redis.Redis) -> int:
    """Redis's clock in milliseconds: entry ids are stamped with it, so expiries and
    signature windows are measured against it, never against this host's clock.

    https://redis.io/commands/time/
    """
    seconds, micros = client.time()
    return time_ms(seconds, micros)


def text(value: object) -> str:
    """A value read from Redis as ``str``: a client without ``decode_responses`` returns
    bytes (undecodable bytes are replaced: what Redis holds is input, never a reason to
    crash; commands are checked strictly by :func:`.contract.decode_fields`)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
