"""Exponential backoff with jitter, so many workers do not retry in step."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays of ``base_s * 2**n`` capped at ``max_s``, each drawn from the upper half of that."""

    base_s: float = 0.2
    max_s: float = 30.0
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay_s(self) -> float:
        ceiling = min(self.max_s, self.base_s * 2**self.attempts)
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
