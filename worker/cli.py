"""``pushfw-worker``: run the daemon, or remove pushfw's chains from this host."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import redis

from pushfw.producer.render import as_table
from pushfw.worker import log
from pushfw.worker.backends import choose_backend, make_backend
from pushfw.worker.config import (
    DEFAULT_PATH,
    ConfigInvalid,
    Loaded,
    load,
    mask_url,
    masked,
    secrets_of,
)
from pushfw.worker.daemon import Worker
from pushfw.worker.errors import HostNameTaken, PushfwError
from pushfw.worker.settings import WorkerSettings
from pushfw.worker.signals import ForceStop
from pushfw.worker.wiring import connect

logger = logging.getLogger("pushfw.worker")

HOST_NAME_TAKEN = 6
"""The exit status of a worker that refused to start beside a live worker of its host name
(LSB's "not configured"): restarting cannot help until one of them is renamed, so the
unit's ``RestartPreventExitStatus=`` names it. Every other failure exits 1."""


@dataclass(frozen=True)
class _Options:
    verbose: bool
    config: Path | None


def _load() -> Loaded:
    """Settings from the file and the environment; invalid ones exit 2, one line per problem."""
    opts = click.get_current_context().find_object(_Options) or _Options(False, None)
    try:
        loaded = load(opts.config)
    except ConfigInvalid as exc:
        for line in exc.lines:
            click.echo(log.error_line(f"pushfw-worker: {line}"), err=True)
        sys.exit(2)
    settings = loaded.settings
    log.setup(settings.log_format, opts.verbose, secrets_of(settings))
    return loaded


def _settings() -> WorkerSettings:
    return _load().settings


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Known failures end the process with one line on stderr and status 1, not a traceback."""
    try:
        yield
    except PushfwError as exc:
        click.echo(log.error_line(f"pushfw-worker: {exc}"), err=True)
        sys.exit(HOST_NAME_TAKEN if isinstance(exc, HostNameTaken) else 1)
    except redis.RedisError as exc:
        text = f"pushfw-worker: redis refused: {str(exc).splitlines()[0][:300]}"
        click.echo(log.error_line(text), err=True)
        sys.exit(1)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log every rule (DEBUG).")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="PUSHFW_CONFIG",
    help=f"Settings file (TOML; default {DEFAULT_PATH} if it exists). Env PUSHFW_CONFIG.",
)
@click.version_option(package_name="pushfw", prog_name="pushfw-worker")
@click.pass_context
def main(ctx: click.Context, verbose: bool, config: Path | None) -> None:
    """pushfw worker: applies the command stream to this host's firewall.

    Settings come from PUSHFW_* variables, then the config file, then defaults.
    """
    ctx.obj = _Options(verbose, config)


@main.command(name="check-config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--connect",
    is_flag=True,
    help="Also connect to redis_url as the worker would and PING it; exit 1 if that fails.",
)
def check_config(as_json: bool, connect: bool) -> None:
    """Validate the settings and print the effective ones (secrets masked) and the backend
    `auto` picks here; exit 2 if invalid, 1 if --connect cannot reach Redis."""
    loaded = _load()
    settings = loaded.settings
    values = masked(settings)
    backend = _backend_in_use(settings.backend)
    redis_error = _reach(settings) if connect else None
    if as_json:
        doc: dict[str, object] = {
            "file": str(loaded.path) if loaded.path else None,
            "settings": values,
            "sources": {name: loaded.source(name) for name in values},
            "backend": {"name": backend[0], "why": backend[1]},
        }
        if connect:
            doc["redis"] = {"reachable": redis_error is None, "error": redis_error}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"# config file: {loaded.path or f'none ({DEFAULT_PATH} does not exist)'}")
        rows = [
            {"key": name, "value": _show(value), "source": loaded.source(name)}
            for name, value in values.items()
        ]
        click.echo(as_table(rows, ["key", "value", "source"]))
        label = "backend auto" if settings.backend == "auto" else "backend"
        click.echo(f"# {label}: {backend[0]} ({backend[1]})")
        if connect and redis_error is None:
            click.echo(f"# redis: {mask_url(settings.redis_url)} answers PING")
    if redis_error is not None:
        text = f"pushfw-worker: redis: cannot reach {mask_url(settings.redis_url)}: {redis_error}"
        click.echo(log.error_line(text), err=True)
        sys.exit(1)


def _backend_in_use(setting: str) -> tuple[str, str]:
    """The backend the worker would drive with ``setting``, and why (``auto``: this host's
    pick, by the very function the worker uses)."""
    return choose_backend() if setting == "auto" else (setting, "configured")


def _reach(settings: WorkerSettings) -> str | None:
    """Connect as the worker does and PING; why that failed, secrets masked (None: it worked)."""
    try:
        client = connect(settings)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        for secret in filter(None, secrets_of(settings)):
            error = error.replace(secret, "***")
        return error
    return None


def _show(value: object) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool) else str(value)


@main.command()
@click.option("--burst", is_flag=True, help="Exit once everything pending is applied.")
@click.option(
    "--take-over",
    is_flag=True,
    help="Start even if another live worker has this host name (else refuse).",
)
def run(burst: bool, take_over: bool) -> None:
    """Follow the command stream until SIGTERM (settings from PUSHFW_* variables)."""
    settings = _settings()
    with _one_line_errors():
        try:
            worker = Worker(settings, take_over=take_over)
            worker.install_signal_handlers()
            worker.run(burst=burst)
        except ForceStop:
            sys.exit(130)


@main.command(name="reconcile")
@click.option(
    "--force",
    is_flag=True,
    help="Adopt the ledger even if it is not the one this host converged with (Redis lost "
    "its data): remove the rules it does not hold.",
)
def reconcile_once(force: bool) -> None:
    """Make this host's managed rules equal the ledger's, print the drift, exit."""
    settings = _settings()
    with _one_line_errors():
        worker = Worker(settings)
        worker.ledger.ensure_group()
        worker.applier.setup(worker.stream.head())
        drift = worker.reconcile(force=force)
    if drift is None:
        sys.exit(1)
    lists = worker.house.converger.last_lists
    click.echo(
        f"added {drift.added}, removed {drift.removed}, expiry fixed {drift.updated}, "
        f"kept {drift.kept} in {drift.seconds:.3f} s; {lists or 'no lists'}"
    )


@main.command()
def uninstall() -> None:
    """Remove pushfw's chains, sets and table, whichever backend made them; nothing else."""
    settings = _settings()
    for name in ("nftables", "ipset", "iptables"):
        try:
            backend = make_backend(name, chain=settings.chain, hooks=settings.hook_chains)
            removed = backend.uninstall()
        except (PushfwError, ImportError, OSError) as exc:
            click.echo(f"{name}: skipped ({str(exc).splitlines()[0][:200]})")
            continue
        click.echo(f"{name}: {removed}")
