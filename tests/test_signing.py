"""Signed commands (HMAC-SHA256, ``sig`` + ``ts``) against a real redis-server, memory backend.

The signing rule is recomputed here from docs/producers.md's words alone, with
``hmac``/``hashlib``, so that a producer in another language that follows the docs gets the
same signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pushfw.producer import Producer
from pushfw.producer.contract import SIGNED_FIELDS, signature
from pushfw.producer.keys import Keys
from pushfw.producer.lists import ListContent
from pushfw.worker import Worker, WorkerSettings
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.decide import FORGED_EXPIRY
from pushfw.worker.ledger import Ledger
from pushfw.worker.retention import trim
from pushfw.worker.signing import Signing
from pushfw.worker.stream import entries_from_reply
from testbed.env import clean_env
from tests.conftest import RedisServer, memory_worker, need, wait_for
from tests.test_applier import key, results_by_cmd

CMD = "{pushfw}:cmd"
DOC = Path(__file__).resolve().parents[1] / "docs" / "producers.md"
KEY = "k3y-shared-by-producers-and-workers"


def make_worker(server: RedisServer, **overrides: Any) -> Worker:
    settings = WorkerSettings(
        redis_url=server.url,
        host_name="h1",
        backend="memory",
        block_ms=50,
        hmac_key=KEY,
        **overrides,
    )
    worker = Worker(settings, backend=MemoryBackend())
    worker.setup()
    return worker


def documented_signature(fields: dict[str, str], key_text: str) -> str:
    """docs/producers.md, "Signing commands", computed independently of pushfw's code."""
    known = {"op", "ip", "ttl", "target", "reason", "request_id", "origin", "ts"}
    lines = sorted(f"{name.lower()}={value}" for name, value in fields.items() if name in known)
    payload = "\n".join(lines).encode("utf-8")
    return hmac.new(key_text.encode("utf-8"), payload, hashlib.sha256).hexdigest()


def signed(fields: dict[str, str], ts_ms: int | None = None, key_text: str = KEY) -> dict[str, str]:
    out = {**fields, "ts": str(int(time.time() * 1000) if ts_ms is None else ts_ms)}
    return {**out, "sig": documented_signature(out, key_text)}


def status(r: Any, cmd_id: str) -> tuple[str, str]:
    result = results_by_cmd(r)[cmd_id]
    return result["status"], result["detail"]


def test_the_documented_rule_reproduces_the_producers_signature(r, redis_server):
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    cmd_id = producer.drop(
        "2001:db8::/32", ttl_s=600, target=["web1", "eu"], reason="abuse report", request_id="q-1"
    )
    [(_, raw)] = r.xrange(CMD, cmd_id, cmd_id)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    assert set(fields) == {
        "op",
        "ip",
        "ttl",
        "target",
        "reason",
        "request_id",
        "reply",
        "ts",
        "sig",
    }
    assert abs(int(fields["ts"]) - int(cmd_id.split("-")[0])) < 5000
    assert fields["sig"] == documented_signature(fields, KEY)
    assert signature(fields, KEY) == fields["sig"]
    assert list(SIGNED_FIELDS) == sorted(SIGNED_FIELDS)
    producer.client.close()


def test_required_signature_applies_signed_and_rejects_the_rest(r, redis_server):
    worker = make_worker(redis_server, require_signature=True)
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    good = producer.drop("192.0.2.1", reason="signed")
    unsigned = r.xadd(CMD, {"reply": "1", "op": "drop.insert", "ip": "192.0.2.2"}).decode()
    tampered_fields = signed({"op": "drop.insert", "ip": "192.0.2.3"})
    tampered = r.xadd(CMD, {"reply": "1", **tampered_fields, "ip": "192.0.2.4"}).decode()
    added = signed({"op": "drop.insert", "ip": "192.0.2.5"})
    added_reason = r.xadd(CMD, {"reply": "1", **added, "REASON": "slipped in"}).decode()
    no_ts = {"op": "drop.insert", "ip": "192.0.2.6"}
    without_ts = r.xadd(
        CMD, {"reply": "1", **no_ts, "sig": documented_signature(no_ts, KEY)}
    ).decode()
    now_ms = int(time.time() * 1000)
    stale = r.xadd(CMD, signed({"op": "drop.insert", "ip": "192.0.2.7"}, now_ms - 301_000))
    future = r.xadd(CMD, signed({"op": "drop.insert", "ip": "192.0.2.8"}, now_ms + 301_000))
    other_key = r.xadd(CMD, signed({"op": "drop.insert", "ip": "192.0.2.9"}, key_text="x" * 20))
    worker.run(burst=True)

    assert status(r, good) == ("applied", "inserted")
    assert status(r, unsigned) == ("rejected", "sig: missing")
    assert status(r, tampered) == ("rejected", "sig: does not match")
    assert status(r, added_reason) == ("rejected", "sig: does not match")
    assert status(r, without_ts)[1].startswith("ts: missing")
    assert status(r, stale.decode())[1].startswith("ts: outside the 300 s window")
    assert status(r, future.decode())[1].startswith("ts: outside the 300 s window")
    assert status(r, other_key.decode()) == ("rejected", "sig: does not match")
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.1")}
    # the ledger records every valid command, with what a strict host needs to verify it
    [good_record] = [rec for rec in producer.rules() if rec.network == "192.0.2.1/32"]
    assert good_record.signed["sig"] and good_record.signed["ip"] == "192.0.2.1"
    worker.reconcile()
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.1")}, (
        "reconcile installs only what this strict host can verify"
    )
    producer.client.close()


