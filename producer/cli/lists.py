"""The commands on named lists: ``import`` (a blocklist file, stored once and sent as one
command, with warnings about what the hosts will refuse), ``lists`` (each list, who holds
it, its hits) and ``lists remove``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pushfw.producer.cli.params import Duration, targets, wait_options
from pushfw.producer.cli.rules import warn_unfolded
from pushfw.producer.cli.wait import echo_sent, wait
from pushfw.producer.client import Producer, is_live, reaches
from pushfw.producer.contract import Action, CommandRejected, Network, parse_network
from pushfw.producer.lists import (
    LIST_NAME,
    ListContent,
    ListFile,
    list_name_for,
    local_space,
    read_list,
    refused_with,
)
from pushfw.producer.records import HostStatus, ListHits, ListRecord
from pushfw.producer.render import as_json, entry_ms, expires_in, listing, plural

_IMPORT_ERRORS_SHOWN = 5


@click.command(name="import")
@click.argument("file", type=click.File("r", encoding="utf-8", errors="replace"))
@click.option(
    "--name", default=None, help="The list's name [from FILE's name; required for stdin]."
)
@click.option(
    "--action",
    type=click.Choice([a.value for a in Action]),
    default="drop",
    show_default=True,
    help="What every entry of the list does on the hosts (watch: count only, shadow mode).",
)
@click.option("--ttl", type=Duration(), default=None, help="Lifetime of the whole list (2d).")
@click.option("--reason", default="", help="Free text kept with the list.")
@click.option("--target", default="*", help="Host names or labels, comma-separated.")
@click.option("--skip-invalid", is_flag=True, help="Import the valid lines, report the others.")
@click.option(
    "--protect",
    envvar="PUSHFW_PROTECT",
    show_envvar=True,
    default="",
    help="The hosts' protect setting (networks, comma-separated): private, CGNAT and "
    "link-local space a drop list covers outside it is warned about.",
)
@wait_options(timeout="60")
@click.pass_obj
def import_list(producer: Producer, /, file: Any, **opts: Any) -> None:
    """Import a blocklist FILE (- for stdin) as one named list on every targeted host.

    One address or network per line; '#' and ';' start comments (FireHOL netsets, Spamhaus
    DROP text and JSON files read as they are). The list is stored once in Redis and sent
    as one command; importing a changed file again sends each host only the difference.
    """
    name = _import_name(file, opts["name"])
    action = Action(opts["action"])
    protect = _networks(opts["protect"], "--protect")
    parsed = _read_import(file, name, action, opts["skip_invalid"])
    target = targets(opts["target"])
    try:
        cmd_id = producer.load_list(
            name,
            parsed.content,
            action=opts["action"],
            ttl_s=opts["ttl"],
            target=target,
            reason=opts["reason"],
            reply=opts["wait"],
        )
    except CommandRejected as exc:
        raise click.UsageError(str(exc)) from None
    _echo_imported(cmd_id, name, parsed, opts)
    if action is Action.DROP:
        _warn_local_space(name, parsed.content, protect)
        _warn_protected(name, parsed, protect)
    if opts["wait"]:
        wait(producer, cmd_id, target, opts)


def _import_name(file: Any, name: str | None) -> str:
    """``--name``, else one made from the file's name; a usage error if not a list name."""
    if file.name == "<stdin>" and not name:
        # A default name for stdin would let two cron jobs replace each other's list.
        raise click.UsageError("a list read from stdin (-) needs --name")
    name = name or list_name_for(Path(file.name).name)
    if not LIST_NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r}: a lower-case letter, then up to 15 letters, digits or _",
            param_hint="--name",
        )
    return name


def _echo_imported(cmd_id: str, name: str, parsed: ListFile, opts: dict[str, Any]) -> None:
    """The command id (JSON: a summary, unless --wait prints the results instead), and on
    stderr what the list holds and what was left out."""
    left_out = parsed.entries - parsed.content.size
    summary = {
        "cmd": cmd_id,
        "name": name,
        "version": parsed.content.version,
        "entries": parsed.content.size,
        "duplicates_or_covered": left_out,
        "invalid_lines": len(parsed.errors),
    }
    if not opts["json_out"] or not opts["wait"]:
        click.echo(as_json([summary]) if opts["json_out"] else cmd_id)
    if not opts["json_out"]:
        click.echo(
            f"list {name}: {plural(parsed.content.size, 'entry', 'entries')} "
            f"(version {parsed.content.version[:12]}; {left_out} duplicate or covered, "
            f"{plural(len(parsed.errors), 'invalid line')} skipped)",
            err=True,
        )


def _read_import(file: Any, name: str, action: Action, skip_invalid: bool) -> ListFile:
    """The list in ``file``, its bad lines named; a usage error (exit 2, bad input) if it
    must not be sent."""
    try:
        parsed = read_list(file, action)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for number, why in parsed.errors[:_IMPORT_ERRORS_SHOWN]:
        click.echo(f"{file.name}:{number}: {why}", err=True)
    if parsed.errors and not skip_invalid:
        raise click.UsageError(
            f"{plural(len(parsed.errors), 'line')} of {file.name} not understood or refused "
            "by every host; nothing sent (fix them, or pass --skip-invalid to import the rest)"
        )
    if parsed.content.size == 0:
        raise click.UsageError(
            f"{file.name} holds no entries; nothing sent (to remove list {name}: "
            f"pushfw lists remove {name})"
        )
    return parsed


