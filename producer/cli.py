"""``pushfw``: push firewall commands and read what the hosts did with them."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import redis
from click.core import ParameterSource

import pushfw.producer.why as explain_why
from pushfw.producer import acl, functions
from pushfw.producer.check import Check, Severity, check, host_state
from pushfw.producer.client import Producer, forget_host, is_live, is_stale, reaches
from pushfw.producer.connection import parse_target
from pushfw.producer.contract import Action, CommandRejected, Network, Result, parse_network
from pushfw.producer.crowdsec import crowdsec_command
from pushfw.producer.duration import parse_duration
from pushfw.producer.keys import DEFAULT_PREFIX
from pushfw.producer.lists import (
    LIST_NAME,
    ListContent,
    ListFile,
    list_name_for,
    local_space,
    read_list,
    refused_by_default,
    refused_with,
)
from pushfw.producer.ops import OPS, OpSpec
from pushfw.producer.records import HostStatus
from pushfw.producer.render import as_json, as_table, plural
from pushfw.producer.selection import FEW, Selection, selection_options
from pushfw.producer.selection import rows as selection_rows


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


NEVER = 0
"""``--ttl never``: a permanent rule even where a default ttl is configured."""


class Ttl(Duration):
    """A duration, or ``never`` (:data:`NEVER`)."""

    name = "ttl"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, str) and value.strip().lower() == "never":
            return NEVER
        return super().convert(value, param, ctx)


def _drop_ttl(ttl: int | None) -> int | None:
    """A drop's ttl: ``--ttl``, else the group's ``--default-ttl``, else none (permanent)."""
    if ttl is None:
        default = click.get_current_context().find_root().params.get("default_ttl")
        return default if isinstance(default, int) else None
    return None if ttl == NEVER else ttl


def _when(entry_id: str) -> str:
    ms = int(entry_id.split("-", 1)[0])
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _entry_ms(entry_id: str) -> int:
    """When Redis stamped an entry: its id's milliseconds (a point, see :data:`_POINTS`)."""
    return int(entry_id.split("-", 1)[0])


def _result_rows(results: list[Result]) -> list[dict[str, object]]:
    return [{"time": _entry_ms(r.id) if r.id else "", **r.to_fields()} for r in results]


_POINTS = {
    "time": "time_ms",
    "set_at": "set_ms",
    "expires_at": "expires_ms",
    "last_seen": "last_seen_ms",
    "started": "started_ms",
    "read_at": "read_ms",
}
"""Row keys that hold a point in time as Redis epoch ms, and the key its ms keep in JSON.
JSON shows each as ISO 8601 UTC (:func:`.why.iso_ms`, as ``pushfw why``) beside its ms;
tables as ``2026-11-27 12:40:01`` under a ``..._UTC`` header. One format everywhere."""


_TABLE_UTC = ("time", "set_at")
"""The points tables show as dates (others, such as LAST_SEEN, show as ``4m 2s ago``)."""