def test_a_key_without_require_takes_unsigned_but_not_badly_signed(r, redis_server):
    worker = make_worker(redis_server, signature_window_s=60)
    unsigned = r.xadd(CMD, {"reply": "1", "op": "drop.insert", "ip": "192.0.2.1"}).decode()
    bad = r.xadd(
        CMD, {"reply": "1", **signed({"op": "drop.insert", "ip": "192.0.2.2"}), "sig": "0" * 64}
    )
    stale = r.xadd(CMD, signed({"op": "drop.insert", "ip": "192.0.2.3"}, 1))
    worker.run(burst=True)
    assert status(r, unsigned) == ("applied", "inserted")
    assert status(r, bad.decode()) == ("rejected", "sig: does not match")
    assert status(r, stale.decode())[1].startswith("ts: outside the 60 s window")
    assert set(worker.backend.committed()) == {key("drop", "192.0.2.1")}


def test_no_key_ignores_signatures(r, redis_server):
    settings = WorkerSettings(redis_url=redis_server.url, host_name="h1", backend="memory")
    worker = Worker(settings, backend=MemoryBackend())
    worker.setup()
    bad = r.xadd(
        CMD, {"reply": "1", "op": "drop.insert", "ip": "192.0.2.2", "sig": "nonsense", "ts": "x"}
    )
    worker.run(burst=True)
    assert status(r, bad.decode()) == ("applied", "inserted")


def test_forged_expiry_is_rejected_and_the_schedulers_own_is_taken(r, redis_server):
    worker = make_worker(redis_server, require_signature=True)
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    ban = producer.drop("198.51.100.7", reason="stays")
    timed = producer.drop("198.51.100.8", ttl_s=1)
    worker.run(burst=True)
    assert {status(r, ban)[0], status(r, timed)[0]} == {"applied"}

    # anyone who can XADD can write what the scheduler writes: it must not lift the ban
    forged = r.xadd(
        CMD, {"reply": "1", "op": "drop.delete", "ip": "198.51.100.7", "origin": "ttl"}
    ).decode()
    worker.run(burst=True)
    assert status(r, forged) == ("rejected", FORGED_EXPIRY)
    assert key("drop", "198.51.100.7") in worker.backend.committed()
    assert [rec.network for rec in producer.rules()] == ["198.51.100.7/32", "198.51.100.8/32"]

    wait_for(lambda: producer.now_ms() > int(timed.split("-")[0]) + 1000, 5, "the ttl to pass")
    worker.scheduler.claim_due()
    [(expiry, fields)] = [
        (eid.decode(), f) for eid, f in r.xrange(CMD, f"({forged}") if f.get(b"origin") == b"ttl"
    ]
    assert b"sig" not in fields, "the scheduler's delete comes from Lua, unsigned"
    # process the delete before this host's own timer removes the rule: the delete does it
    assert key("drop", "198.51.100.8") in worker.backend.committed()
    worker.applier.process(worker.stream.read(">", 10, None))
    assert worker.applier.answers.counts["applied"] == 3, "the ban, the timed one and its expiry"
    assert expiry not in results_by_cmd(r), "the scheduler's deletes ask no result"
    assert set(worker.backend.committed()) == {key("drop", "198.51.100.7")}
    assert [rec.network for rec in producer.rules()] == ["198.51.100.7/32"]

    worker.reconcile()
    assert set(worker.backend.committed()) == {key("drop", "198.51.100.7")}, "the ledger kept it"
    producer.client.close()


def test_signing_settings_are_checked():
    with pytest.raises(ValidationError, match="PUSHFW_HMAC_KEY"):
        WorkerSettings(require_signature=True)
    with pytest.raises(ValidationError, match="shorter than 16"):
        WorkerSettings(hmac_key="short")
    assert WorkerSettings(hmac_key="").hmac_key is None
    assert KEY not in repr(WorkerSettings(hmac_key=KEY))
    with pytest.raises(ValueError, match="needs a key"):
        Signing(None, required=True)


