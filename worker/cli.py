"""``pushfw-worker``: run the daemon, or remove pushfw's chains from this host."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import click
import redis
from pydantic import ValidationError

from pushfw.worker.backends import make_backend
from pushfw.worker.daemon import ForceStop, Worker
from pushfw.worker.errors import PushfwError
from pushfw.worker.settings import WorkerSettings

logger = logging.getLogger("pushfw.worker")


def _settings() -> WorkerSettings:
    try:
        return WorkerSettings()
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            name = "PUSHFW_" + "_".join(str(p) for p in err["loc"]).upper()
            click.echo(f"pushfw-worker: {name}: {err['msg']}", err=True)
        sys.exit(2)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Known failures end the process with one line on stderr and status 1, not a traceback."""
    try:
        yield
    except PushfwError as exc:
        click.echo(f"pushfw-worker: {exc}", err=True)
        sys.exit(1)
    except redis.RedisError as exc:
        click.echo(f"pushfw-worker: redis refused: {str(exc).splitlines()[0][:300]}", err=True)
        sys.exit(1)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log every rule (DEBUG).")
def main(verbose: bool) -> None:
    """pushfw worker: applies the command stream to this host's firewall."""
    _logging(verbose)


@main.command()
@click.option("--burst", is_flag=True, help="Exit once everything pending is applied.")
def run(burst: bool) -> None:
    """Follow the command stream until SIGTERM (settings from PUSHFW_* variables)."""
    settings = _settings()
    with _one_line_errors():
        try:
            worker = Worker(settings)
            worker.install_signal_handlers()
            worker.run(burst=burst)
        except ForceStop:
            sys.exit(130)


@main.command(name="reconcile")
@click.option("--force", is_flag=True, help="Remove extras even when the ledger is empty.")
def reconcile_once(force: bool) -> None:
    """Make this host's managed rules equal the ledger's, print the drift, exit."""
    settings = _settings()
    with _one_line_errors():
        worker = Worker(settings)
        worker.ledger.ensure_group()
        worker.applier.setup(worker.applier.stream.head())
        drift = worker.reconcile(force=force)
    if drift is None:
        sys.exit(1)
    click.echo(
        f"added {drift.added}, removed {drift.removed}, expiry fixed {drift.updated}, "
        f"kept {drift.kept} in {drift.seconds:.2f} s"
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
