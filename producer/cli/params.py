"""The parameters several ``pushfw`` commands share: durations, ``--ttl never``, the
``--wait`` family of options, and a ``--target`` list. Parsing only; no Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from pushfw.producer.duration import parse_duration


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


def drop_ttl(ttl: int | None) -> int | None:
    """A drop's ttl: ``--ttl``, else the group's ``--default-ttl``, else none (permanent)."""
    if ttl is None:
        default = click.get_current_context().find_root().params.get("default_ttl")
        return default if isinstance(default, int) else None
    return None if ttl == NEVER else ttl


def targets(text: str) -> list[str]:
    """``--target``'s host names and labels; ``*`` (every host) is the empty list."""
    return [t for t in text.split(",") if t.strip() not in ("", "*")]


def wait_options(
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
