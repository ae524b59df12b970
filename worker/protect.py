"""Networks a drop must never cover: loopback, the worker's own Redis, and configured ones.

Redis's addresses change under a running worker (DNS answers, a Sentinel failover, Cluster
nodes joining), so that part is recomputed by ``Protection.refresh`` and only ever grows.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from socket import getaddrinfo
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from pushfw.producer.connection import RedisTarget, parse_target, untyped
from pushfw.producer.contract import LOOPBACK as LOOPBACK  # re-exported: its old home
from pushfw.producer.contract import Network, parse_network

logger = logging.getLogger(__name__)

SENTINEL_TIMEOUT_S = 1.0


def _resolve(host: str, port: int) -> list[Network]:
    """Every address ``host`` stands for, IPv4-mapped IPv6 ones as IPv4; OSError if none."""
    try:
        return [parse_network(host.partition("%")[0])]
    except ValueError:
        pass
    infos = getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return [parse_network(str(info[4][0]).partition("%")[0]) for info in infos]


def redis_networks(redis_url: str) -> list[Network]:
    """The addresses the URL names; dropping them would cut the worker off.

    For Sentinel and Cluster URLs these are only the listed nodes; ``Protection.refresh``
    also asks the sentinels and the cluster client.
    """
    networks: list[Network] = []
    for host, port in parse_target(redis_url).hosts:
        try:
            networks += _resolve(host, port)
        except OSError as exc:
            logger.warning("cannot resolve Redis host %s to protect it: %s", host, exc)
    return networks


def _sentinel_nodes(target: RedisTarget) -> list[tuple[str, int]]:
    """The master and live replicas the sentinels report for the URL's service."""
    tls: dict[str, Any] = {"ssl": True, **dict(target.options)} if target.tls else {}
    timeouts = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
    kwargs = {**tls, **timeouts, "retry": Retry(NoBackoff(), 0)}
    sentinel = untyped(Sentinel)(list(target.hosts), sentinel_kwargs=kwargs)
    try:
        nodes = list(sentinel.discover_slaves(target.service))
        try:
            nodes.append(sentinel.discover_master(target.service))
        except MasterNotFoundError:
            if not nodes:  # mid-failover the replicas still name the next master
                raise
        return [(str(host), int(port)) for host, port in nodes]
    finally:
        sentinel.close()


def _peers(client: redis.Redis) -> Iterator[tuple[str, int]]:
    """The TCP peers of the client's pooled connections (redis-py keeps them private)."""
    pool: Any = client.connection_pool
    getters = ("_get_free_connections", "_get_in_use_connections")
    for conn in [c for name in getters for c in getattr(pool, name, list)()]:
        sock = getattr(conn, "_sock", None)
        if isinstance(sock, socket.socket) and sock.family != socket.AF_UNIX:
            try:
                peer = sock.getpeername()
            except OSError:  # closed under us: the next refresh sees its successor
                continue
            yield str(peer[0]), int(peer[1])


def _span(network: Network) -> tuple[int, int]:
    """The first and the last address of ``network``, as integers."""
    first = int(network.network_address)
    return first, first | ((1 << (network.max_prefixlen - network.prefixlen)) - 1)


