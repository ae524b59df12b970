"""A backend that keeps rules in memory: dry runs, demos without root, and tests."""

from __future__ import annotations

from collections.abc import Iterable

from pushfw.producer.contract import Network
from pushfw.worker.backends.base import IndexedBackend
from pushfw.worker.errors import BackendError


class MemoryBackend(IndexedBackend):
    """Rules in a dict; ``fail_networks`` makes every batch touching them fail (fault injection)."""

    name = "memory"

    def __init__(self, fail_networks: Iterable[Network] = ()) -> None:
        super().__init__()
        self._fail = frozenset(fail_networks)
        self.commits = 0

    def open(self) -> None:
        """Nothing to create."""

    def commit(self) -> None:
        staged, self._staged = self._staged, []
        for key, _ in staged:
            if key.network in self._fail:
                raise BackendError(f"injected failure for {key.network}")
        for key, rule in staged:
            if rule is None:
                self._index.pop(key, None)
            else:
                self._index[key] = rule
        self.commits += 1
