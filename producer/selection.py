"""Which ledger rules an operator means: the filters of ``pushfw list`` and ``pushfw remove``.

One :class:`Selection` both lists and removes, so ``pushfw remove --dry-run`` shows exactly
what ``pushfw list`` with the same filters shows, and what ``pushfw remove`` then sends.
Filters compare exactly (an origin, a reason, a target name): a bulk removal must not reach
rules a looser match would sweep in.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from pushfw.producer.contract import CommandRejected, Network, parse_network
from pushfw.producer.ops import Action
from pushfw.producer.records import RuleRecord

__all__ = ["FEW", "NetworkParam", "Selection", "selection_options"]

FEW = 5
"""A bulk removal of more rules than this asks for confirmation (or ``--yes``)."""

F = TypeVar("F", bound=Callable[..., Any])


class NetworkParam(click.ParamType):  # type: ignore[type-arg]
    """An address or network, checked by the parser single commands use."""

    name = "network"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Network:
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return value
        try:
            return parse_network(str(value))
        except (CommandRejected, ValueError) as exc:
            self.fail(str(exc).splitlines()[0], param, ctx)


@dataclass(frozen=True, slots=True)
class Selection:
    """Rules matching every filter given (None: no filter); ``limit``: at most that many."""

    ip: Network | None = None
    """Rules whose network contains this address or network."""
    inside: Network | None = None
    """Rules whose network lies inside this network."""
    action: str | None = None
    origin: str | None = None
    reason: str | None = None
    target: str | None = None
    """A host name or label the rule names, or ``*`` for rules meant for every host."""
    limit: int | None = None

    @property
    def narrows(self) -> bool:
        """Whether any filter (other than ``action`` and ``limit``) is set."""
        return any(f is not None for f in (self.ip, self.inside, self.origin, self.reason))

    def matches(self, rec: RuleRecord) -> bool:
        if self.action is not None and rec.action != self.action:
            return False
        if self.origin is not None and (rec.origin or "producer") != self.origin:
            return False
        if self.reason is not None and rec.reason != self.reason:
            return False
        if self.target is not None and (
            bool(rec.target) if self.target == "*" else self.target not in rec.target
        ):
            return False
        if self.ip is None and self.inside is None:
            return True
        try:
            net = ipaddress.ip_network(rec.network, strict=False)
        except ValueError:
            return False  # a record that does not parse covers nothing a person named
        if self.ip is not None and (
            net.version != self.ip.version or not self.ip.subnet_of(net)  # type: ignore[arg-type]
        ):
            return False
        return self.inside is None or (
            net.version == self.inside.version and net.subnet_of(self.inside)  # type: ignore[arg-type]
        )

    def apply(self, rules: Iterable[RuleRecord]) -> list[RuleRecord]:
        found = [rec for rec in rules if self.matches(rec)]
        return found if self.limit is None else found[: self.limit]


def selection_options(*, inside: bool = False, limit: bool = True) -> Callable[[F], F]:
    """Click options for a :class:`Selection`, handed to the command as ``selection``."""

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["selection"] = Selection(
                ip=kwargs.pop("sel_ip"),
                inside=kwargs.pop("sel_inside", None),
                action=kwargs.pop("sel_action"),
                origin=kwargs.pop("sel_origin"),
                reason=kwargs.pop("sel_reason"),
                target=kwargs.pop("sel_target"),
                limit=kwargs.pop("sel_limit", None),
            )
            return command(*args, **kwargs)

        options = [
            click.option(
                "--ip",
                "sel_ip",
                type=NetworkParam(),
                default=None,
                help="Only rules whose network contains this address or network.",
            ),
            click.option(
                "--action",
                "sel_action",
                type=click.Choice([a.value for a in Action]),
                default=None,
                help="Only rules with this action.",
            ),
            click.option(
                "--origin", "sel_origin", default=None, help="Only rules from this origin (exact)."
            ),
            click.option(
                "--reason", "sel_reason", default=None, help="Only rules with this reason (exact)."
            ),
            click.option(
                "--target",
                "sel_target",
                default=None,
                help="Only rules naming this host or label ('*': rules for every host).",
            ),
        ]
        if inside:
            options.append(
                click.option(
                    "--inside",
                    "sel_inside",
                    type=NetworkParam(),
                    default=None,
                    help="Only rules whose network lies inside this network.",
                )
            )
        if limit:
            options.append(
                click.option(
                    "--limit",
                    "sel_limit",
                    type=click.IntRange(1),
                    default=None,
                    help="At most this many rules.",
                )
            )
        decorated: Any = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated  # type: ignore[no-any-return]

    return decorate


def rows(rules: Iterable[RuleRecord]) -> list[dict[str, object]]:
    """The rules a removal names, for the dry run's table and ``--json``."""
    return [
        {
            "action": rec.action,
            "network": rec.network,
            "target": ",".join(rec.target) or "*",
            "reason": rec.reason,
            "origin": rec.origin or "producer",
            "set_by": rec.id,
        }
        for rec in rules
    ]