class Protection:
    """Answers whether a network overlaps any protected one.

    Args:
        networks: always protected (loopback and configured ones).
        redis_url: the worker's Redis; its addresses are added by ``refresh``.
    """

    def __init__(self, networks: Iterable[Network], redis_url: str | None = None) -> None:
        self._static = tuple(dict.fromkeys(networks))
        self._target = parse_target(redis_url) if redis_url else None
        self._redis: dict[Network, None] = {}
        self._failing: set[str] = set()
        self._spans: tuple[tuple[int, int, int, Network], ...] = ()
        self.networks = self._static

    @classmethod
    def build(cls, configured: Iterable[str], redis_url: str) -> Protection:
        """Loopback and Redis are always protected; ``configured`` adds to them.

        Resolves the URL's names and asks its sentinels once (short timeouts) before the
        worker reads a command; call ``refresh`` after each (re)connect for the rest.
        """
        extra = [parse_network(text.strip()) for text in configured if text.strip()]
        protection = cls([*LOOPBACK, *extra], redis_url)
        protection.refresh()
        return protection

    @property
    def redis_addresses(self) -> tuple[Network, ...]:
        """Every address the worker's Redis connection was seen to use, oldest first."""
        return tuple(self._redis)

    def refresh(self, client: redis.Redis | RedisCluster | None = None) -> bool:
        """Add the addresses Redis is reached at now; never raises, never removes one.

        Sources: the URL's host names (re-resolved), the master and replicas the sentinels
        report, a cluster client's nodes, and a plain client's connected peers. A lookup
        that fails is logged once until it works again.

        Args:
            client: the worker's connection, if it has one yet.

        Returns:
            True when an address became protected that was not before: rules that now
            cover it should be removed (reconcile).
        """
        target = self._target
        nodes = list(target.hosts) if target else []
        if target and target.topology == "sentinel":
            nodes += self._attempt("the sentinels", lambda: _sentinel_nodes(target))
        if isinstance(client, RedisCluster):
            cluster_nodes = untyped(client).get_nodes()
            nodes += [(str(node.host), int(node.port)) for node in cluster_nodes]
        elif isinstance(client, redis.Redis):
            nodes += self._attempt("the client's sockets", lambda: list(_peers(client)))
        found = [net for host, port in dict.fromkeys(nodes) for net in self._lookup(host, port)]
        return self._grow(found)

    @property
    def networks(self) -> tuple[Network, ...]:
        """Every protected network: the static ones first, then Redis's addresses."""
        return tuple(span[3] for span in self._spans)

    @networks.setter
    def networks(self, networks: tuple[Network, ...]) -> None:
        self._spans = tuple((net.version, *_span(net), net) for net in networks)

    def covering(self, network: Network) -> Network | None:
        """The first protected network that ``network`` overlaps, if any.

        Compared as integer ranges: it runs for every drop a host reads, and
        ``ipaddress``'s ``overlaps`` took a fifth of the time a command cost.
        """
        version = network.version
        first, last = _span(network)
        for protected_version, start, end, protected in self._spans:
            if protected_version == version and first <= end and start <= last:
                return protected
        return None

    def _attempt(
        self, what: str, fetch: Callable[[], list[tuple[str, int]]]
    ) -> list[tuple[str, int]]:
        """``fetch()``, or nothing (logged once until it works) when Redis or the OS fails."""
        try:
            nodes = fetch()
        except (redis.RedisError, OSError) as exc:
            self._warn_once(what, "cannot ask %s for Redis addresses to protect: %s", exc)
            return []
        self._failing.discard(what)
        return nodes

    def _lookup(self, host: str, port: int) -> list[Network]:
        try:
            networks = _resolve(host, port)
        except OSError as exc:
            self._warn_once(host, "cannot resolve Redis host %s to protect it yet: %s", exc)
            return []
        if host in self._failing:
            self._failing.discard(host)
            logger.info("Redis host %s resolves now; protecting %s", host, networks)
        return networks

    def _warn_once(self, key: str, message: str, exc: BaseException) -> None:
        if key not in self._failing:
            self._failing.add(key)
            logger.warning(message, key, exc)

    def _grow(self, found: Iterable[Network]) -> bool:
        """Remember new addresses; the tuple ``covering`` reads is replaced in one step."""
        new = [net for net in dict.fromkeys(found) if net not in self._redis]
        if not new:
            return False
        uncovered = [net for net in new if self.covering(net) is None]
        self._redis.update(dict.fromkeys(new))
        self.networks = (*self._static, *(n for n in self._redis if n not in self._static))
        if uncovered:
            logger.info("protecting Redis addresses %s", ", ".join(map(str, uncovered)))
        return bool(uncovered)