def _times(row: dict[str, object], json_out: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in row.items():
        ms_key = _POINTS.get(key)
        if ms_key is None or not (value is None or type(value) is int):
            out[key] = value
            continue
        when = None if value is None else datetime.fromtimestamp(value / 1000, UTC)
        if json_out:
            out[key] = None if value is None else explain_why.iso_ms(value)
            out[ms_key] = value
        else:
            out[key] = "" if when is None else when.strftime("%Y-%m-%d %H:%M:%S")
    return out


def _show(rows: list[dict[str, object]], columns: list[str], json_out: bool) -> None:
    rows = [_times(row, json_out) for row in rows]
    if json_out:
        click.echo(as_json(rows))
        return
    utc = [f"{c}_utc" if c in _TABLE_UTC else c for c in columns]  # a table says its zone
    named = [{f"{k}_utc" if k in _TABLE_UTC else k: v for k, v in row.items()} for row in rows]
    click.echo(as_table(named, utc))


def _redis_url(ctx: click.Context, redis_url: str, url_file: Path | None) -> str:
    """The URL: from ``--redis-url-file`` if given (it beats PUSHFW_REDIS_URL), else
    ``--redis-url`` or its variable. A password given on the command line is visible to
    every local user (``ps``): that works, with a warning."""
    on_command_line = ctx.get_parameter_source("redis_url") is ParameterSource.COMMANDLINE
    if url_file is None:
        if on_command_line and parse_target(redis_url).password:
            click.echo(
                "pushfw: warning: the password in --redis-url is visible in the process "
                "list; use --redis-url-file or PUSHFW_REDIS_URL",
                err=True,
            )
        return redis_url
    if on_command_line:
        raise click.UsageError("give the Redis URL once: --redis-url or --redis-url-file")
    try:
        text = url_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise click.BadParameter(f"{url_file}: {why}", param_hint="--redis-url-file") from None
    lines = [line.strip() for line in text.splitlines()]
    urls = [line for line in lines if line and not line.startswith("#")]
    if len(urls) != 1:
        raise click.BadParameter(
            f"{url_file}: holds {len(urls)} URLs, not one", param_hint="--redis-url-file"
        )
    return urls[0]


@click.group()
@click.option(
    "--redis-url",
    envvar="PUSHFW_REDIS_URL",
    default="redis://127.0.0.1:6379/0",
    show_default=True,
    help="Redis holding the command stream (env PUSHFW_REDIS_URL). With a password, prefer "
    "the variable or --redis-url-file: a command line is visible to every user.",
)
@click.option(
    "--redis-url-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="PUSHFW_REDIS_URL_FILE",
    default=None,
    help="Read the Redis URL from this file (one line; '#' lines are comments). Env "
    "PUSHFW_REDIS_URL_FILE.",
)
@click.option(
    "--prefix",
    envvar="PUSHFW_KEY_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Prefix of pushfw's Redis keys, as the workers' key_prefix (env PUSHFW_KEY_PREFIX).",
)
@click.option(
    "--hmac-key",
    envvar="PUSHFW_HMAC_KEY",
    default=None,
    help="Sign every command with this key shared with the workers (env PUSHFW_HMAC_KEY).",
)
@click.option(
    "--default-ttl",
    type=Duration(),
    envvar="PUSHFW_DEFAULT_TTL",
    default=None,
    help="Lifetime of a drop sent without --ttl (env PUSHFW_DEFAULT_TTL); without it such "
    "a drop is permanent.",
)
@click.version_option(package_name="pushfw", prog_name="pushfw")
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str,
    redis_url_file: Path | None,
    prefix: str,
    hmac_key: str | None,
    default_ttl: int | None,
) -> None:
    """pushfw: firewall commands for every host, through Redis Streams."""
    if ctx.invoked_subcommand == "acl":
        return  # prints rules; needs no Redis
    url = _redis_url(ctx, redis_url, redis_url_file)
    ctx.obj = Producer.from_url(url, prefix, hmac_key=hmac_key)


def _wait_options(
    wait_help: str = "Wait for the hosts' results.", timeout: str = "10"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--wait``, ``--expect``, ``--timeout`` and ``--json``: every command that sends one."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(
            (
                click.option("--wait", is_flag=True, help=wait_help),
                click.option(
                    "--expect",
                    type=click.IntRange(0, 100_000),
                    default=1,
                    show_default=True,
                    help="With --wait: results to wait for (one per host).",
                ),
                click.option(
                    "--timeout",
                    "timeout_s",
                    type=Duration(),
                    default=timeout,
                    show_default=True,
                    help=f"With --wait: how long to wait ({timeout}, 30s, 2m).",
                ),
                click.option("--json", "json_out", is_flag=True, help="Machine-readable output."),
            )
        ):
            command = option(command)
        return command

    return apply


