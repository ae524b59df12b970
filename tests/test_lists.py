"""Named lists through the whole pipeline: import, stream command, ledger, gate, kernel.

Real redis-server, in-process workers on the memory backend (whose lists are a dict the
test reads); the kernel backends' list contract is in ``test_backend_lists.py``, and
``test_lists_kernel.py`` follows lists into real nftables and ipset sets.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from pushfw.producer import Producer
from pushfw.producer.contract import Result
from pushfw.producer.lists import ListContent, difference, read_list
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.daemon import Worker
from tests.conftest import RedisServer, memory_worker, wait_for

CMD = "{pushfw}:cmd"


def held(worker: Worker, name: str) -> set[str] | None:
    backend = worker.backend
    assert isinstance(backend, MemoryBackend)
    found = backend.lists.get(name)
    return None if found is None else found[1]


def result(producer: Producer, cmd_id: str, host: str = "h1") -> Result:
    [found] = [res for res in producer.results(cmd_id=cmd_id) if res.host == host]
    return found


def content(*networks: str) -> ListContent:
    return ListContent.of(networks)


# --- the list file and its packed content ---------------------------------------------------


def test_a_list_file_is_read_as_firehol_and_spamhaus_write_them():
    text = """\
# FireHOL-style header
#   comment lines and blank lines are skipped

