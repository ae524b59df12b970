"""What the process's signals do to the worker's loop.

The first SIGTERM/SIGINT stops reading and lets the batch in hand finish (apply, results,
XACK); a second one aborts at once (:class:`ForceStop`). SIGALRM is the expiry alarm
(:mod:`pushfw.worker.alarm`): it cuts a Redis call short when a timed rule falls due.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from pushfw.worker.alarm import ExpiryAlarm
from pushfw.worker.reader import Reader, StopRequested

__all__ = ["ForceStop", "Signals"]


class ForceStop(Exception):
    """A second stop signal: abandon the batch in hand."""


class Signals:
    """The handlers of one worker's signals.

    Args:
        reader: told to stop reading; interrupted when it is blocked in a read.
        alarm: the expiry alarm, installed with the stop handlers.
        log: the run loop's logger: what the loop says stays under one name.
    """

    def __init__(self, reader: Reader, alarm: ExpiryAlarm, log: logging.Logger) -> None:
        self.reader = reader
        self.alarm = alarm
        self.log = log
        self._stops = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        self.alarm.install()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stops += 1
        if self._stops > 1:
            self.log.warning(
                "second %s: stopping now", signal.Signals(signum).name, extra={"state": "aborting"}
            )
            raise ForceStop
        self.log.info(
            "%s: finishing the batch in hand, then stopping",
            signal.Signals(signum).name,
            extra={"state": "stopping"},
        )
        self.reader.stopping = True
        if self.reader.blocking:
            raise StopRequested