def test_cli_signs_with_the_key_from_the_environment(r, redis_server, tmp_path):
    env = clean_env()
    for extra, args in (({"PUSHFW_HMAC_KEY": KEY}, []), ({}, ["--hmac-key", KEY])):
        cli = [sys.executable, "-m", "pushfw.producer", "--redis-url", redis_server.url]
        proc = subprocess.run(
            [*cli, *args, "drop", "192.0.2.1", "--ttl", "1h"],
            capture_output=True,
            text=True,
            env={**env, **extra},
            cwd=tmp_path,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        cmd_id = proc.stdout.strip()
        [(_, raw)] = r.xrange(CMD, cmd_id, cmd_id)
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        assert fields["sig"] == documented_signature(fields, KEY)


def test_unsigned_producer_gets_a_rejection_it_can_read(r, redis_server):
    worker = make_worker(redis_server, require_signature=True)
    producer = Producer.from_url(redis_server.url)
    cmd_id = producer.drop("192.0.2.1")
    worker.run(burst=True)
    [result] = producer.wait(cmd_id)
    assert (result.status.value, result.detail) == ("rejected", "sig: missing")
    producer.client.close()


def test_signature_checks_do_not_need_the_ledger_for_signed_expiries(r, redis_server):
    """A signed ``origin ttl`` delete (a producer may sign one) is taken on its signature."""
    worker = make_worker(redis_server, require_signature=True)
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    producer.drop("192.0.2.1")
    delete = r.xadd(
        CMD, {**signed({"op": "drop.delete", "ip": "192.0.2.1", "origin": "ttl"}), "reply": "1"}
    )
    worker.run(burst=True)
    assert status(r, delete.decode()) == ("applied", "deleted")
    producer.client.close()


def test_the_documented_shell_recipe_signs_for_redis_cli(r, redis_server):
    """The docs' openssl + redis-cli lines make a command a requiring worker applies."""
    need(shutil.which("openssl") is not None and shutil.which("redis-cli") is not None, "tools")
    worker = make_worker(redis_server, require_signature=True)
    recipe = DOC.read_text().split("<!-- signing-shell -->")[1].split("```sh")[1].split("```")[0]
    env = {**os.environ, "PUSHFW_HMAC_KEY": KEY, "REDISCLI_AUTH": ""}
    proc = subprocess.run(
        [
            "bash",
            "-euo",
            "pipefail",
            "-c",
            recipe.replace("redis-cli ", f"redis-cli -p {redis_server.port} "),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    cmd_id = proc.stdout.split()[-1]
    worker.run(burst=True)
    assert status(r, cmd_id) == ("applied", "inserted")


# --- signed state outlives unsigned attempts to remove it (issue 20, item 7) ---------------
# The kernel tests with real workers are in test_signed_state.py; these pin the ledger's
# held state and which hosts take it.


def held_ids(r: Any) -> dict[str, str]:
    raw = r.hgetall("{pushfw}:held")
    return {k.decode(): json.loads(v)["id"] for k, v in raw.items()}


def test_signed_state_is_the_newest_verified_command_whatever_the_fold_order(r, redis_server):
    """The held record is the newest command a worker with the key verified, behind newer
    ones nobody verified (unsigned, forged), in any fold order; a newer verified one ends it."""
    rule = "drop 192.0.2.1/32"
    first = r.xadd(CMD, signed({"op": "drop.insert", "ip": "192.0.2.1"})).decode()
    second = r.xadd(CMD, signed({"op": "drop.insert", "ip": "192.0.2.1", "ttl": "600"})).decode()
    unsigned = r.xadd(CMD, {"op": "drop.delete", "ip": "192.0.2.1"}).decode()
    forged = r.xadd(
        CMD, {**signed({"op": "drop.delete", "ip": "192.0.2.1"}), "sig": "0" * 64}
    ).decode()
    entries = {e.id: e for e in entries_from_reply(r.xrange(CMD))}
    folder = Ledger(r, Keys(), "test", signing=Signing(KEY.encode()))
    folder.ensure_group()
    for order in ([first, unsigned, forged, second], [second, forged, unsigned, first]):
        r.delete("{pushfw}:rules", "{pushfw}:held")
        for entry_id in order:
            folder.fold([entries[entry_id]])
        [newest] = folder.records()
        assert newest.id == forged and not newest.checked
        assert held_ids(r) == {rule: second}, order

    keyless = Ledger(r, Keys(), "keyless")  # folds what it cannot verify: held stays
    keyless.fold(entries_from_reply(r.xrange(CMD, unsigned, unsigned)))
    assert held_ids(r) == {rule: second}
    lifted = r.xadd(CMD, signed({"op": "drop.delete", "ip": "192.0.2.1"})).decode()
    folder.fold(entries_from_reply(r.xrange(CMD, lifted, lifted)))
    assert held_ids(r) == {}, "a newer verified command is the rule's state itself"


def test_signed_state_outlives_unsigned_commands_on_strict_hosts_only(r, redis_server):
    """After an unsigned undrop and list.delete, a strict host that joins holds the signed
    ban and list; a host without require_signature follows the newest command (I3)."""
    first = memory_worker(redis_server, "h1", hmac_key=KEY, require_signature=True)
    first.setup()
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    producer.drop("192.0.2.1", reason="signed ban")
    producer.load_list("feed", ListContent.of(["198.51.100.0/24"]))
    first.run(burst=True)
    undrop = r.xadd(CMD, {"reply": "1", "op": "drop.delete", "ip": "192.0.2.1"}).decode()
    delete = r.xadd(CMD, {"reply": "1", "op": "list.delete", "name": "feed"}).decode()
    first.run(burst=True)
    assert status(r, undrop) == status(r, delete) == ("rejected", "sig: missing")
    assert producer.rules() == [] and producer.lists() == [], "the ledger folded both"

    strict = memory_worker(redis_server, "h2", hmac_key=KEY, require_signature=True)
    strict.setup()
    assert set(strict.backend.committed()) == {key("drop", "192.0.2.1")}
    assert isinstance(strict.backend, MemoryBackend)
    assert strict.backend.lists["feed"][1] == {"198.51.100.0/24"}
    lax = memory_worker(redis_server, "h3", hmac_key=KEY)
    lax.setup()
    assert set(lax.backend.committed()) == set()
    assert isinstance(lax.backend, MemoryBackend) and "feed" not in lax.backend.lists
    version = ListContent.of(["198.51.100.0/24"]).version
    assert r.pttl(f"{{pushfw}}:list:feed:{version}") == -1, "held content does not expire"

    # trimming forgets the unsigned commands' tombstones: the held state stays
    r.hdel("{pushfw}:rules", "drop 192.0.2.1/32")
    r.hdel("{pushfw}:lists", "feed")
    late = memory_worker(redis_server, "h4", hmac_key=KEY, require_signature=True)
    late.setup()
    assert set(late.backend.committed()) == {key("drop", "192.0.2.1")}
    assert isinstance(late.backend, MemoryBackend) and "feed" in late.backend.lists
    producer.client.close()


def test_signed_state_that_expired_is_forgotten_by_trimming(r, redis_server):
    worker = memory_worker(redis_server, "h1", hmac_key=KEY, require_signature=True)
    worker.setup()
    producer = Producer.from_url(redis_server.url, hmac_key=KEY)
    timed = producer.drop("192.0.2.1", ttl_s=1)
    producer.drop("192.0.2.2")
    r.xadd(CMD, {"op": "drop.delete", "ip": "192.0.2.1"})
    r.xadd(CMD, {"op": "drop.delete", "ip": "192.0.2.2"})
    worker.run(burst=True)
    assert set(held_ids(r)) == {"drop 192.0.2.1/32", "drop 192.0.2.2/32"}
    wait_for(lambda: producer.now_ms() > int(timed.split("-")[0]) + 1000, 5, "the ttl to pass")
    trim(worker.ledger, producer.now_ms(), 60)
    assert set(held_ids(r)) == {"drop 192.0.2.2/32"}, "the lasting ban is still held"
    producer.client.close()


def test_signed_state_of_a_list_keeps_its_content_until_a_newer_verified_version(r, redis_server):
    worker = memory_worker(redis_server, "h1", hmac_key=KEY, require_signature=True)
    worker.setup()
    signer = Producer.from_url(redis_server.url, hmac_key=KEY)
    unsigned = Producer.from_url(redis_server.url)
    first, other, last = (
        ListContent.of([net]) for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
    )

    def ttl(content: ListContent) -> int:
        return int(r.pttl(f"{{pushfw}}:list:feed:{content.version}"))

    signer.load_list("feed", first)
    unsigned.load_list("feed", other)  # a version nobody signed replaces the signed one
    worker.run(burst=True)
    assert json.loads(r.hget("{pushfw}:held-lists", "feed"))["version"] == first.version
    assert ttl(first) == ttl(other) == -1, "the held version's content does not expire"
    assert isinstance(worker.backend, MemoryBackend)
    assert worker.backend.lists["feed"][1] == {"192.0.2.0/24"}

    signer.load_list("feed", last)
    worker.run(burst=True)
    assert r.hget("{pushfw}:held-lists", "feed") is None, "the newest is verified itself"
    assert ttl(last) == -1 and 0 < ttl(first) <= 3_600_000 and 0 < ttl(other) <= 3_600_000
    assert worker.backend.lists["feed"][1] == {"203.0.113.0/24"}
    signer.client.close()
    unsigned.client.close()
