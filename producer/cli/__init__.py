"""``pushfw``: push firewall commands and read what the hosts did with them.

This module is the root: the group and its connection options (the Redis URL, its file,
the key prefix, the signing key, the default ttl), and :func:`main`, which turns errors
into one line and an exit status. The commands live in the modules of their subject:
:mod:`.rules`, :mod:`.lists`, :mod:`.status` and :mod:`.admin`; ``crowdsec`` in
:mod:`pushfw.producer.crowdsec`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import redis
from click.core import ParameterSource

from pushfw.producer.cli import admin, lists, rules, status
from pushfw.producer.cli.params import Duration
from pushfw.producer.client import Producer
from pushfw.producer.connection import parse_target
from pushfw.producer.crowdsec import crowdsec_command
from pushfw.producer.keys import DEFAULT_PREFIX

__all__ = ["cli", "main"]


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
    return _url_in(url_file)


def _url_in(url_file: Path) -> str:
    """The one URL in ``url_file`` ('#' lines are comments)."""
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


for _command in (
    *rules.COMMANDS,
    *lists.COMMANDS,
    *status.COMMANDS,
    *admin.COMMANDS,
    crowdsec_command,  # pushfw crowdsec: producer/crowdsec.py
):
    cli.add_command(_command)


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
