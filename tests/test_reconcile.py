"""``reconcile`` against a model: random kernels and random desired states, on the memory
backend, with a change the kernel refuses among them. The final rules and the drift's
counts must be what the rules of reconciliation say, rule by rule, whether the changes go
in one commit or in small chunks (every backend's index is packed: one path); and the
commits must come in the order that never drops what the end state accepts."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pushfw.producer.contract import Action, parse_network
from pushfw.worker.backends.base import Rule, RuleKey
from pushfw.worker.backends.index import RuleIndex
from pushfw.worker.backends.memory import MemoryBackend
from pushfw.worker.reconcile import Desired, reconcile

POOL = [
    RuleKey(action, parse_network(net))
    for action in Action
    for net in [f"198.51.{i // 100}.{i % 100}/32" for i in range(120)]
    + [f"2001:db8::{i:x}/128" for i in range(1, 40)]
    + [f"10.{i}.0.0/16" for i in range(10)]
]
REFUSED = parse_network("198.51.0.7/32")


def _rule(rng: random.Random, key: RuleKey) -> Rule:
    later = 1_900_000_000_000
    return Rule(key, rng.choice([None, None, later, later + rng.randrange(9)]))


def _model(
    kernel: dict[RuleKey, Rule],
    wanted: dict[RuleKey, Rule],
    gone: set[RuleKey],
    held: frozenset[RuleKey],
    remove_extras: bool,
    refused: set[RuleKey],
) -> tuple[dict[RuleKey, Rule], tuple[int, int, int], set[RuleKey]]:
    """The kernel after a reconcile, its (added, updated, removed), and the keys whose change
    the injected failure must refuse."""
    final = dict(kernel)
    added = updated = removed = 0
    changing: set[RuleKey] = set()
    for key in POOL:
        if key in wanted and kernel.get(key) != wanted[key]:
            changing.add(key)
            if key not in refused:
                added += key not in kernel
                updated += key in kernel
                final[key] = wanted[key]
        elif key in kernel and key not in wanted.keys() | held and (key in gone or remove_extras):
            changing.add(key)
            if key not in refused:
                removed += 1
                del final[key]
    return final, (added, updated, removed), {k for k in changing if k.network == REFUSED}


def _kernel(rng: random.Random, failing: bool) -> tuple[dict[RuleKey, Rule], MemoryBackend]:
    kernel = {key: _rule(rng, key) for key in rng.sample(POOL, rng.randrange(len(POOL)))}
    backend = MemoryBackend()
    for rule in kernel.values():
        backend.add(rule)
    backend.commit()
    backend._fail = frozenset([REFUSED] if failing else [])
    return kernel, backend


def _phase(key: RuleKey, rule: Rule | None) -> int:
    """Accepts set, drops removed, drops set, accepts removed, then watches set and
    removed: the order of the commits."""
    if key.action is Action.WATCH:
        return 4 if rule is not None else 5
    if key.action is Action.ACCEPT:
        return 0 if rule is not None else 3
    return 1 if rule is None else 2


def _logged(backend: MemoryBackend) -> list[list[tuple[RuleKey, Rule | None]]]:
    """The changes of each commit the backend made (refused ones are not logged)."""
    made: list[list[tuple[RuleKey, Rule | None]]] = []
    commit = backend.commit

    def logging_commit() -> None:
        staged = list(backend._staged)
        commit()
        made.append(staged)

    backend.commit = logging_commit  # type: ignore[method-assign]
    return made


@pytest.mark.parametrize("chunk", [50_000, 7])
def test_reconcile_makes_the_kernel_what_the_model_says_and_counts_it(chunk: int, monkeypatch: Any):
    monkeypatch.setattr("pushfw.worker.reconcile._COMMIT_CHUNK", chunk)
    rng = random.Random(11)
    for trial in range(150):
        failing = trial % 3 == 0
        kernel, backend = _kernel(rng, failing)
        commits = _logged(backend)
        present, absent = RuleIndex(), RuleIndex()
        wanted: dict[RuleKey, Rule] = {}
        for key in rng.sample(POOL, rng.randrange(len(POOL))):
            rule = kernel[key] if key in kernel and rng.random() < 0.5 else _rule(rng, key)
            present[key] = wanted[key] = rule
        rest = [key for key in POOL if key not in wanted]
        gone = set(rng.sample(rest, rng.randrange(len(rest) + 1)))
        for key in gone:
            absent[key] = Rule(key, None)
        others = [k for k in rest if k not in gone]
        held = frozenset(rng.sample(others, min(5, len(others))))
        remove_extras = rng.random() < 0.5

        drift = reconcile(backend, Desired(present, absent, held), remove_extras)

        refused = {key for key, _ in drift.refused}
        final, counts, refusable = _model(kernel, wanted, gone, held, remove_extras, refused)
        assert refused == (refusable if failing else set()), trial
        assert dict(backend.committed().pairs()) == final, trial
        assert (drift.added, drift.updated, drift.removed) == counts, trial
        assert drift.kept == len(kernel) - counts[1] - counts[2], trial
        phases = [_phase(key, rule) for made in commits for key, rule in made]
        assert phases == sorted(phases), trial
        if chunk == 7 and not failing:
            assert all(len(made) <= chunk for made in commits), trial
