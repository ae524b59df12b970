"""Every Redis key pushfw uses, in one place.

All keys share one hash tag (the prefix, ``{pushfw}`` by default) so that multi-key
scripts and transactions work on Redis Cluster too.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "{pushfw}"


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def cmd(self) -> str:
        """The command stream every producer appends to and every host reads."""
        return f"{self.prefix}:cmd"

    @property
    def results(self) -> str:
        """One entry per command per host: what the host did with it."""
        return f"{self.prefix}:results"

    @property
    def dead(self) -> str:
        """Commands that kept failing, with their original fields and the last error."""
        return f"{self.prefix}:dead"

    @staticmethod
    def host_group(host: str) -> str:
        """The consumer group of one host: every host sees every command (fan-out)."""
        return f"host:{host}"
