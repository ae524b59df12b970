"""The commands that read what the hosts did: ``status`` (each host's health, or
``--check``: one Nagios line), ``results``, ``dead`` (dead letters) and ``why`` (what
covers an address, and each host's part)."""

from __future__ import annotations

import json
import re
import sys

import click
import redis

import pushfw.producer.why as explain_why
from pushfw.producer.check import Check, Severity, check, host_state
from pushfw.producer.cli.wait import no_hosts, result_rows
from pushfw.producer.client import Producer, is_live
from pushfw.producer.records import HostStatus
from pushfw.producer.render import ago, entry_ms, listing, span, when

_STATUS_COLUMNS = [
    "host",
    "state",
    "last_seen",
    "rules",
    "lag",
    "pending",
    "reads",
    "backend",
    "labels",
    "version",
    "up",
]


@click.command()
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.option(
    "--check",
    "check_mode",
    is_flag=True,
    help="One line and a Nagios exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
)
@click.option(
    "--host",
    "wanted",
    multiple=True,
    help="With --check: this host must be there and healthy (repeatable) [every host].",
)
@click.pass_obj
def status(producer: Producer, json_out: bool, check_mode: bool, wanted: tuple[str, ...]) -> None:
    """Hosts and their health; a host that missed three heartbeats is STALE."""
    if check_mode or wanted:
        _check(producer, json_out, check_mode, wanted)
    now_ms = producer.now_ms()
    hosts = producer.hosts()
    if not hosts and not json_out:
        click.echo(no_hosts(producer), err=True)
        _warn_ahead(producer)
        return
    rows = [_json_row(h, now_ms) if json_out else _table_row(h, now_ms) for h in hosts]
    click.echo(listing(rows, _STATUS_COLUMNS, json_out))
    if not json_out:
        for h in hosts:
            for problem in h.problems:
                click.echo(f"warning: {h.host}: {problem}", err=True)
        _warn_ahead(producer)


def _up_ms(h: HostStatus, now_ms: int) -> int:
    """How long the worker has run: a stopped or silent one until its last heartbeat."""
    return (now_ms if is_live(h, now_ms) else h.last_seen_ms) - h.started_ms


def _table_row(h: HostStatus, now_ms: int) -> dict[str, object]:
    """A host as ``status`` shows it: times as ``4m 2s ago`` and ``3h 12m``."""
    return {
        "host": h.host,
        "state": host_state(h, now_ms),
        "last_seen": ago(now_ms - h.last_seen_ms),
        "rules": h.rules,
        "lag": "-" if h.lag is None else h.lag,
        "pending": h.pending,
        "reads": h.reads,
        "backend": h.backend,
        "labels": ",".join(h.labels),
        "version": h.version,
        "up": span(_up_ms(h, now_ms)),
    }


def _json_row(h: HostStatus, now_ms: int) -> dict[str, object]:
    """A host for scripts: every field of its heartbeat, points as ms, uptime in seconds."""
    return {
        "host": h.host,
        "state": host_state(h, now_ms),
        "last_seen": h.last_seen_ms,
        "started": h.started_ms,
        "rules": h.rules,
        "lag": h.lag,
        "pending": h.pending,
        "reads": h.reads,
        "backend": h.backend,
        "labels": h.labels,
        "version": h.version,
        "up": max(0, _up_ms(h, now_ms)) // 1000,
        "ledger_lost": h.ledger_lost,
        "instance": h.instance,
        "duplicate": h.duplicate,
        "problems": h.problems,
        "ids_ahead": h.ids_ahead,
        "lists": {n: held.model_dump() for n, held in h.lists.items()},
    }


