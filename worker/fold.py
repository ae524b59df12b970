"""The ledger role's pace: when this worker folds the stream into the ledger.

Every worker folds (:meth:`pushfw.worker.ledger.Ledger.fold_new`) so the ledger never
depends on one host. A follower shares the fold with the fleet but asks for work at most
every :data:`FOLLOWER_FOLD_GAP_S` once the ledger had caught up: a thousand followers asking
at every pass would cost the primary what reading off it saved. After it applied a batch its
read waits no longer than the next ask (:meth:`FoldPace.wait_ms`), so in a fleet of
followers alone the ledger is at most that far behind.
"""

from __future__ import annotations

import time

from pushfw.worker.ledger import Ledger

__all__ = ["FOLLOWER_FOLD_GAP_S", "FoldPace"]

FOLLOWER_FOLD_GAP_S = 0.5
"""A follower whose last fold found the ledger caught up asks again after this long."""


class FoldPace:
    """Folds for one worker: at every pass, or a follower's paced asks.

    Args:
        ledger: the ledger to fold into.
        follower: this worker reads a replica (its asks are paced).
    """

    def __init__(self, ledger: Ledger, follower: bool) -> None:
        self.ledger = ledger
        self.follower = follower
        self._at = 0.0
        self._owed = False
        self._refold = False

    def fold(self) -> int:
        """Entries folded: none means the ledger had caught up with the stream."""
        folded = 0
        if self._refold:
            folded = self.ledger.fold_own_pending()
            self._refold = False
        if self.follower and time.monotonic() < self._at:
            return folded
        self._owed = False
        new = self.ledger.fold_new()
        if self.follower and new < self.ledger.batch_size:
            self._at = time.monotonic() + FOLLOWER_FOLD_GAP_S
        return folded + new

    def after_batch(self, processed: int, caught_up: bool) -> bool:
        """The applier processed a batch: say whether to fold again now (not a follower)."""
        if not processed:
            return False
        if self.follower:
            self._owed = True
            return False
        return caught_up

    def wait_ms(self) -> int | None:
        """How long a follower's read may wait before the fold it owes (None: owes none)."""
        if not self._owed:
            return None
        return max(0, int((self._at - time.monotonic()) * 1000))

    def again(self) -> None:
        """A failed fold may have read entries it did not fold: fold our pending ones next."""
        self._refold = True
