"""Real packets: a client namespace connects over a veth pair to a firewalled one."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator

from pushfw.producer import Producer
from testbed.kernel import veth
from tests.conftest import Netns, wait_for

SERVER_IP = "10.213.0.1"
CLIENT_IP = "10.213.0.2"
PORT = 8080

LISTEN = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER_IP}", {PORT}))
s.listen(16)
while True:
    s.accept()[0].close()
"""
CONNECT = f"""
import socket, sys
try:
    socket.create_connection(("{SERVER_IP}", {PORT}), timeout=1).close()
except OSError:
    sys.exit(1)
"""


def can_connect(client: Netns) -> bool:
    return client.run(sys.executable, "-c", CONNECT, check=False).returncode == 0


@contextlib.contextmanager
def listening_peer(server: Netns, client: Netns, tag: str = "") -> Iterator[None]:
    """``client`` joined to ``server`` by a veth pair, and a TCP listener on SERVER_IP:PORT
    in ``server`` that accepts every connection until the block ends."""
    veth(server, SERVER_IP, client, CLIENT_IP, tag=tag)
    listener = subprocess.Popen(["ip", "netns", "exec", server.name, sys.executable, "-c", LISTEN])
    try:
        wait_for(lambda: can_connect(client), what="the listener to accept connections")
        yield
    finally:
        listener.kill()
        listener.wait()


def test_drop_blocks_real_traffic_and_undrop_restores_it(
    make_netns: Callable[[], Netns], backend: str, spawn_worker, producer: Producer
):
    server, client = make_netns(), make_netns()
    with listening_peer(server, client):
        spawn_worker(server, backend=backend).start()

        results = producer.wait(producer.drop(CLIENT_IP, reason="test ban"), timeout_s=15)
        assert [r.status.value for r in results] == ["applied"]
        assert not can_connect(client), "traffic from a dropped address still gets through"

        results = producer.wait(producer.accept(CLIENT_IP), timeout_s=15)
        assert [r.status.value for r in results] == ["applied"]
        assert can_connect(client), "an accept must win over a drop"
        producer.wait(producer.unaccept(CLIENT_IP), timeout_s=15)
        assert not can_connect(client)

        results = producer.wait(producer.undrop(CLIENT_IP), timeout_s=15)
        assert [r.status.value for r in results] == ["applied"]
        assert can_connect(client), "traffic is still blocked after the drop was deleted"

        producer.wait(producer.drop("10.213.0.0/24"), timeout_s=15)
        assert not can_connect(client), "a network ban must match every address in it"
        producer.wait(producer.undrop("10.213.0.0/24"), timeout_s=15)
        assert can_connect(client)

        mapped = producer.drop(f"::ffff:{CLIENT_IP}")
        assert [r.status.value for r in producer.wait(mapped, timeout_s=15)] == ["applied"]
        assert not can_connect(client), "an IPv4-mapped IPv6 ban must block the IPv4 address"
