"""The reconcile role's state: make the kernel equal the ledger, and remember how that went.

Rules the ledger does not speak of are removed only when this is the ledger the host
converged with before (:mod:`pushfw.worker.generation`), or with ``force``: a new or missing
ledger beside a kernel holding rules means Redis lost its data. The diff itself is
:func:`pushfw.worker.reconcile.reconcile`.
"""

from __future__ import annotations

import logging
import time

from pushfw.producer.render import plural
from pushfw.worker.applier import Applier, Kernel
from pushfw.worker.backends.base import Backend
from pushfw.worker.clock import SyncedClock
from pushfw.worker.decide import Policy
from pushfw.worker.errors import BackendError
from pushfw.worker.generation import GenerationFile, trusts_ledger
from pushfw.worker.heap import LARGE, give_back_memory
from pushfw.worker.ledger import Ledger
from pushfw.worker.lists import ListDrift, ListKeeper
from pushfw.worker.metrics import Metrics
from pushfw.worker.reconcile import Drift, desired_rules, reconcile
from pushfw.worker.stream import HostStream

__all__ = ["Converger"]

logger = logging.getLogger(__name__)


class Converger:
    """One host's reconcile: the ledger's active rules for this host, through the gate.

    Args:
        applier: its expiry queue is rebuilt after each reconcile.
        ledger: the desired state.
        stream: the host's position: the ledger catches up to it first.
        clock: Redis's clock, estimated locally.
        lists: the list role, reconciled after the rules.
        generation: the marker of the ledger this host converged with.
        metrics: counts the drift.
        kernel: wraps kernel work so that the worker's expiry alarm never interrupts it.
    """

    def __init__(
        self,
        *,
        applier: Applier,
        ledger: Ledger,
        stream: HostStream,
        clock: SyncedClock,
        lists: ListKeeper,
        generation: GenerationFile,
        metrics: Metrics,
        kernel: Kernel,
    ) -> None:
        self.applier = applier
        self.backend: Backend = applier.backend
        self.policy: Policy = applier.policy
        self.ledger = ledger
        self.stream = stream
        self.clock = clock
        self.lists = lists
        self.generation = generation
        self.metrics = metrics
        self.kernel = kernel
        self.ledger_lost = False
        self.error: str | None = None
        """Why the last reconcile did not converge (the heartbeat's problems), or None."""
        self.last_drift: Drift | None = None
        self.last_lists: ListDrift | None = None
        """What the last reconcile did to the lists (None: it did not get that far)."""

    def reconcile(self, force: bool = False) -> Drift | None:
        """Make the managed rules equal what the ledger holds for this host, through the gate."""
        started = time.perf_counter()
        backend, ledger = self.backend, self.ledger
        with self.kernel():
            backend.open()  # re-read the kernel: drift is measured against what it holds
        ledger.catch_up(self.stream.last_delivered())
        now_ms = self.clock.now_ms()
        verified = ledger.held() if self.policy.signing.required else None
        desired = desired_rules(ledger.records(), self.policy, now_ms, verified)
        marker, known = ledger.generation(), self.generation.read()
        trusted = force or trusts_ledger(marker, known, ledger.size(), len(backend.committed()))
        self._say_lost(trusted)
        try:
            with self.kernel():
                self.last_drift = reconcile(backend, desired, remove_extras=trusted)
            if trusted and marker is not None:
                self.generation.write(marker)
        except BackendError as exc:
            logger.error("reconcile failed, kept the current rules: %s", exc)
            self.error = f"failed, kept the current rules: {exc}"
            backend.discard()
            return None
        finally:
            self.applier.rebuild_expiry()
            if (
                len(desired.present) + len(desired.absent) >= LARGE
                or len(backend.committed()) >= LARGE
            ):
                give_back_memory()  # the ledger's records and the kernel's rules, built whole
        self.error = _refused_text(self.last_drift)
        self.last_lists = lists = self.lists.reconcile(now_ms, remove_extras=trusted)
        initial = known is None and _initial_load(self.last_drift, lists)
        if not initial:  # a new host's first load is not drift: no alert counts it
            self.metrics.reconciled(self.last_drift)
        _summary(self.last_drift, lists, initial, time.perf_counter() - started)
        return self.last_drift

    def _say_lost(self, trusted: bool) -> None:
        if not trusted and not self.ledger_lost:
            logger.error(
                "the ledger is not the one this host converged with (did Redis lose its data?): "
                "keeping the %d applied rules it does not hold; "
                "'pushfw-worker reconcile --force' adopts it and removes them",
                len(self.backend.committed()),
            )
        self.ledger_lost = not trusted


def _refused_text(drift: Drift) -> str | None:
    refused = drift.refused
    if not refused:
        return None
    return (
        f"the kernel refused {len(refused)} of the ledger's rules (first: {refused[0][0]}: "
        f"{refused[0][1]})"
    )


def _initial_load(drift: Drift, lists: ListDrift) -> bool:
    """Whether a reconcile loaded the ledger into a kernel holding nothing of pushfw."""
    found = drift.kept + drift.updated + drift.removed + lists.found
    return not found and drift.added + lists.loaded > 0


def _summary(drift: Drift, lists: ListDrift, initial: bool, seconds: float) -> None:
    """One line for what reconcile found and did, rules and lists: a WARNING only when the
    kernel differed from what this host had committed (a hand flush, a reboot, a rule gone
    behind its back), an INFO for the ``initial`` load of a host that never converged
    before (it keeps no ledger generation yet) into a kernel holding nothing of pushfw."""
    if initial:
        refused = len(drift.refused) + lists.refused
        logger.info(
            "reconcile: initial load: loaded %s and %s from the ledger%s in %.2f s",
            plural(drift.added, "rule"),
            plural(lists.loaded, "list"),
            f" ({refused} refused)" if refused else "",
            seconds,
        )
    elif drift.changed or lists.drifted:
        logger.warning(
            "reconcile repaired drift: %d added, %d removed, %d expiry fixed (%d kept); %s "
            "in %.2f s",
            drift.added,
            drift.removed,
            drift.updated,
            drift.kept,
            lists,
            seconds,
        )
    else:
        logger.info(
            "reconcile: kernel matches the ledger (%s), %s in %.2f s",
            plural(drift.kept, "rule"),
            lists,
            seconds,
        )