def _check(producer: Producer, json_out: bool, check_mode: bool, wanted: tuple[str, ...]) -> None:
    """``status --check``: one line, and the worst host's severity as the exit status."""
    if json_out or not check_mode:
        raise click.UsageError("--check prints one line: no --json; --host goes with --check")
    try:
        result = check(producer.hosts(), producer.now_ms(), wanted)
    except (redis.RedisError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        result = Check(Severity.UNKNOWN, f"PUSHFW UNKNOWN: cannot read the hosts: {first}")
    click.echo(result.line)
    sys.exit(result.severity)


def _warn_ahead(producer: Producer) -> None:
    """Say so when producers chose entry ids ahead of Redis's clock (docs: security)."""
    ahead = producer.ids_ahead()
    if ahead is not None:
        click.echo(
            f"warning: {ahead.count} command(s) had ids ahead of Redis's clock, the newest "
            f"{ahead.max_id} ({ahead.max_ahead_ms / 1000:.1f} s ahead); their time is taken "
            "from when a worker first saw them. See docs/security.md, 'Producer-chosen entry ids'.",
            err=True,
        )


_newest = click.option(
    "--count",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Newest entries shown.",
)
"""``--count`` of ``results`` and ``dead``."""

_RESULT_COLUMNS = ["time", "host", "status", "cmd", "request_id", "detail"]
_ENTRY_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


@click.command()
@_newest
@click.option("--cmd", "cmd_id", default=None, help="Only results of this command id.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def results(producer: Producer, count: int, cmd_id: str | None, json_out: bool) -> None:
    """The newest results, newest first; with --cmd, every host's answer to that command.

    Hosts that wrote no result for it (it asked for none) show where their group stands:
    done, pending (read, being retried) or not read yet; a follower, done or not done.
    """
    if cmd_id is None:
        click.echo(listing(result_rows(producer.results(count)), _RESULT_COLUMNS, json_out))
        return
    if not _ENTRY_ID.fullmatch(cmd_id):
        raise click.BadParameter(f"{cmd_id!r} is not a stream entry id (like 1712345678901-0)")
    rows = result_rows(producer.results(count, cmd_id))
    answered = {row["host"] for row in rows}
    try:
        progress = producer.progress(cmd_id)
    except redis.exceptions.NoPermissionError:
        progress = {}  # a producer user may not read the groups: results alone then
    for host, where in sorted(progress.items()):
        if host not in answered:
            detail = "no result requested" if where == "done" else ""
            rows.append(
                {"time": "", "host": host, "status": where, "cmd": cmd_id, "detail": detail}
            )
    click.echo(listing(rows, _RESULT_COLUMNS, json_out))


@click.command()
@_newest
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def dead(producer: Producer, count: int, json_out: bool) -> None:
    """Commands a host gave up on, newest first."""
    rows: list[dict[str, object]] = [
        {
            "time": entry_ms(d.id),
            "host": d.host,
            "cmd": d.cmd,
            "op": d.fields.get("op", ""),
            "ip": d.fields.get("ip", ""),
            "deliveries": d.deliveries,
            "error": d.error,
            **({"fields": d.fields} if json_out else {}),
        }
        for d in producer.dead(count)
    ]
    columns = ["time", "host", "cmd", "op", "ip", "deliveries", "error"]
    click.echo(listing(rows, columns, json_out))


@click.command()
@click.argument("address")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def why(producer: Producer, address: str, json_out: bool) -> None:
    """Every rule and list entry covering ADDRESS, which one wins, and each host's part.

    Accept wins over drop. Per host: holds (carried out, no refusal reported), refused
    (with the host's reason), not targeted, or not yet. A host reports how many entries of
    a list it refused, not which: that count is shown with the list.
    """
    try:
        addr = explain_why.parse_address(address)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    answer = explain_why.why(producer, addr)
    if json_out:
        click.echo(json.dumps(explain_why.as_data(answer), indent=2))
    else:
        click.echo(explain_why.text(answer, span, when, producer.now_ms()))
    for problem in answer.problems:
        click.echo(f"warning: {problem}", err=True)


COMMANDS: list[click.Command] = [status, results, dead, why]
"""The commands of this module, for the root group."""
