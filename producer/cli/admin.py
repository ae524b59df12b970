"""The administrator's commands: ``hosts forget`` (retire a host), ``redis-functions``
(load or print the Redis Functions library) and ``acl`` (print the Redis users pushfw
needs). They set Redis up for pushfw; they send no firewall command."""

from __future__ import annotations

from typing import Any

import click
import redis

from pushfw.producer import acl, functions
from pushfw.producer.client import Producer, forget_host, is_live
from pushfw.producer.keys import DEFAULT_PREFIX


@click.group()
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


@click.group(name="redis-functions")
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


@click.command(name="acl")
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


COMMANDS: list[click.Command] = [hosts, redis_functions, acl_users]
"""The commands of this module, for the root group."""