def _push_command(spec: OpSpec) -> None:
    """``pushfw <verb> IP``: one rule op of :data:`.ops.OPS`, sent by the Producer's method
    of that name."""
    timed = spec.takes_ttl

    @click.argument("ip")
    @click.option("--target", default="*", help="Host names or labels, comma-separated.")
    @click.option("--reason", default="", help="Free text kept with the rule.")
    @click.option("--request-id", default="", help="Your correlation id, echoed in results.")
    @_wait_options(
        wait_help="Wait for the hosts' results (exit 3 at once if no live host matches the target)."
    )
    @click.pass_obj
    def command(producer: Producer, /, ip: str, ttl: int | None = None, **opts: Any) -> None:
        send: Callable[..., str] = getattr(producer, spec.verb)
        kwargs: dict[str, Any] = {
            "target": [t for t in opts["target"].split(",") if t.strip() not in ("", "*")],
            "reason": opts["reason"],
            "request_id": opts["request_id"],
            "reply": opts["wait"],  # a result entry per host only when someone waits for it
        }
        if timed:
            dropping = spec.action is Action.DROP and spec.insert
            kwargs["ttl_s"] = _drop_ttl(ttl) if dropping else None if ttl == NEVER else ttl
        try:
            cmd_id = send(ip, **kwargs)
        except CommandRejected as exc:
            raise click.UsageError(str(exc)) from None
        if spec.insert and spec.action is not None:
            _warn_refused(parse_network(ip), spec.action)
        if not opts["wait"]:
            click.echo(as_json([{"cmd": cmd_id}]) if opts["json_out"] else cmd_id)
            return
        _wait(producer, cmd_id, kwargs["target"], opts)

    if timed:
        permanent = (
            "without it a drop is permanent, unless --default-ttl (PUSHFW_DEFAULT_TTL) is set"
            if spec.action is Action.DROP
            else "without it the rule is permanent"
        )
        command = click.option(
            "--ttl",
            type=Ttl(),
            default=None,
            help=f"Lifetime (600, 10m, 2h; never: permanent); {permanent}.",
        )(command)
    cli.command(spec.verb, help=spec.help)(command)


for _spec in OPS.values():
    if _spec.kind == "rule" and _spec.verb:
        _push_command(_spec)
cli.add_command(crowdsec_command)  # pushfw crowdsec: producer/crowdsec.py


def _warn_refused(network: Network, action: Action) -> None:
    """Sent, but hosts with the default bounds refuse it: say so here, not only in results
    nobody waited for."""
    why = refused_by_default(network, action)
    if why is not None:
        click.echo(f"pushfw: warning: {why} (sent all the same)", err=True)


def _wait(producer: Producer, cmd_id: str, target: list[str], opts: dict[str, Any]) -> None:
    """Wait for the results of ``cmd_id``, unless no live host is there to send one."""
    if opts["expect"] == 0:
        click.echo(as_json([{"cmd": cmd_id}]) if opts["json_out"] else cmd_id)
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
        _show(_result_rows(results), ["host", "status", "detail", "cmd"], opts["json_out"])
    if len(results) < opts["expect"]:
        expected = plural(opts["expect"], "result")
        silent = _silent_hosts(producer, target, results)
        click.echo(f"pushfw: {len(results)} of {expected} before the timeout{silent}", err=True)
    twins = _twins(producer, target)
    for host in twins:
        click.echo(
            f"pushfw: {host} is DUPLICATE: two live workers share that host name and split "
            "its commands, so one result stands for one of them (pushfw status)",
            err=True,
        )
    if twins:
        sys.exit(5)
    if len(results) < opts["expect"]:
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
        return _no_hosts(producer)
    known = [_known_host(h, now_ms) for h in hosts[:_KNOWN_SHOWN]]
    if len(hosts) > _KNOWN_SHOWN:
        known.append(f"and {len(hosts) - _KNOWN_SHOWN} more (pushfw status)")
    names = ",".join(target) or "*"
    return f"no live host matches target '{names}'; known hosts: {', '.join(known)}"


