"""The commands on single rules: one per rule op (``drop``, ``accept``, ``watch``,
``undrop``, ...), ``list`` (the ledger's active rules, or ``--hits``: what they matched) and
``remove`` (every rule a filter selects)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import click
import redis

from pushfw.producer import acl
from pushfw.producer.cli.params import NEVER, Ttl, drop_ttl, targets, wait_options
from pushfw.producer.cli.wait import echo_sent, wait
from pushfw.producer.client import Producer
from pushfw.producer.contract import Action, CommandRejected, Network, parse_network
from pushfw.producer.lists import refused_by_default
from pushfw.producer.ops import OPS, OpSpec
from pushfw.producer.render import ago, as_json, entry_ms, expires_in, listing, plural
from pushfw.producer.selection import FEW, Selection, selection_options
from pushfw.producer.selection import rows as selection_rows


def _push_command(spec: OpSpec) -> click.Command:
    """``pushfw <verb> IP``: one rule op of :data:`.ops.OPS`, sent by the Producer's method
    of that name."""
    timed = spec.takes_ttl

    @click.argument("ip")
    @click.option("--target", default="*", help="Host names or labels, comma-separated.")
    @click.option("--reason", default="", help="Free text kept with the rule.")
    @click.option("--request-id", default="", help="Your correlation id, echoed in results.")
    @wait_options(
        wait_help="Wait for the hosts' results (exit 3 at once if no live host matches the target)."
    )
    @click.pass_obj
    def command(producer: Producer, /, ip: str, ttl: int | None = None, **opts: Any) -> None:
        send: Callable[..., str] = getattr(producer, spec.verb)
        kwargs: dict[str, Any] = {
            "target": targets(opts["target"]),
            "reason": opts["reason"],
            "request_id": opts["request_id"],
            "reply": opts["wait"],  # a result entry per host only when someone waits for it
        }
        if timed:
            dropping = spec.action is Action.DROP and spec.insert
            kwargs["ttl_s"] = drop_ttl(ttl) if dropping else None if ttl == NEVER else ttl
        try:
            cmd_id = send(ip, **kwargs)
        except CommandRejected as exc:
            raise click.UsageError(str(exc)) from None
        if spec.insert and spec.action is not None:
            _warn_refused(parse_network(ip), spec.action)
        if not opts["wait"]:
            echo_sent(cmd_id, opts["json_out"])
            return
        wait(producer, cmd_id, kwargs["target"], opts)

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
    return click.command(spec.verb, help=spec.help)(command)


def _warn_refused(network: Network, action: Action) -> None:
    """Sent, but hosts with the default bounds refuse it: say so here, not only in results
    nobody waited for."""
    why = refused_by_default(network, action)
    if why is not None:
        click.echo(f"pushfw: warning: {why} (sent all the same)", err=True)


@click.command(name="list")
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
    rows: list[dict[str, object]] = [
        {
            "action": rec.action,
            "network": rec.network,
            "expires_in": expires_in(rec.expires_ms, now_ms, json_out),
            "expires_at": rec.expires_ms,
            "target": ",".join(rec.target) or "*",
            "reason": rec.reason,
            "origin": rec.origin or "producer",
            "set_by": rec.id,
            "set_at": entry_ms(rec.id),
        }
        for rec in selection.apply(producer.rules(host))
    ]
    columns = ["action", "network", "expires_in", "target", "reason", "origin", "set_at"]
    click.echo(listing(rows, columns, json_out))
    if not json_out:
        click.echo(plural(len(rows), "active rule") + (f" for {host}" if host else ""), err=True)
    warn_unfolded(producer)


def warn_unfolded(producer: Producer) -> None:
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


_Hit = tuple[int, int, int, str, str, str, str | None]
"""(packets, bytes, read ms, host, action, network, list) of one published count."""


def _hit_rows(producer: Producer, names: list[str], list_name: str | None) -> list[_Hit]:
    """Every published count: rules (list None) unless ``list_name`` is given, and the
    lists' busiest entries."""
    found: list[_Hit] = []
    if list_name is None:
        for name, counts in producer.hits(names).items():
            for rule, hit in counts.items():
                action, _, network = rule.partition(" ")
                found.append((hit.packets, hit.bytes, hit.ms, name, action, network, None))
    records = {rec.name: rec for rec in producer.lists()}
    for name, lists in producer.list_hits(names).items():
        for listed, hits in lists.items():
            rec = records.get(listed)
            if list_name not in (None, listed) or rec is None or not rec.counted_by(hits):
                continue  # a list gone, or counted before its newest command
            for entry, packets, octets in hits.entries:
                found.append((packets, octets, hits.ms, name, rec.action, entry, listed))
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
        when = {"read_at": ms} if json_out else {"read": ago(now_ms - ms)}
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
    columns = ["host", "action", "network", "list", "packets", "bytes", "read"]
    click.echo(listing(rows, columns, json_out))
    if not json_out:
        what = ("entry", "entries") if list_name else ("rule or entry", "rules or entries")
        shown = f"{len(rows)} of {plural(len(found), *what)}" if found else f"no {what[0]}"
        click.echo(
            f"{shown} with hit counts on {plural(len(names), 'host')}"
            " (hosts read them every 12 heartbeats: once a minute by default)",
            err=True,
        )


@click.command(name="remove")
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
        columns = ["action", "network", "target", "reason", "origin"]
        click.echo(listing(selection_rows(found), columns, json_out))
    if dry_run:
        if not json_out:
            click.echo(f"would remove {plural(len(found), 'rule')} (dry run)", err=True)
        return
    _confirm(len(found), yes)
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


def _confirm(count: int, yes: bool) -> None:
    """More than a few rules go only with --yes, or a person's yes at a terminal."""
    if count <= FEW or yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(
            f"{count} rules match; add --yes to remove them (--dry-run lists them)"
        )
    if not click.confirm(f"remove these {count} rules from every host?"):
        click.echo("nothing removed", err=True)
        sys.exit(1)


COMMANDS: list[click.Command] = [
    *(_push_command(spec) for spec in OPS.values() if spec.kind == "rule" and spec.verb),
    list_rules,
    remove_rules,
]
"""The commands of this module, for the root group."""
