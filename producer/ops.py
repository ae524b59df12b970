"""Every op of the wire format, once: what it does to a host's kernel and who sends it.

:data:`OPS` maps each op's canonical spelling to its :class:`OpSpec`. The parsers
(:mod:`.contract`, :mod:`.wire`, :mod:`.lists`), the ``pushfw`` CLI and the worker
(ledger, gate, metrics) read these rows instead of spelling an op's properties again, so
a new op starts here: a member of :class:`Op` (or :class:`ListOp`), its row in
:data:`OPS` (``fcall=True`` gives it a Redis Function too), and, for a new kind of
rule, a member of :class:`Action`. See docs/internals.md ("Where do I change X") for
what else a new action touches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "LIST_PREFIX",
    "OPS",
    "Action",
    "ListOp",
    "Op",
    "OpSpec",
    "find_op",
    "is_list_op",
]


class Action(StrEnum):
    """What a rule does to the traffic of its network."""

    DROP = "drop"
    ACCEPT = "accept"
    WATCH = "watch"
    """Shadow mode: match and count, neither drop nor accept (try a list before it drops)."""


class Op(StrEnum):
    """The operations on one rule (wire format v1), spelt canonically."""

    DROP_INSERT = "drop.insert"
    DROP_DELETE = "drop.delete"
    ACCEPT_INSERT = "accept.insert"
    ACCEPT_DELETE = "accept.delete"
    TTL_DROP_INSERT = "ttl.drop.insert"
    TTL_ACCEPT_INSERT = "ttl.accept.insert"
    WATCH_INSERT = "watch.insert"
    WATCH_DELETE = "watch.delete"
    TTL_WATCH_INSERT = "ttl.watch.insert"

    @property
    def action(self) -> Action:
        action = OPS[self.value].action
        assert action is not None  # every rule op has one
        return action

    @property
    def is_insert(self) -> bool:
        return OPS[self.value].insert

    @property
    def needs_ttl(self) -> bool:
        return OPS[self.value].ttl == "required"

    @classmethod
    def parse(cls, raw: str) -> Op:
        """Accept the seed's spellings: any case, ``_`` for ``.`` (``TTL_DROP_INSERT``)."""
        try:
            return cls(raw.lower().replace("_", "."))
        except ValueError:
            known = ", ".join(op.value for op in cls)
            raise ValueError(f"unknown op {raw[:40]!r} (expected one of {known})") from None


class ListOp(StrEnum):
    """The operations on a named list (:mod:`.lists`)."""

    LOAD = "list.load"
    DELETE = "list.delete"


LIST_PREFIX = "list."
"""Every list op's spelling starts with it: an entry whose op does is a list command (and
is rejected as one if the rest is unknown), and its signature covers the list fields."""


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op's row.

    Args:
        op: the canonical spelling on the wire.
        kind: ``rule`` (fields ``ip``...) or ``list`` (fields ``name``, ``version``...).
        action: what the rule does; None for a list op, whose ``action`` is a field.
        insert: the op puts something into the kernel (an insert, a list load); else it
            takes it out.
        ttl: ``required``, ``allowed`` or ``refused``: whether the op needs a ``ttl``.
        verb: the ``pushfw`` command that sends it (for a rule op, also the
            :class:`~.client.Producer` method); empty for a spelling kept for the seed.
        help: the verb's one-line help.
        fcall: the seed had it as a Redis command: a Redis Function of the same name
            (:attr:`function`, in :mod:`.functions`) appends it to the stream.
    """

    op: str
    kind: Literal["rule", "list"]
    action: Action | None
    insert: bool
    ttl: Literal["required", "allowed", "refused"]
    verb: str = ""
    help: str = ""
    fcall: bool = False

    @property
    def takes_ttl(self) -> bool:
        return self.ttl != "refused"

    @property
    def function(self) -> str:
        """The seed's name of the op (``ttl_drop_insert``), its Redis Function's name."""
        return self.op.replace(".", "_")


_ROWS = (
    OpSpec(
        Op.DROP_INSERT,
        "rule",
        Action.DROP,
        True,
        "allowed",
        "drop",
        "Ban IP (address or network) on the targeted hosts.",
        fcall=True,
    ),
    OpSpec(
        Op.ACCEPT_INSERT,
        "rule",
        Action.ACCEPT,
        True,
        "allowed",
        "accept",
        "Allow IP; an allow wins over any ban.",
        fcall=True,
    ),
    OpSpec(
        Op.DROP_DELETE, "rule", Action.DROP, False, "refused", "undrop", "Lift a ban.", fcall=True
    ),
    OpSpec(
        Op.ACCEPT_DELETE,
        "rule",
        Action.ACCEPT,
        False,
        "refused",
        "unaccept",
        "Withdraw an allow.",
        fcall=True,
    ),
    OpSpec(
        Op.WATCH_INSERT,
        "rule",
        Action.WATCH,
        True,
        "allowed",
        "watch",
        "Count IP's packets without dropping or accepting them (shadow mode).",
    ),
    OpSpec(Op.WATCH_DELETE, "rule", Action.WATCH, False, "refused", "unwatch", "Stop watching."),
    OpSpec(Op.TTL_DROP_INSERT, "rule", Action.DROP, True, "required", fcall=True),
    OpSpec(Op.TTL_ACCEPT_INSERT, "rule", Action.ACCEPT, True, "required", fcall=True),
    OpSpec(Op.TTL_WATCH_INSERT, "rule", Action.WATCH, True, "required"),
    OpSpec(ListOp.LOAD, "list", None, True, "allowed", "import", "Load a named list."),
    OpSpec(ListOp.DELETE, "list", None, False, "refused", "lists remove", "Remove a named list."),
)
OPS: Mapping[str, OpSpec] = {row.op: row for row in _ROWS}
"""Every op by its canonical spelling."""


def find_op(raw: str) -> OpSpec | None:
    """The row of an op as a producer may spell it (any case, ``_`` for ``.``); None if
    there is no such op."""
    return OPS.get(raw.lower().replace("_", "."))


def is_list_op(raw: bytes) -> bool:
    """Whether an entry's raw ``op`` names a list op (:data:`LIST_PREFIX`, any case)."""
    return raw[: len(LIST_PREFIX)].lower() == LIST_PREFIX.encode()
