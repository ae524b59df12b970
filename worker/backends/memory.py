"""A backend that keeps rules in memory: dry runs, demos without root, and tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pushfw.producer.contract import Network
from pushfw.worker.backends.base import BlockList
from pushfw.worker.backends.entries import list_entries
from pushfw.worker.backends.index import IndexedBackend
from pushfw.worker.errors import BackendError


class MemoryBackend(IndexedBackend):
    """Rules in the packed index the kernel backends keep; ``fail_networks`` makes every batch
    touching them fail (fault injection)."""

    name = "memory"

    def __init__(self, fail_networks: Iterable[Network] = ()) -> None:
        super().__init__()
        self._fail = frozenset(fail_networks)
        self.commits = 0
        self.lists: dict[str, tuple[BlockList, set[str]]] = {}
        """Each loaded list with its entries (what a kernel's sets would hold)."""

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

    def list_names(self) -> set[str]:
        return set(self.lists)

    def load_list(self, spec: BlockList, networks: Iterable[str]) -> None:
        entries = list(networks)
        self._check_list(entries)
        self.lists[spec.name] = (spec, set(entries))

    def change_list(self, spec: BlockList, add: Sequence[str], remove: Sequence[str]) -> None:
        self._check_list(add)
        _, entries = self.lists.get(spec.name, (spec, set()))
        self.lists[spec.name] = (spec, (entries - set(remove)) | set(add))

    def remove_list(self, name: str) -> None:
        self.lists.pop(name, None)

    def settle(self) -> set[str]:
        """Nothing to settle: each list is an object of its own."""
        return set()

    def uninstall(self) -> str:
        removed = f"{len(self._index)} rules and {len(self.lists)} lists"
        self._index.clear()
        self.lists.clear()
        return f"forgot {removed} (memory backend)"

    def _check_list(self, networks: Sequence[str]) -> None:
        """Refuse what the kernel backends refuse, and the injected failures."""
        list_entries(networks)
        failing = {str(net) for net in self._fail}
        for net in networks:
            if net in failing:
                raise BackendError(f"injected failure for {net}")
