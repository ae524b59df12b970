"""Many hosts, one stream: fan-out, targets, and a late host converging from the ledger.

Redis runs inside the first namespace; the other hosts reach it over veth pairs, as
workers on separate machines would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pushfw.producer import Producer
from testbed.kernel import chain_rules, dropped, veth
from tests.conftest import Netns, RedisServer

CMD = "{pushfw}:cmd"


def statuses(producer: Producer, cmd_id: str, expect: int) -> dict[str, str]:
    return {r.host: r.status.value for r in producer.wait(cmd_id, expect=expect, timeout_s=15)}


def test_fan_out_targets_and_a_late_host(
    make_netns: Callable[[], Netns], spawn_worker, tmp_path: Path
):
    hub, db, late = make_netns(), make_netns(), make_netns()
    veth(hub, "10.214.0.1", db, "10.214.0.2", "x")
    veth(hub, "10.214.1.1", late, "10.214.1.2", "y")
    server = RedisServer(tmp_path, netns=hub.name, bind="127.0.0.1 10.214.0.1 10.214.1.1")
    server.start()
    try:
        producer = Producer.from_url(server.url)
        spawn_worker(hub, server=server, host_labels="web,eu").start()
        spawn_worker(db, server=server, redis_url=f"redis://10.214.0.1:{server.port}/0").start()

        everywhere = producer.drop("192.0.2.1", reason="fan-out")
        assert statuses(producer, everywhere, 2) == {hub.name: "applied", db.name: "applied"}
        by_name = producer.drop("192.0.2.2", target=[db.name])
        by_label = producer.drop("192.0.2.3", target=["web"])
        timed = producer.drop("192.0.2.4", ttl_s=600)
        assert statuses(producer, by_name, 1) == {db.name: "applied"}
        assert statuses(producer, by_label, 1) == {hub.name: "applied"}
        assert statuses(producer, timed, 2) == {hub.name: "applied", db.name: "applied"}
        redis_ip = producer.drop("10.214.0.1")
        assert statuses(producer, redis_ip, 2)[db.name] == "rejected", "its own Redis is protected"

        assert set(dropped(hub)) == {
            "192.0.2.1/32",
            "192.0.2.3/32",
            "192.0.2.4/32",
            "10.214.0.1/32",
        }
        assert set(dropped(db)) == {"192.0.2.1/32", "192.0.2.2/32", "192.0.2.4/32"}

        spawn_worker(late, server=server, redis_url=f"redis://10.214.1.1:{server.port}/0").start()
        assert set(dropped(late)) == {"192.0.2.1/32", "192.0.2.4/32", "10.214.0.1/32"}
        expiry = [line for line in chain_rules(late) if "192.0.2.4/32" in line]
        assert expiry == [line for line in chain_rules(db) if "192.0.2.4/32" in line]
        assert late.name not in {r.host for r in producer.results(count=1000)}, (
            "a late host converges from the ledger; it does not replay history"
        )

        after = producer.undrop("192.0.2.1")
        assert statuses(producer, after, 3) == {n.name: "applied" for n in (hub, db, late)}

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pushfw.producer",
                "--redis-url",
                server.url,
                "status",
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        hosts = {h["host"]: h for h in json.loads(out.stdout)}
        assert set(hosts) == {hub.name, db.name, late.name}
        assert hosts[hub.name]["labels"] == ["eu", "web"]
    finally:
        server.stop()
