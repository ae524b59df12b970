"""A host's own copies of the list content it holds, in its state directory.

A host with ``require_signature`` loads only lists a signed command names, and the command
signs the version, which is the content's hash; a copy is checked against that hash when
read, so it is as good as the content in Redis. Redis's copy is not in the host's hands:
a client that may write content keys can remove it or re-store it with an expiry. So a
strict host keeps a copy of every list it loads, and when the content is gone from Redis (or
is not its version), loads its copy and writes it back for the hosts that join later.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pushfw.producer.lists import LIST_NAME, ListContent
from pushfw.worker.statefile import write_state

__all__ = ["ContentCopies"]

logger = logging.getLogger(__name__)


class ContentCopies:
    """``<state_dir>/<host>.lists/<name>``: the packed content of the version a list holds."""

    def __init__(self, state_dir: str, host: str) -> None:
        self.dir = Path(state_dir) / f"{host}.lists"
        self._warned = False

    def _path(self, name: str) -> Path:
        if not LIST_NAME.fullmatch(name):  # checked by the command's parser already
            raise ValueError(f"{name!r} is not a list name")
        return self.dir / name

    def save(self, name: str, content: ListContent) -> None:
        """Keep ``content`` as list ``name``'s copy (replacing the one of another version)."""
        path = self._path(name)
        try:
            write_state(path, content.to_bytes(), mode=0o700)
        except OSError as exc:
            self._warn(exc)

    def load(self, name: str, version: str) -> ListContent | None:
        """The copy of list ``name`` if it is ``version`` (None: no such copy)."""
        try:
            content = ListContent.from_bytes(self._path(name).read_bytes())
            if content.version != version:
                return None
            content.check()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("list %s: this host's copy is unreadable: %s", name, exc)
            return None
        return content

    def drop(self, name: str) -> None:
        """Forget list ``name``'s copy (the list left the kernel)."""
        try:
            self._path(name).unlink(missing_ok=True)
        except OSError as exc:
            self._warn(exc)

    def _warn(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "cannot keep copies of list content in %s (%s): a list whose content "
                "leaves Redis cannot be loaded again after a restart",
                self.dir,
                exc,
            )
