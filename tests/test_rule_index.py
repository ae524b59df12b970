"""The packed rule index behaves as the dict it replaces, through merges, both families."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from pushfw.producer.contract import Action
from pushfw.worker.backends import index as index_module
from pushfw.worker.backends.base import Rule, RuleKey
from pushfw.worker.backends.index import RuleIndex


def _key(rng: random.Random) -> RuleKey:
    action = rng.choice(list(Action))
    if rng.random() < 0.8:  # a small space, so keys come back: replaced, removed, re-added
        prefix = rng.choice([32, 32, 32, 24, 16, 0])
        bits = rng.randrange(3000) << 8
        net: ipaddress.IPv4Network | ipaddress.IPv6Network = ipaddress.IPv4Network(
            (bits, prefix), strict=False
        )
    else:
        prefix = rng.choice([128, 128, 64, 48])
        net = ipaddress.IPv6Network((rng.randrange(500) << 100, prefix), strict=False)
    return RuleKey(action, net)


def test_the_packed_index_answers_as_a_dict_under_random_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_module, "_MERGE_AT", 64)  # many merges in a short run
    rng = random.Random(11)
    index, model = RuleIndex(), dict[RuleKey, Rule]()
    for step in range(40_000):
        key = _key(rng)
        roll = rng.random()
        if roll < 0.5:
            rule = Rule(key, rng.choice([None, 1_700_000_000_000 + rng.randrange(10**6)]))
            index[key] = rule
            model[key] = rule
        elif roll < 0.8:
            assert index.pop(key, None) == model.pop(key, None)
        else:
            assert index.get(key) == model.get(key)
            assert (key in index) == (key in model)
        assert len(index) == len(model)
        if step % 5_000 == 0:
            assert dict(index.pairs()) == model
    assert dict(index.pairs()) == model
    assert {a: index.count(a) for a in Action} == {
        a: sum(k.action is a for k in model) for a in Action
    }
    assert index.counts() == {a: sum(k.action is a for k in model) for a in Action}
    timed = Counter(r for r in model.values() if r.expires_ms is not None)
    assert Counter(index.timed()) == timed, "timed() lists each timed rule once, no other"
    index.clear()
    assert len(index) == 0 and dict(index.pairs()) == {}


def test_a_rule_is_filed_under_its_own_key() -> None:
    index = RuleIndex()
    a = RuleKey(Action.DROP, ipaddress.ip_network("192.0.2.1"))
    b = RuleKey(Action.DROP, ipaddress.ip_network("192.0.2.2"))
    try:
        index[a] = Rule(b)
    except ValueError:
        pass
    else:
        raise AssertionError("a rule filed under another key was accepted")
    index[a] = Rule(a)
    del index[a]
    assert a not in index and len(index) == 0
