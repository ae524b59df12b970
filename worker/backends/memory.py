"""A backend that keeps rules in memory: dry runs, demos without root, and tests."""

from __future__ import annotations

from collections.abc import Iterable

from pushfw.producer.contract import Network
from pushfw.worker.backends.base import Backend, Rule, RuleKey
from pushfw.worker.errors import BackendError


class MemoryBackend(Backend):
    """Rules in a dict; ``fail_networks`` makes every batch touching them fail (fault injection)."""

    name = "memory"

    def __init__(self, fail_networks: Iterable[Network] = ()) -> None:
        self._rules: dict[RuleKey, Rule] = {}
        self._staged: list[tuple[RuleKey, Rule | None]] = []
        self._fail = frozenset(fail_networks)
        self.commits = 0

    def open(self) -> None:
        """Nothing to create."""

    def close(self) -> None:
        """Nothing to release."""

    def snapshot(self) -> dict[RuleKey, Rule]:
        return dict(self._rules)

    def get(self, key: RuleKey) -> Rule | None:
        return self._rules.get(key)

    def size(self) -> int:
        return len(self._rules)

    def add(self, rule: Rule) -> None:
        self._staged.append((rule.key, rule))

    def delete(self, key: RuleKey) -> None:
        self._staged.append((key, None))

    def commit(self) -> None:
        staged, self._staged = self._staged, []
        for key, _ in staged:
            if key.network in self._fail:
                raise BackendError(f"injected failure for {key.network}")
        for key, rule in staged:
            if rule is None:
                self._rules.pop(key, None)
            else:
                self._rules[key] = rule
        self.commits += 1

    def discard(self) -> None:
        self._staged.clear()