def _networks(text: str, option: str) -> list[Network]:
    try:
        return [parse_network(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _warn_local_space(name: str, content: ListContent, protect: list[Network]) -> None:
    """A drop list over a VPC's or a cluster's own space cuts the hosts off their peers."""
    ranges, count = local_space(content, protect)
    if ranges:
        click.echo(
            f"warning: list {name}: {plural(count, 'entry', 'entries')} drop private, CGNAT "
            f"or link-local space: {', '.join(ranges)}. Hosts whose peers live there lose "
            "them unless their protect setting covers those peers (set protect on every "
            "host first, and pass it here as --protect or PUSHFW_PROTECT)",
            err=True,
        )


def _warn_protected(name: str, parsed: ListFile, protect: list[Network]) -> None:
    """Entries the hosts refuse that cover others: those are lost with them, never silently.
    (Refused entries that cover nothing are named in the hosts' results.)"""
    refused = [(entry, net, n) for entry, net, n in refused_with(parsed, protect) if n]
    if not refused:
        return
    shown = [
        f"{entry} overlaps {net} and covers {plural(n, 'entry', 'entries')}"
        for entry, net, n in refused[:_IMPORT_ERRORS_SHOWN]
    ]
    if len(refused) > _IMPORT_ERRORS_SHOWN:
        shown.append(f"{len(refused) - _IMPORT_ERRORS_SHOWN} more")
    under = sum(n for _, _, n in refused)
    click.echo(
        f"warning: list {name}: hosts with the protect setting --protect refuse "
        f"{plural(len(refused), 'entry', 'entries')}, and so lack the "
        f"{plural(under, 'entry', 'entries')} of the file under them: {', '.join(shown)}; "
        "remove them from the file to send what they cover",
        err=True,
    )


_LISTS_COLUMNS = [
    "name",
    "action",
    "entries",
    "version",
    "hosts",
    "hits",
    "expires_in",
    "target",
    "set_at",
    "reason",
]


@click.group(name="lists", invoke_without_command=True)
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_context
def lists_group(ctx: click.Context, json_out: bool) -> None:
    """Named lists: each with its version, size, the hosts that hold that version, and the
    packets its entries matched (HITS, summed over the last reading of every host it
    targets, live or not; per entry: pushfw list --hits --list NAME)."""
    if ctx.invoked_subcommand is not None:
        return
    producer: Producer = ctx.obj
    now_ms = producer.now_ms()
    known = producer.hosts()
    live = [h for h in known if is_live(h, now_ms)]
    counted = producer.list_hits(h.host for h in known)
    rows = [
        _list_row(rec, now_ms, live, _hits_of(rec, known, counted), json_out)
        for rec in producer.lists()
    ]
    click.echo(listing(rows, _LISTS_COLUMNS, json_out))
    if not json_out:
        click.echo(
            f"{plural(len(rows), 'list')}; HOSTS: live hosts holding that version"
            " / live hosts it targets; HITS: packets its entries matched on the hosts"
            " it targets (read once a minute)",
            err=True,
        )
    warn_unfolded(producer)


def _hits_of(
    rec: ListRecord, known: list[HostStatus], counted: dict[str, dict[str, ListHits]]
) -> list[ListHits]:
    """The last counts of list ``rec`` from every host it targets, live or not, read since
    its newest command."""
    return [
        c[rec.name]
        for h in known
        if reaches(rec.target, h) and rec.name in (c := counted[h.host])
        if rec.counted_by(c[rec.name])
    ]


def _list_row(
    rec: ListRecord, now_ms: int, live: list[HostStatus], hits: list[ListHits], json_out: bool
) -> dict[str, object]:
    """One row of ``pushfw lists``: HOSTS counts the live hosts it targets that hold its
    version (JSON: names them); HITS sums ``hits``."""
    reached = [h for h in live if reaches(rec.target, h)]
    holding = sorted(h.host for h in reached if _holds(h, rec))
    packets = sum(h.packets for h in hits) if hits else None
    row: dict[str, object] = {"name": rec.name, "action": rec.action, "entries": rec.size}
    if json_out:
        row["version"] = rec.version
        row["hosts"] = holding
        row["hits"] = packets
        row["hit_bytes"] = sum(h.bytes for h in hits) if hits else None
    else:
        row["version"] = rec.version[:12]
        row["hosts"] = f"{len(holding)}/{len(reached)}"
        row["hits"] = "-" if packets is None else packets
    return row | {
        "expires_in": expires_in(rec.expires_ms, now_ms, json_out),
        "expires_at": rec.expires_ms,
        "target": ",".join(rec.target) or "*",
        "set_at": entry_ms(rec.id),
        "reason": rec.reason,
    }


def _holds(host: HostStatus, rec: ListRecord) -> bool:
    """The host's heartbeat says it holds the list's current version."""
    held = host.lists.get(rec.name)
    return held is not None and held.version == rec.version


@lists_group.command(name="remove")
@click.argument("name")
@wait_options()
@click.pass_obj
def lists_remove(producer: Producer, /, name: str, **opts: Any) -> None:
    """Remove list NAME from every host that holds it."""
    known = {rec.name: rec for rec in producer.lists()}
    if name not in known:
        raise click.UsageError(
            f"no list {name!r} is active"
            + (f" (lists: {', '.join(sorted(known))})" if known else "")
        )
    cmd_id = producer.delete_list(name, reply=opts["wait"])
    if not opts["wait"]:
        echo_sent(cmd_id, opts["json_out"])
        return
    wait(producer, cmd_id, list(known[name].target), opts)


COMMANDS: list[click.Command] = [import_list, lists_group]
"""The commands of this module, for the root group."""
