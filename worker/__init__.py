"""pushfw worker: applies the command stream to this host's kernel firewall."""

from pushfw.worker.applier import Applier
from pushfw.worker.daemon import Worker
from pushfw.worker.settings import WorkerSettings

__all__ = ["Applier", "Worker", "WorkerSettings"]
