"""Networks a drop must never cover: loopback, the worker's own Redis, and configured ones."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

from pushfw.producer.connection import parse_target
from pushfw.producer.contract import Network, parse_network

logger = logging.getLogger(__name__)

LOOPBACK: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)


def redis_networks(redis_url: str) -> list[Network]:
    """The addresses the worker reaches Redis at; dropping them would cut the worker off.

    For Sentinel and Cluster URLs these are the listed nodes (name every node you use).
    """
    networks: list[Network] = []
    for host, port in parse_target(redis_url).hosts:
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            logger.warning("cannot resolve Redis host %s to protect it: %s", host, exc)
            continue
        networks += [ipaddress.ip_network(info[4][0]) for info in infos]
    return networks


class Protection:
    """Answers whether a network overlaps any protected one."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(dict.fromkeys(networks))

    @classmethod
    def build(cls, configured: Iterable[str], redis_url: str) -> Protection:
        """Loopback and Redis are always protected; ``configured`` adds to them."""
        extra = [parse_network(text.strip()) for text in configured if text.strip()]
        return cls([*LOOPBACK, *redis_networks(redis_url), *extra])

    def covering(self, network: Network) -> Network | None:
        """The first protected network that ``network`` overlaps, if any."""
        for protected in self.networks:
            if protected.version == network.version and protected.overlaps(network):
                return protected
        return None