1.2.3.4
10.0.0.0/8
10.1.0.0/16
192.0.2.0/24 ; SBL123456
{"cidr":"198.51.100.0/24","sblid":"SBL2","rir":"arin"}
{"type":"metadata","timestamp":1700000000}
::ffff:203.0.113.9
2001:db8::/32
2001:db8:1::/48
1.2.3.4
10.0.0.1/8
not-an-address
"""
    parsed = read_list(text.splitlines())
    assert parsed.errors == (
        (14, "'10.0.0.1/8' has host bits set; write the network address"),
        (15, "'not-an-address' is not an IPv4/IPv6 address or network"),
    )
    assert parsed.entries == 9
    assert list(parsed.content.networks()) == [
        "1.2.3.4/32",
        "10.0.0.0/8",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.9/32",
        "2001:db8::/32",
    ], "duplicates and covered entries are gone; the mapped address is IPv4"
    again = ListContent.from_bytes(parsed.content.to_bytes())
    assert again == parsed.content and again.version == parsed.content.version
    with pytest.raises(ValueError, match="format"):
        ListContent.from_bytes(parsed.content.to_bytes()[:-1])


def test_the_difference_of_two_versions_is_what_changed():
    old = content("192.0.2.1", "192.0.2.2", "2001:db8::1")
    new = content("192.0.2.2", "192.0.2.3", "2001:db8::2")
    assert difference(old, new) == (
        ["192.0.2.3/32", "2001:db8::2/128"],
        ["192.0.2.1/32", "2001:db8::1/128"],
    )
    assert difference(new, new) == ([], [])


# --- through a worker -----------------------------------------------------------------------


def test_a_list_is_loaded_then_only_its_change_is_applied(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    first = producer.load_list("feed", content("192.0.2.1", "192.0.2.2", "198.51.100.0/24"))
    worker.run(burst=True)
    assert held(worker, "feed") == {"192.0.2.1/32", "192.0.2.2/32", "198.51.100.0/24"}
    assert result(producer, first).status.value == "applied"
    assert result(producer, first).detail == "loaded 3 entries"

    second = producer.load_list("feed", content("192.0.2.2", "198.51.100.0/24", "2001:db8::/48"))
    worker.run(burst=True)
    assert held(worker, "feed") == {"192.0.2.2/32", "198.51.100.0/24", "2001:db8::/48"}
    assert result(producer, second).detail == "1 added, 1 removed: 3 entries"

    same = producer.load_list("feed", content("192.0.2.2", "198.51.100.0/24", "2001:db8::/48"))
    worker.run(burst=True)
    assert (result(producer, same).status.value, result(producer, same).detail) == (
        "unchanged",
        "3 entries held already",
    )
    [record] = producer.lists()
    assert (record.name, record.size, record.id) == ("feed", 3, same)
    beat = {h.host: h for h in producer.hosts()}["h1"]
    assert beat.lists["feed"].version == record.version and beat.lists["feed"].entries == 3
    assert len(worker.backend.committed()) == 0, "a list is not single rules"


def test_a_drop_list_never_covers_a_protected_network_or_goes_wider_than_the_bounds(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server, protect="203.0.113.0/28")
    worker.setup()
    cmd = producer.load_list(
        "wide",
        content("127.0.0.0/8", "203.0.113.0/24", "128.0.0.0/2", "192.0.2.7", "2001:db8::/32"),
    )
    worker.run(burst=True)
    assert held(worker, "wide") == {"192.0.2.7/32", "2001:db8::/32"}
    res = result(producer, cmd)
    assert res.status.value == "applied"
    assert res.detail.startswith(
        "loaded 2 entries; 3 entries refused: 128.0.0.0/2 is wider than /8"
    )
    beat = {h.host: h for h in producer.hosts()}["h1"]
    assert (beat.lists["wide"].entries, beat.lists["wide"].refused) == (2, 3)


def test_a_new_list_past_the_hosts_cap_is_rejected_naming_the_cap(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server, max_lists="2")
    worker.setup()
    for name, address in (("one", "192.0.2.1"), ("two", "192.0.2.2")):
        producer.load_list(name, content(address))
    third = producer.load_list("three", content("192.0.2.3"))
    worker.run(burst=True)
    res = result(producer, third)
    assert res.status.value == "rejected"
    assert "max_lists 2" in res.detail
    assert held(worker, "three") is None
    assert held(worker, "one") == {"192.0.2.1/32"} and held(worker, "two") == {"192.0.2.2/32"}

    again = producer.load_list("two", content("192.0.2.2", "192.0.2.4"))
    worker.run(burst=True)
    assert result(producer, again).status.value == "applied", "a held list may change"
    producer.delete_list("one")
    fourth = producer.load_list("three", content("192.0.2.3"))
    worker.run(burst=True)
    assert result(producer, fourth).status.value == "applied", "room again after a delete"
    assert held(worker, "three") == {"192.0.2.3/32"}


def test_a_list_for_other_hosts_is_not_loaded_and_a_delete_removes_it(
    r: Any, redis_server: RedisServer, producer: Producer
):
    web, db = (
        memory_worker(redis_server, "web1", host_labels="web"),
        memory_worker(redis_server, "db1"),
    )
    for worker in (web, db):
        worker.setup()
    producer.load_list("webonly", content("192.0.2.9"), target=["web"])
    for worker in (web, db):
        worker.run(burst=True)
    assert held(web, "webonly") == {"192.0.2.9/32"} and held(db, "webonly") is None

    gone = producer.delete_list("webonly")
    for worker in (web, db):
        worker.run(burst=True)
    assert held(web, "webonly") is None
    assert result(producer, gone, "web1").detail == "removed"
    assert result(producer, gone, "db1").status.value == "unchanged"
    assert producer.lists() == []


def test_a_restarted_worker_holds_the_ledgers_lists_and_drops_those_it_no_longer_should(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    producer.load_list("keep", content("192.0.2.1"))
    producer.load_list("drop", content("192.0.2.2"))
    worker.run(burst=True)
    kernel = worker.backend
    assert isinstance(kernel, MemoryBackend) and kernel.list_names() == {"keep", "drop"}

    # while the host is away: one list changes, one is removed, one is new
    producer.load_list("keep", content("192.0.2.1", "192.0.2.3"))
    producer.delete_list("drop")
    producer.load_list("new", content("198.51.100.0/24"))
    assert worker.ledger.fold_new() == 3  # another host's worker folds them
    r.xtrim(CMD, maxlen=0)  # and the stream is trimmed: only the ledger tells

    back = memory_worker(redis_server, backend=kernel)  # a new process, the same kernel
    back.setup()
    assert kernel.list_names() == {"keep", "new"}
    assert held(back, "keep") == {"192.0.2.1/32", "192.0.2.3/32"}


def test_a_timed_list_ends_at_its_expiry(r: Any, redis_server: RedisServer, producer: Producer):
    worker = memory_worker(redis_server)
    worker.setup()
    cmd = producer.load_list("brief", content("192.0.2.5"), ttl_s=1)
    worker.run(burst=True)
    assert held(worker, "brief") == {"192.0.2.5/32"}
    expires_ms = int(cmd.split("-")[0]) + 1000
    wait_for(lambda: worker.applier.clock.now_ms() > expires_ms, 5, "the list's expiry")
    worker.run(burst=True)
    assert held(worker, "brief") is None
    assert producer.lists() == []
    late = memory_worker(redis_server, "h2")
    late.setup()
    assert held(late, "brief") is None, "reconcile does not bring an expired list back"


def test_an_older_command_whose_content_expired_is_superseded(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    old = producer.load_list("feed", content("192.0.2.1"))
    new = producer.load_list("feed", content("192.0.2.2"))
    worker.ledger.fold_new()
    old_version = content("192.0.2.1").version
    assert 0 < r.pttl(f"{{pushfw}}:list:feed:{old_version}") <= 3_600_000
    r.delete(f"{{pushfw}}:list:feed:{old_version}")  # the grace period has passed
    worker.run(burst=True)
    assert result(producer, old).detail == f"superseded by newer command {new}"
    assert held(worker, "feed") == {"192.0.2.2/32"}
    assert r.pttl(f"{{pushfw}}:list:feed:{content('192.0.2.2').version}") == -1


def test_bad_list_commands_are_rejected_and_the_worker_goes_on(
    r: Any, redis_server: RedisServer, producer: Producer
):
    worker = memory_worker(redis_server)
    worker.setup()
    version = content("192.0.2.1").version
    bad = {  # a malformed command is rejected; a list not (yet) in Redis is a failure
        r.xadd(CMD, {"op": "list.load", "name": "Feed!", "version": version}).decode(): (
            "rejected",
            "name: 'Feed!' is not a list name (a lower-case letter, then up to 15 letters,"
            " digits or _)",
        ),
        r.xadd(CMD, {"op": "list.load", "name": "feed"}).decode(): (
            "rejected",
            "version: is missing (list.load names the content it loads)",
        ),
        r.xadd(CMD, {"op": "list.load", "name": "feed", "version": "0" * 32}).decode(): (
            "failed",
            "version 00000000000000000000000000000000 of list feed is not in Redis;"
            " import the list again",
        ),
        r.xadd(CMD, {"op": "list.burn", "name": "feed"}).decode(): (
            "rejected",
            "op: Input should be 'list.load' or 'list.delete'",
        ),
    }
    r.set(f"{{pushfw}}:list:forged:{version}", content("192.0.2.66").to_bytes())
    forged = r.xadd(
        CMD, {"op": "list.load", "name": "forged", "version": version, "size": "1"}
    ).decode()
    fine = producer.drop("192.0.2.50")
    worker.run(burst=True)
    for cmd_id, answer in bad.items():
        res = result(producer, cmd_id)
        assert (res.status.value, res.detail) == answer
    forged_result = result(producer, forged)
    assert forged_result.status.value == "rejected"
    assert "hashes to" in forged_result.detail, "a content that is not its version is refused"
    assert held(worker, "forged") is None
    assert result(producer, fine).status.value == "applied"


def test_a_host_that_requires_signatures_takes_only_signed_lists(r: Any, redis_server: RedisServer):
    worker = memory_worker(redis_server, hmac_key="k" * 32, require_signature=True)
    worker.setup()
    unsigned = Producer.from_url(redis_server.url)
    signed = Producer.from_url(redis_server.url, hmac_key="k" * 32)
    refused = unsigned.load_list("feed", content("192.0.2.1"))
    taken = signed.load_list("signed", content("192.0.2.2"))
    worker.run(burst=True)
    assert result(signed, refused).detail == "sig: missing"
    assert held(worker, "signed") == {"192.0.2.2/32"} and held(worker, "feed") is None
    later = memory_worker(redis_server, "h2", hmac_key="k" * 32, require_signature=True)
    later.setup()
    assert held(later, "signed") == {"192.0.2.2/32"} and held(later, "feed") is None
    del taken


def test_reading_a_million_entry_list_is_quick_enough_to_print(capsys: Any):
    """Not a timed assertion: the figure is printed for the reader (see bench/ for targets)."""
    lines = [f"{10 + i // 65536 % 200}.{i // 256 % 256}.{i % 256}.0/24" for i in range(200_000)]
    started = time.perf_counter()
    parsed = read_list(lines)
    elapsed = time.perf_counter() - started
    assert parsed.content.size == 200_000 and not parsed.errors
    print(f"\nread 200,000 entries in {elapsed:.2f} s")


# --- the CLI --------------------------------------------------------------------------------


def test_pushfw_import_and_lists_as_an_operator_uses_them(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Any, tmp_path: Any
):
    worker = memory_worker(redis_server, "web1")
    worker.setup()
    netset = tmp_path / "firehol_level1.netset"
    netset.write_text("# FireHOL level 1\n192.0.2.0/24\n198.51.100.7\n198.51.100.7\n")
    sent = pushfw("import", str(netset), "--ttl", "2d", "--reason", "firehol")
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.startswith("list firehol_level1: 2 entries (version ")
    assert "1 duplicate or covered, 0 invalid lines skipped" in sent.stderr
    worker.run(burst=True)
    assert held(worker, "firehol_level1") == {"192.0.2.0/24", "198.51.100.7/32"}
    worker.heartbeat()

    shown = pushfw("lists")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split() == [
        "NAME",
        "ACTION",
        "ENTRIES",
        "VERSION",
        "HOSTS",
        "HITS",
        "EXPIRES_IN",
        "TARGET",
        "SET_AT_UTC",
        "REASON",
    ]
    # HITS: no count read (the memory backend keeps none), not a count of 0
    assert row.split()[:6] == ["firehol_level1", "drop", "2", row.split()[3], "1/1", "-"]
    assert "1d 23h" in row
    as_json = json.loads(pushfw("lists", "--json").stdout)
    assert as_json[0]["hosts"] == ["web1"] and len(as_json[0]["version"]) == 32
    assert as_json[0]["hits"] is None and as_json[0]["hit_bytes"] is None
    [host] = json.loads(pushfw("status", "--json").stdout)
    assert host["lists"] == {
        "firehol_level1": {"version": as_json[0]["version"], "entries": 2, "refused": 0}
    }

    bad = tmp_path / "bad.txt"
    bad.write_text("192.0.2.1\n192.0.2.300\n10.0.0.1/8\n")
    refused = pushfw("import", str(bad), "--name", "bad")
    assert refused.returncode == 2
    assert f"{bad}:2: '192.0.2.300' is not an IPv4/IPv6 address or network" in refused.stderr
    assert "2 lines of" in refused.stderr and "nothing sent" in refused.stderr
    skipped = pushfw("import", str(bad), "--name", "bad", "--skip-invalid", "--json")
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)[0]["invalid_lines"] == 2

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing today\n")
    assert pushfw("import", str(empty)).returncode == 2, "an empty feed lifts no bans"
    assert "holds no entries" in pushfw("import", str(empty)).stderr
    assert pushfw("import", str(netset), "--name", "Bad-Name").returncode == 2

    removal = pushfw("lists", "remove", "firehol_level1")
    assert removal.returncode == 0, removal.stderr
    worker.run(burst=True)
    assert held(worker, "firehol_level1") is None
    assert "firehol_level1" not in pushfw("lists").stdout
    unknown = pushfw("lists", "remove", "firehol_level1")
    assert unknown.returncode == 2 and "no list 'firehol_level1' is active" in unknown.stderr


# --- item 6: an import never silently loses protection -------------------------------------


def test_item6_a_wide_entry_is_an_invalid_line_and_prunes_nothing_under_it(
    r: Any, redis_server: RedisServer, producer: Producer, pushfw: Any, tmp_path: Any
):
    """``0.0.0.0/0`` in a feed used to be kept and to cover (so remove) every other IPv4
    entry, then be refused by every host: the whole IPv4 part went unenforced."""
    worker = memory_worker(redis_server)
    worker.setup()
    feed = tmp_path / "feed.netset"
    under = [f"198.18.{i}.0/24" for i in range(40)]
    feed.write_text(
        "# a feed with entries no host takes\n0.0.0.0/0\n"
        + "\n".join(under)
        + "\n127.0.0.1\n::/0\n2001:db8::/32\n"
    )
    refused = pushfw("import", str(feed))
    assert refused.returncode == 2
    assert f"{feed}:2: 0.0.0.0/0 is wider than /8, the widest network a drop may cover" in (
        refused.stderr
    )
    assert f"{feed}:43: 127.0.0.1/32 covers loopback, which no host drops" in refused.stderr
    assert f"{feed}:44: ::/0 is wider than /16" in refused.stderr
    assert "3 lines of" in refused.stderr and "nothing sent" in refused.stderr
    assert r.xlen(CMD) == 0

    sent = pushfw("import", str(feed), "--skip-invalid", "--json")
    assert sent.returncode == 0, sent.stderr
    assert f"{feed}:2: 0.0.0.0/0 is wider than /8" in sent.stderr, "skipped, but named"
    [summary] = json.loads(sent.stdout)
    assert (summary["entries"], summary["duplicates_or_covered"], summary["invalid_lines"]) == (
        41,
        0,
        3,
    )
    worker.run(burst=True)
    assert held(worker, "feed") == {*under, "2001:db8::/32"}, "nothing under 0.0.0.0/0 is lost"
    [record] = producer.lists()
    beat = {h.host: h for h in producer.hosts()}["h1"]
    assert (beat.lists["feed"].entries, beat.lists["feed"].refused) == (41, 0)
    assert record.size == 41

    allow = tmp_path / "allow.txt"
    allow.write_text("0.0.0.0/0\n127.0.0.1\n")
    wide_accept = pushfw("import", str(allow), "--action", "accept")
    assert wide_accept.returncode == 2
    assert f"{allow}:1: 0.0.0.0/0 is wider than /8, the widest network an accept" in (
        wide_accept.stderr
    )
    assert ":2:" not in wide_accept.stderr, "an accept of loopback is no drop of it"


def test_item6_a_drop_list_over_private_space_is_warned_about_unless_protected(
    r: Any, pushfw: Any, tmp_path: Any
):
    """FireHOL level1 carries RFC 1918: a VPC's own peers would be dropped."""
    level1 = tmp_path / "firehol_level1.netset"
    level1.write_text(
        "0.0.0.0/8\n10.0.0.0/8\n100.64.0.0/10\n169.254.0.0/16\n192.168.0.0/16\n"
        "198.51.100.0/24\nfe80::/64\n"
    )
    warned = pushfw("import", str(level1))
    assert warned.returncode == 0, warned.stderr
    assert (
        "warning: list firehol_level1: 5 entries drop private, CGNAT or link-local space: "
        "10.0.0.0/8 (RFC 1918), 192.168.0.0/16 (RFC 1918), 100.64.0.0/10 (CGNAT), "
        "169.254.0.0/16 (link-local), fe80::/10 (link-local)."
    ) in warned.stderr
    assert "set protect on every host first" in warned.stderr

    partly = pushfw("import", str(level1), "--protect", "10.1.0.0/16,100.64.0.0/10")
    [local] = [line for line in partly.stderr.splitlines() if "private, CGNAT" in line]
    assert "4 entries drop" in local, "a /16 of 10/8 protected: the rest is dropped"
    assert "100.64.0.0/10" not in local
    assert "refuse" not in partly.stderr, "what hosts refuse covers nothing else of the file"

    protect = "10.0.0.0/8, 192.168.0.0/16,100.64.0.0/10,169.254.0.0/16,fe80::/10"
    quiet = pushfw("import", str(level1), env={"PUSHFW_PROTECT": protect})
    assert quiet.returncode == 0, quiet.stderr
    assert "warning" not in quiet.stderr, "the hosts' protect setting covers it all"

    allow = tmp_path / "partners.txt"
    allow.write_text("10.0.0.0/8\n")
    assert "warning" not in pushfw("import", str(allow), "--action", "accept").stderr
    bad = pushfw("import", str(level1), "--protect", "10.0.0.1/8")
    assert bad.returncode == 2 and "--protect" in bad.stderr


