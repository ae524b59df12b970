"""``--wait``: after a command is sent, wait for the hosts' results and turn them into an
exit status (3: too few or no live host, 4: rejected or failed, 5: a duplicate host),
naming from the heartbeats which hosts will not or did not answer."""

from __future__ import annotations

import sys
from typing import Any

import click
import redis

from pushfw.producer.check import host_state
from pushfw.producer.client import Producer, is_live, reaches
from pushfw.producer.contract import Result
from pushfw.producer.records import HostStatus
from pushfw.producer.render import as_json, entry_ms, listing, plural


def echo_sent(cmd_id: str, json_out: bool) -> None:
    """The id of a command sent without waiting: a line, or ``[{"cmd": ...}]``."""
    click.echo(as_json([{"cmd": cmd_id}]) if json_out else cmd_id)


def result_rows(results: list[Result]) -> list[dict[str, object]]:
    return [{"time": entry_ms(r.id) if r.id else "", **r.to_fields()} for r in results]


def wait(producer: Producer, cmd_id: str, target: list[str], opts: dict[str, Any]) -> None:
    """Wait for the results of ``cmd_id``, unless no live host is there to send one."""
    if opts["expect"] == 0:
        echo_sent(cmd_id, opts["json_out"])
        click.echo(
            f"pushfw: --expect 0: waited for no result (pushfw results --cmd {cmd_id})", err=True
        )
        return
    if (nobody := _nobody_answers(producer, target)) is not None:
        if opts["json_out"]:
            click.echo(as_json([]))
        click.echo(f"pushfw: sent {cmd_id}, but {nobody}", err=True)
        sys.exit(3)
    results = producer.wait(cmd_id, expect=opts["expect"], timeout_s=opts["timeout_s"])
    if results or opts["json_out"]:
        columns = ["host", "status", "detail", "cmd"]
        click.echo(listing(result_rows(results), columns, opts["json_out"]))
    if len(results) < opts["expect"]:
        expected = plural(opts["expect"], "result")
        silent = _silent_hosts(producer, target, results)
        click.echo(f"pushfw: {len(results)} of {expected} before the timeout{silent}", err=True)
    _exit_status(producer, target, results, opts["expect"])


def _exit_status(producer: Producer, target: list[str], results: list[Result], expect: int) -> None:
    """Exit 5 for a duplicate host, 3 for too few results, 4 for a refusal; else return."""
    twins = _twins(producer, target)
    for host in twins:
        click.echo(
            f"pushfw: {host} is DUPLICATE: two live workers share that host name and split "
            "its commands, so one result stands for one of them (pushfw status)",
            err=True,
        )
    if twins:
        sys.exit(5)
    if len(results) < expect:
        sys.exit(3)
    if any(r.status.value in ("rejected", "failed") for r in results):
        sys.exit(4)


def _silent_hosts(producer: Producer, target: list[str], results: list[Result]) -> str:
    """``; no result from web2 (STALE)``: the targeted hosts (by heartbeat) that did not
    answer, so a short count names who is missing."""
    try:
        hosts = producer.hosts()
    except redis.exceptions.NoPermissionError:
        return ""  # as _nobody_answers: this user may not read heartbeats
    now_ms = producer.now_ms()
    answered = {r.host for r in results}
    silent = [h for h in hosts if reaches(target, h) and h.host not in answered]
    if not silent:
        return "; no other targeted host is known (pushfw status)"
    named = [_known_host(h, now_ms) for h in silent[:_KNOWN_SHOWN]]
    if len(silent) > _KNOWN_SHOWN:
        named.append(f"and {len(silent) - _KNOWN_SHOWN} more (pushfw status)")
    return f"; no result from {', '.join(named)}"


def _twins(producer: Producer, target: list[str]) -> list[str]:
    """Live hosts of ``target`` that two workers beat under (``DUPLICATE`` in status)."""
    try:
        hosts = producer.hosts()
    except redis.exceptions.NoPermissionError:
        return []  # as _nobody_answers: this user may not read heartbeats
    now_ms = producer.now_ms()
    return [h.host for h in hosts if h.duplicate and is_live(h, now_ms) and reaches(target, h)]


_KNOWN_SHOWN = 10
"""Hosts named in the no-live-host line; a larger fleet is summed up with a count."""


def _nobody_answers(producer: Producer, target: list[str]) -> str | None:
    """Why no host will report on a command for ``target`` (None: a live host it reaches)."""
    try:
        hosts = producer.hosts()
    except redis.exceptions.NoPermissionError:
        return None  # an ACL that lets this user read results but not heartbeats: just wait
    now_ms = producer.now_ms()
    if any(is_live(h, now_ms) and reaches(target, h) for h in hosts):
        return None
    if not hosts:
        return no_hosts(producer)
    known = [_known_host(h, now_ms) for h in hosts[:_KNOWN_SHOWN]]
    if len(hosts) > _KNOWN_SHOWN:
        known.append(f"and {len(hosts) - _KNOWN_SHOWN} more (pushfw status)")
    names = ",".join(target) or "*"
    return f"no live host matches target '{names}'; known hosts: {', '.join(known)}"


def _known_host(h: HostStatus, now_ms: int) -> str:
    """``web1 [eu,web]``, ``db1 (stopped)``: a host's name, labels, and why it is not live."""
    labels = f" [{','.join(h.labels)}]" if h.labels else ""
    why = f" ({host_state(h, now_ms)})" if not is_live(h, now_ms) else ""
    return h.host + labels + why


def no_hosts(producer: Producer) -> str:
    """Why nothing answers on a Redis no worker has reported to."""
    return (
        f"no host has reported to {producer.keys.hosts} yet: "
        "is a pushfw-worker running against this Redis?"
    )
