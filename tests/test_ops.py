"""The op registry (``producer/ops.py``): each op's row is what the parsers and the CLI do."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis

from pushfw.producer.contract import CommandRejected, parse_command
from pushfw.producer.lists import ListOp, is_list_entry, parse_list_command
from pushfw.producer.ops import OPS, Op, OpSpec
from pushfw.producer.wire import read_command
from tests.conftest import Run

RULE_OPS = [spec for spec in OPS.values() if spec.kind == "rule"]
VERBS = [spec for spec in RULE_OPS if spec.verb]
VERSION = "0" * 32


def test_every_op_has_a_row() -> None:
    assert {*Op, *ListOp} == set(OPS)
    assert {spec.op for spec in OPS.values() if spec.kind == "list"} == set(ListOp)


@pytest.mark.parametrize("spec", RULE_OPS, ids=lambda s: s.op)
@pytest.mark.parametrize("ttl", [None, "60"])
def test_a_rule_op_is_parsed_as_its_row_says(spec: OpSpec, ttl: str | None) -> None:
    fields = {"op": spec.op, "ip": "192.0.2.1"} | ({"ttl": ttl} if ttl else {})
    wire = {k.encode(): v.encode() for k, v in fields.items()}
    ok = spec.takes_ttl if ttl else spec.ttl != "required"
    if not ok:
        with pytest.raises(CommandRejected, match="ttl: op"):
            parse_command(fields)
        with pytest.raises(CommandRejected, match="ttl: op"):
            read_command(wire)
        return
    for cmd in (parse_command(fields), read_command(wire)):
        assert (cmd.action, cmd.is_insert, cmd.ttl_s) == (
            spec.action,
            spec.insert,
            int(ttl) if ttl else None,
        )


@pytest.mark.parametrize("op", list(ListOp))
@pytest.mark.parametrize("ttl", [None, "60"])
def test_a_list_op_is_parsed_as_its_row_says(op: ListOp, ttl: str | None) -> None:
    spec = OPS[op]
    fields = {"op": op.upper(), "name": "blocks", "version": VERSION}
    fields |= {"ttl": ttl} if ttl else {}
    assert is_list_entry({k.encode(): v.encode() for k, v in fields.items()})
    if ttl and not spec.takes_ttl:
        with pytest.raises(CommandRejected, match=f"ttl: {op} takes no ttl"):
            parse_list_command(fields)
        return
    cmd = parse_list_command(fields)
    assert (cmd.op, cmd.is_insert) == (op, spec.insert)


@pytest.mark.parametrize("spec", VERBS, ids=lambda s: s.verb)
def test_each_verb_of_the_cli_sends_the_op_of_its_row(
    spec: OpSpec, pushfw: Run, r: redis.Redis
) -> None:
    ttl = ["--ttl", "10m"] if spec.takes_ttl else []
    proc = pushfw(spec.verb, "192.0.2.7", *ttl)
    assert proc.returncode == 0, proc.stderr
    [(entry_id, fields)] = cast(list[Any], r.xrange("{pushfw}:cmd"))
    assert entry_id.decode() == proc.stdout.strip()
    assert fields[b"op"].decode() == spec.op
    assert (b"ttl" in fields) == spec.takes_ttl