def test_item6_entries_the_protect_setting_refuses_are_named_with_what_they_cover(
    r: Any, redis_server: RedisServer, pushfw: Any, tmp_path: Any
):
    """A host that protects part of a wide entry refuses it, and holds none of the entries
    of the file that entry covered (the importer removed them): the import says so."""
    worker = memory_worker(redis_server, protect="10.1.0.0/16")
    worker.setup()
    feed = tmp_path / "feed.txt"
    feed.write_text("10.0.0.0/8\n10.2.0.0/16\n10.3.3.3\n10.3.3.3\n198.51.100.0/24\n")
    sent = pushfw("import", str(feed), "--protect", "10.1.0.0/16")
    assert sent.returncode == 0, sent.stderr
    assert (
        "warning: list feed: hosts with the protect setting --protect refuse 1 entry, and so "
        "lack the 2 entries of the file under them: 10.0.0.0/8 overlaps 10.1.0.0/16 "
        "and covers 2 entries; remove them from the file to send what they cover"
    ) in sent.stderr
    worker.run(burst=True)
    assert held(worker, "feed") == {"198.51.100.0/24"}, "what the warning said"

    feed.write_text("10.2.0.0/16\n10.3.3.3\n198.51.100.0/24\n")
    fixed = pushfw("import", str(feed), "--protect", "10.1.0.0/16")
    assert "refuse" not in fixed.stderr
    worker.run(burst=True)
    assert held(worker, "feed") == {"10.2.0.0/16", "10.3.3.3/32", "198.51.100.0/24"}
