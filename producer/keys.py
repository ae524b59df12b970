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

    @property
    def rules(self) -> str:
        """The ledger: hash of rule id -> JSON record of the newest command for that rule."""
        return f"{self.prefix}:rules"

    @property
    def expiry(self) -> str:
        """Timed rule ids scored by expiry (ms, Redis clock): the scheduler's queue."""
        return f"{self.prefix}:expiry"

    @property
    def hosts(self) -> str:
        """Hash of host name -> JSON heartbeat (last seen, version, backend, rules, lag)."""
        return f"{self.prefix}:hosts"

    @property
    def seen(self) -> str:
        """Hash of entry id -> Redis's ms when first seen, for entries whose id was ahead of it."""
        return f"{self.prefix}:seen"

    @property
    def ahead(self) -> str:
        """Hash summing up entry ids ahead of Redis's clock: count, newest id, first/last seen."""
        return f"{self.prefix}:ahead"

    @property
    def generation(self) -> str:
        """The ledger's generation: written once, so an empty ledger is told from a lost one."""
        return f"{self.prefix}:generation"

    @property
    def tombs(self) -> str:
        """Ledger tombstones (rule ids) scored by their entry's ms: trimming finds old ones
        without reading the whole ledger."""
        return f"{self.prefix}:tombs"

    @property
    def tombs_indexed(self) -> str:
        """Set once :attr:`tombs` holds every tombstone (ledgers from before it get indexed)."""
        return f"{self.prefix}:tombs-indexed"

    @property
    def trimming(self) -> str:
        """Which worker trims the streams this interval: one per fleet, not one per host."""
        return f"{self.prefix}:trimming"

    @property
    def lists(self) -> str:
        """The ledger of named lists: hash of list name -> JSON record of its newest command."""
        return f"{self.prefix}:lists"

    @property
    def held(self) -> str:
        """Hash of rule id -> JSON record of the newest command for that rule a worker
        holding the key verified, kept while a newer command it could not verify is the
        rule's newest: what a host with ``require_signature`` holds instead."""
        return f"{self.prefix}:held"

    @property
    def held_lists(self) -> str:
        """The same as :attr:`held` for named lists (field: the list's name)."""
        return f"{self.prefix}:held-lists"

    def list_content(self, name: str, version: str) -> str:
        """One version of a list's packed entries (:class:`pushfw.producer.lists.ListContent`)."""
        return f"{self.prefix}:list:{name}:{version}"

    def hits(self, host: str) -> str:
        """Hash of rule id -> JSON hit counts (packets, bytes, ms) of one host's busiest rules."""
        return f"{self.prefix}:hits:{host}"

    def list_hits(self, host: str) -> str:
        """Hash of list name -> JSON hit counts of one host's lists (:class:`.ListHits`)."""
        return f"{self.prefix}:list-hits:{host}"

    def ttl_marker(self, rule_id: str) -> str:
        """A key that expires with a timed rule, so Redis's expiry event wakes schedulers."""
        return f"{self.prefix}:ttl:{rule_id}"

    @property
    def ttl_marker_prefix(self) -> str:
        return f"{self.prefix}:ttl:"

    LEDGER_GROUP = "ledger"
    """The one consumer group, shared by every worker, that folds commands into the ledger."""

    @staticmethod
    def host_group(host: str) -> str:
        """The consumer group of one host: every host sees every command (fan-out)."""
        return f"host:{host}"