def _known_host(h: HostStatus, now_ms: int) -> str:
    """``web1 [eu,web]``, ``db1 (stopped)``: a host's name, labels, and why it is not live."""
    labels = f" [{','.join(h.labels)}]" if h.labels else ""
    why = " (STALE)" if is_stale(h, now_ms) else " (stopped)" if h.state == "stopped" else ""
    return h.host + labels + why


def _no_hosts(producer: Producer) -> str:
    return (
        f"no host has reported to {producer.keys.hosts} yet: "
        "is a pushfw-worker running against this Redis?"
    )


@cli.command()
@click.option(
    "--count",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Newest entries shown.",
)
@click.option("--cmd", "cmd_id", default=None, help="Only results of this command id.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def results(producer: Producer, count: int, cmd_id: str | None, json_out: bool) -> None:
    """The newest results, newest first; with --cmd, every host's answer to that command.

    Hosts that wrote no result for it (it asked for none) show where their group stands:
    done, pending (read, being retried) or not read yet; a follower, done or not done.
    """
    if cmd_id is None:
        _show(_result_rows(producer.results(count)), _RESULT_COLUMNS, json_out)
        return
    if not _ENTRY_ID.fullmatch(cmd_id):
        raise click.BadParameter(f"{cmd_id!r} is not a stream entry id (like 1712345678901-0)")
    rows = _result_rows(producer.results(count, cmd_id))
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
    _show(rows, _RESULT_COLUMNS, json_out)


_RESULT_COLUMNS = ["time", "host", "status", "cmd", "request_id", "detail"]
_ENTRY_ID = re.compile(r"\d{1,20}(-\d{1,20})?")


@cli.command()
@click.option(
    "--count",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Newest entries shown.",
)
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def dead(producer: Producer, count: int, json_out: bool) -> None:
    """Commands a host gave up on, newest first."""
    rows: list[dict[str, object]] = [
        {
            "time": _entry_ms(d.id),
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
    _show(rows, ["time", "host", "cmd", "op", "ip", "deliveries", "error"], json_out)


def _ago(ms: int) -> str:
    return _span(ms) + " ago" if ms >= 0 else "in " + _span(-ms)


def _span(ms: int) -> str:
    """A duration as a person reads it: ``9m 58s``, ``3h 12m``, ``2d 4h``."""
    days, rest = divmod(max(0, ms // 1000), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


@cli.command(name="list")
@click.option("--host", default=None, help="Only rules that reach this host (name).")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.option(
    "--hits", is_flag=True, help="Packets and bytes each rule and list entry matched, per host."
)
@click.option(
    "--top", type=click.IntRange(1, 100_000), default=None, help="With --hits: rows shown [20]."
)
@click.option(
    "--list", "list_name", default=None, help="With --hits: only the entries of this named list."
)
@selection_options(inside=True)
@click.pass_obj
def list_rules(
    producer: Producer,
    host: str | None,
    json_out: bool,
    hits: bool,
    top: int | None,
    list_name: str | None,
    selection: Selection,
) -> None:
    """Active rules in the ledger, with time remaining, reason and origin.

    With --hits: the rules and named-list entries that matched the most packets, one row
    per rule (or entry) and host, from the counts each host publishes once a minute (its
    1,000 busiest rules, and each list's 100 busiest entries: LIST names the list).
    """
    for option, given in (("--top", top), ("--list", list_name)):
        if given is not None and not hits:
            raise click.UsageError(f"{option} goes with --hits")
    if hits and selection != Selection():
        raise click.UsageError(
            "the filters go without --hits (--host, --top and --list go with it)"
        )
    if hits:
        _list_hits(producer, host, top or 20, json_out, list_name)
        return
    now_ms = producer.now_ms()
    rows: list[dict[str, object]] = []
    for rec in selection.apply(producer.rules(host)):
        left = None if rec.expires_ms is None else max(0, rec.expires_ms - now_ms)
        rows.append(
            {
                "action": rec.action,
                "network": rec.network,
                "expires_in": ("never" if left is None else _span(left))
                if not json_out
                else (None if left is None else left / 1000),
                "expires_at": rec.expires_ms,
                "target": ",".join(rec.target) or "*",
                "reason": rec.reason,
                "origin": rec.origin or "producer",
                "set_by": rec.id,
                "set_at": _entry_ms(rec.id),
            }
        )
    columns = ["action", "network", "expires_in", "target", "reason", "origin", "set_at"]
    _show(rows, columns, json_out)
    if not json_out:
        click.echo(plural(len(rows), "active rule") + (f" for {host}" if host else ""), err=True)
    _warn_unfolded(producer)


def _warn_unfolded(producer: Producer) -> None:
    """``list`` and ``lists`` read the ledger, which only a running worker fills: say when
    commands sent are not in it yet, so an empty table is not taken for no rules."""
    pool = getattr(producer.client, "connection_pool", None)  # a cluster client has none
    user = pool.connection_kwargs.get("username") if pool is not None else None
    if user == acl.PRODUCER_USER:
        return  # its ACL grants no XINFO (producer/acl.py): asking would only log a denial
    try:
        waiting = producer.unfolded()
    except redis.exceptions.RedisError:
        waiting = None  # a hint only: a user who may not XINFO, a topology that refuses it
    if waiting:
        click.echo(
            f"pushfw: {plural(waiting, 'command')} not yet folded into the ledger, so not "
            "shown (a running pushfw-worker folds them: pushfw status)",
            err=True,
        )


def _hit_rows(
    producer: Producer, names: list[str], list_name: str | None
) -> list[tuple[int, int, int, str, str, str, str | None]]:
    """(packets, bytes, read ms, host, action, network, list) of every published count:
    rules (list None) unless ``list_name`` is given, and the lists' busiest entries."""
    found: list[tuple[int, int, int, str, str, str, str | None]] = []
    if list_name is None:
        for name, counts in producer.hits(names).items():
            for rule, hit in counts.items():
                action, _, network = rule.partition(" ")
                found.append((hit.packets, hit.bytes, hit.ms, name, action, network, None))
    actions = {rec.name: rec.action for rec in producer.lists()}
    for name, lists in producer.list_hits(names).items():
        for listed, hits in lists.items():
            if list_name not in (None, listed):
                continue
            action = actions.get(listed, "?")
            for entry, packets, octets in hits.entries:
                found.append((packets, octets, hits.ms, name, action, entry, listed))
    return found


def _list_hits(
    producer: Producer, host: str | None, top: int, json_out: bool, list_name: str | None
) -> None:
    """``pushfw list --hits``: the busiest (rule or list entry, host) pairs, most packets
    first."""
    names = [h.host for h in producer.hosts() if host is None or h.host == host]
    now_ms = producer.now_ms()
    found = _hit_rows(producer, names, list_name)
    found.sort(key=lambda f: (-f[0], -f[1], f[3], f[5], f[6] or ""))
    rows: list[dict[str, object]] = []
    for packets, octets, ms, name, action, network, listed in found[:top]:
        when = {"read_at": ms} if json_out else {"read": _ago(now_ms - ms)}
        rows.append(
            {
                "host": name,
                "action": action,
                "network": network,
                "list": listed if json_out else (listed or "-"),
                "packets": packets,
                "bytes": octets,
                **when,
            }
        )
    _show(rows, ["host", "action", "network", "list", "packets", "bytes", "read"], json_out)
    if not json_out:
        what = ("entry", "entries") if list_name else ("rule or entry", "rules or entries")
        shown = f"{len(rows)} of {plural(len(found), *what)}" if found else f"no {what[0]}"
        click.echo(
            f"{shown} with hit counts on {plural(len(names), 'host')}"
            " (hosts read them every 12 heartbeats: once a minute by default)",
            err=True,
        )


@cli.command()
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
        click.echo(explain_why.text(answer, _span, _when, producer.now_ms()))
    for problem in answer.problems:
        click.echo(f"warning: {problem}", err=True)


@cli.command(name="remove")
@selection_options(inside=True, limit=False)
@click.option("--dry-run", is_flag=True, help="Show the rules that would go; send nothing.")
@click.option("--yes", is_flag=True, help=f"Do not ask, even for more than {FEW} rules.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def remove_rules(
    producer: Producer, selection: Selection, dry_run: bool, yes: bool, json_out: bool
) -> None:
    """Remove every rule the filters select, from every host: drops, or accepts with
    --action accept. Name the rules (--origin, --reason, --inside, --ip); more than a few
    ask for confirmation. Lists are removed with 'pushfw lists remove'.
    """
    if not selection.narrows:
        raise click.UsageError("say which rules: --origin, --reason, --inside or --ip")
    if selection.action is None:
        selection = dataclasses.replace(selection, action="drop")
    found = selection.apply(producer.rules())
    if dry_run or not json_out:
        _show(selection_rows(found), ["action", "network", "target", "reason", "origin"], json_out)
    if dry_run:
        if not json_out:
            click.echo(f"would remove {plural(len(found), 'rule')} (dry run)", err=True)
        return
    if len(found) > FEW and not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(
                f"{len(found)} rules match; add --yes to remove them (--dry-run lists them)"
            )
        if not click.confirm(f"remove these {len(found)} rules from every host?"):
            click.echo("nothing removed", err=True)
            sys.exit(1)
    sent = [
        (producer.undrop if rec.action == "drop" else producer.unaccept)(rec.network, reply=False)
        for rec in found
    ]
    if json_out:
        click.echo(
            as_json(
                [row | {"cmd": cmd} for row, cmd in zip(selection_rows(found), sent, strict=True)]
            )
        )
    else:
        click.echo(f"removed {plural(len(sent), 'rule')}: {plural(len(sent), 'command')} sent")


_IMPORT_ERRORS_SHOWN = 5


@cli.command(name="import")
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
@_wait_options(timeout="60")
@click.pass_obj
def import_list(producer: Producer, /, file: Any, **opts: Any) -> None:
    """Import a blocklist FILE (- for stdin) as one named list on every targeted host.

    One address or network per line; '#' and ';' start comments (FireHOL netsets, Spamhaus
    DROP text and JSON files read as they are). The list is stored once in Redis and sent
    as one command; importing a changed file again sends each host only the difference.
    """
    if file.name == "<stdin>" and not opts["name"]:
        # A default name for stdin would let two cron jobs replace each other's list.
        raise click.UsageError("a list read from stdin (-) needs --name")
    name = opts["name"] or list_name_for(Path(file.name).name)
    if not LIST_NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name!r}: a lower-case letter, then up to 15 letters, digits or _",
            param_hint="--name",
        )
    action = Action(opts["action"])
    protect = _networks(opts["protect"], "--protect")
    parsed = _read_import(file, name, action, opts["skip_invalid"])
    target = [t for t in opts["target"].split(",") if t.strip() not in ("", "*")]
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
    if action is Action.DROP:
        _warn_local_space(name, parsed.content, protect)
        _warn_protected(name, parsed, protect)
    if opts["wait"]:
        _wait(producer, cmd_id, target, opts)


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


@cli.group(name="lists", invoke_without_command=True)
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
    hosts = [h for h in known if is_live(h, now_ms)]
    counted = producer.list_hits(h.host for h in known)
    rows: list[dict[str, object]] = []
    for rec in producer.lists():
        reached = [h for h in hosts if reaches(rec.target, h)]
        hits = [
            c[rec.name]
            for h in known
            if reaches(rec.target, h) and rec.name in (c := counted[h.host])
        ]
        holding = sorted(
            h.host
            for h in reached
            if (held := h.lists.get(rec.name)) and held.version == rec.version
        )
        left = None if rec.expires_ms is None else max(0, rec.expires_ms - now_ms)
        rows.append(
            {
                "name": rec.name,
                "action": rec.action,
                "entries": rec.size,
                "version": rec.version if json_out else rec.version[:12],
                "hosts": holding if json_out else f"{len(holding)}/{len(reached)}",
                "hits": sum(h.packets for h in hits) if hits else (None if json_out else "-"),
                **({"hit_bytes": sum(h.bytes for h in hits) if hits else None} if json_out else {}),
                "expires_in": (None if left is None else left / 1000)
                if json_out
                else ("never" if left is None else _span(left)),
                "expires_at": rec.expires_ms,
                "target": ",".join(rec.target) or "*",
                "set_at": _entry_ms(rec.id),
                "reason": rec.reason,
            }
        )
    columns = [
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
    _show(rows, columns, json_out)
    if not json_out:
        click.echo(
            f"{plural(len(rows), 'list')}; HOSTS: live hosts holding that version"
            " / live hosts it targets; HITS: packets its entries matched on the hosts"
            " it targets (read once a minute)",
            err=True,
        )
    _warn_unfolded(producer)


@lists_group.command(name="remove")
@click.argument("name")
@_wait_options()
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
        click.echo(as_json([{"cmd": cmd_id}]) if opts["json_out"] else cmd_id)
        return
    _wait(producer, cmd_id, list(known[name].target), opts)


@cli.group()
def hosts() -> None:
    """Manage the hosts known to this Redis (``pushfw status`` lists them)."""


@hosts.command("forget")
@click.argument("name")
@click.option("--force", is_flag=True, help="Forget the host even if it is still reporting.")
@click.pass_obj
def hosts_forget(producer: Producer, name: str, force: bool) -> None:
    """Retire host NAME: remove its consumer group and heartbeat.

    The command stream is then trimmed without waiting for it; a worker that comes back
    under that name starts from the ledger, as a new host does. Needs a Redis user allowed
    XGROUP DESTROY and HDEL on pushfw's keys (not the producer user).
    """
    known = {h.host: h for h in producer.hosts()}
    host = known.get(name)
    if host is not None and is_live(host, producer.now_ms()) and not force:
        raise click.ClickException(
            f"host {name} is still reporting (state {host.state}): stop its worker first, "
            "or pass --force"
        )
    try:
        forgot = forget_host(producer.client, producer.keys, name)
    except redis.exceptions.NoPermissionError as exc:
        raise click.ClickException(f"this Redis user may not forget hosts: {exc}") from None
    if not forgot:
        raise click.UsageError(f"no host {name!r} is known (no heartbeat, no group)")
    click.echo(f"forgot host {name}: its consumer group and heartbeat are removed")


@cli.command()
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
    rows: list[dict[str, object]] = []
    hosts = producer.hosts()
    if not hosts and not json_out:
        click.echo(_no_hosts(producer), err=True)
        _warn_ahead(producer)
        return
    for h in hosts:
        silent_ms = now_ms - h.last_seen_ms
        # a worker that stopped or went silent was up until its last heartbeat, not until now
        up_ms = (now_ms if is_live(h, now_ms) else h.last_seen_ms) - h.started_ms
        rows.append(
            {
                "host": h.host,
                "state": host_state(h, now_ms),
                "last_seen": _ago(silent_ms) if not json_out else h.last_seen_ms,
                **({"started": h.started_ms} if json_out else {}),
                "rules": h.rules,
                "lag": "-" if h.lag is None and not json_out else h.lag,
                "pending": h.pending,
                "reads": h.reads,
                "backend": h.backend,
                "labels": ",".join(h.labels) if not json_out else h.labels,
                "version": h.version,
                "up": _span(up_ms) if not json_out else max(0, up_ms) // 1000,
                **(
                    {
                        "ledger_lost": h.ledger_lost,
                        "instance": h.instance,
                        "duplicate": h.duplicate,
                        "problems": h.problems,
                        "ids_ahead": h.ids_ahead,
                        "lists": {n: held.model_dump() for n, held in h.lists.items()},
                    }
                    if json_out
                    else {}
                ),
            }
        )
    columns = [
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
    _show(rows, columns, json_out)
    if not json_out:
        for h in hosts:
            for problem in h.problems:
                click.echo(f"warning: {h.host}: {problem}", err=True)
        _warn_ahead(producer)


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


@cli.group(name="redis-functions")
def redis_functions() -> None:
    """The seed's commands as Redis Functions (FCALL drop_insert 1 {pushfw}:cmd IP), and
    list_store, through which pushfw import stores a list."""


@redis_functions.command(name="install")
@click.pass_obj
def redis_functions_install(producer: Producer) -> None:
    """Load (or replace) the function library in Redis (needs Redis >= 7)."""
    try:
        name = functions.install(producer.client, producer.keys.prefix)
    except redis.ResponseError as exc:
        if "unknown command" in str(exc).lower():
            raise click.ClickException(
                f"this Redis has no FUNCTION command (Redis Functions need Redis >= 7): {exc}"
            ) from None
        raise
    click.echo(f"loaded library {name}: {', '.join((*functions.FUNCTIONS, functions.LIST_STORE))}")
    click.echo(f"try: FCALL drop_insert 1 {producer.keys.cmd} 192.0.2.1", err=True)


@redis_functions.command(name="show")
@click.pass_obj
def redis_functions_show(producer: Producer) -> None:
    """Print the library's Lua code, as install would load it."""
    click.echo(functions.library_code(producer.keys.prefix), nl=False)


@cli.command(name="acl")
@click.option(
    "--producer-password",
    envvar="PUSHFW_ACL_PRODUCER_PASSWORD",
    show_envvar=True,
    required=True,
    help="Password of the user pushfw-producer (prefer the variable: a command line is visible).",
)
@click.option(
    "--worker-password",
    envvar="PUSHFW_ACL_WORKER_PASSWORD",
    show_envvar=True,
    required=True,
    help="Password of the user pushfw-worker (prefer the variable: a command line is visible).",
)
@click.option("--minimal", is_flag=True, help="The producer may only XADD (no reading back).")
@click.option("--fcall", is_flag=True, help="The producer may call the Redis Functions too.")
@click.option("--db", default=0, show_default=True, type=click.IntRange(0, 65535), help="Database.")
@click.option("--redis-version", default="7.0", show_default=True, help="7.2+ adds SETINFO.")
@click.option("--file", "as_file", is_flag=True, help="ACL file lines instead of commands.")
@click.pass_context
def acl_users(ctx: click.Context, /, **opts: Any) -> None:
    """Print the Redis ACL users pushfw-producer and pushfw-worker (no Redis needed).

    The producer may XADD commands and read results; it writes list contents only through
    FCALL list_store (a string, once, no expiry): no SET, XADD, PEXPIRE or DEL on them. An
    administrator loads that function: pushfw redis-functions install.
    """
    prefix = str(ctx.parent.params["prefix"]) if ctx.parent else DEFAULT_PREFIX
    producer_pw, worker_pw = opts["producer_password"], opts["worker_password"]
    scope = {k: opts[k] for k in ("minimal", "fcall", "db", "redis_version")}
    try:
        if opts["as_file"]:
            secrets = (acl.password_rule(producer_pw), acl.password_rule(worker_pw))
            lines = acl.acl_file_lines(*secrets, prefix, **scope)
        else:
            commands = acl.setuser_commands(producer_pw, worker_pw, prefix, **scope)
            lines = [" ".join(c) for c in commands]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo("\n".join(lines))


def main() -> None:
    """Entry point: one-line errors and non-zero exits instead of tracebacks."""
    try:
        cli.main(standalone_mode=False, prog_name="pushfw")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"pushfw: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except redis.RedisError as exc:
        click.echo(f"pushfw: redis: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        click.echo(f"pushfw: unreadable entry in Redis: {first}", err=True)
        sys.exit(1)
