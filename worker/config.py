"""Loading the worker's configuration: ``worker.toml`` under ``PUSHFW_*`` variables.

Precedence: environment > file > defaults. The file's keys are the settings' field names
(``redis_url = "..."``); list settings take a TOML array or a comma-separated string. A
missing default file is fine; a missing file that was named (``--config``, ``PUSHFW_CONFIG``)
is an error, and so is a key the settings do not have (a typo must not pass silently).
Every problem becomes one line naming the file or variable and the key.

Secrets are shown masked: :func:`masked` renders the effective settings for people (every
URL through :func:`mask_url`), and :func:`secrets_of` lists the strings the log formatters
scrub from every line (every URL's password among them).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import SecretBytes, SecretStr, ValidationError

from pushfw.producer.connection import text
from pushfw.worker.settings import RENAMED, WorkerSettings

__all__ = [
    "DEFAULT_PATH",
    "ConfigInvalid",
    "Loaded",
    "is_secret",
    "load",
    "mask_url",
    "masked",
    "secrets_of",
]

DEFAULT_PATH = Path("/etc/pushfw/worker.toml")
MASK = "***"
_SECRET_WORDS = ("key", "secret", "password", "token")
_NOT_SECRET = frozenset({"key_prefix"})  # names Redis keys: nothing to hide


class ConfigInvalid(Exception):
    """The configuration cannot be used; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class Loaded:
    """Effective settings, the file they came from (None: none) and each key's source."""

    settings: WorkerSettings
    path: Path | None
    file_keys: frozenset[str] = field(default_factory=frozenset)

    def source(self, name: str) -> str:
        """``env PUSHFW_X``, ``file`` or ``default``: where a setting's value came from."""
        old = next((o for o, new in RENAMED.items() if new == name), None)
        env = _env_name(name) or (_env_name(old) if old else None)
        if env is not None:
            return f"env {env}"
        return "file" if name in self.file_keys or old in self.file_keys else "default"


def _env_name(name: str) -> str | None:
    """The environment variable that sets ``name``, if one is set (matched case-insensitively)."""
    wanted = f"PUSHFW_{name}".upper()
    return next((k for k in os.environ if k.upper() == wanted), None)


def _read(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The file's known keys, and one line per unknown key."""
    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigInvalid([f"{path}: {exc}"]) from None
    except OSError as exc:
        raise ConfigInvalid([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    known = [*WorkerSettings.model_fields, *RENAMED]  # old names still work (with a warning)
    problems = []
    for key in [key for key in values if key not in known]:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]}?" if close else "see check-config for the keys"
        problems.append(f"{path}: {key}: unknown key ({hint})")
        del values[key]
    return values, problems


def load(path: Path | None = None) -> Loaded:
    """Read ``path`` (None: the default file, if it exists) and the environment.

    Raises:
        ConfigInvalid: the file is missing (when named), unreadable, not TOML, has unknown
            keys, or a value is invalid (one line per bad key).
    """
    chosen: Path | None = None
    values: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None or DEFAULT_PATH.exists():
        chosen = path or DEFAULT_PATH
        if not chosen.exists():
            raise ConfigInvalid([f"{chosen}: no such file"])
        values, problems = _read(chosen)
    try:
        settings = WorkerSettings.with_file(values)
    except ValidationError as exc:
        problems += _error_lines(exc, chosen, values)
    if problems:
        raise ConfigInvalid(problems)
    return Loaded(settings, chosen, frozenset(values))


def _error_lines(exc: ValidationError, path: Path | None, values: dict[str, Any]) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "?"
        env = _env_name(name)
        if env is not None or path is None or name not in values:
            where = env or f"PUSHFW_{name.upper()}"
        else:
            where = f"{path}: {name}"
        lines.append(f"{where}: {err['msg']}")
    return lines


def _is_url(name: str) -> bool:
    """A Redis URL setting (``redis_url``, ``read_url``): its password is a secret."""
    return name.endswith("_url")


def _url_secrets(url: str) -> list[str]:
    """The password in ``url`` and its secret query parameters."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    found = [userinfo.split(":", 1)[1]] if at and ":" in userinfo else []
    return found + [v for k, v in parse_qsl(parts.query) if is_secret(k.lower())]


def is_secret(name: str) -> bool:
    return name not in _NOT_SECRET and any(word in name for word in _SECRET_WORDS)


def mask_url(url: str) -> str:
    """The URL with its password (and any secret query parameter) replaced by ``***``."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + MASK
    query = "&".join(
        f"{k}={MASK}" if sep and is_secret(unquote(k).lower()) else f"{k}{sep}{v}"
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    # Rebuilt by hand: urlunsplit would turn unix:///path into unix:/path.
    out = f"{parts.scheme}://{userinfo}{at}{hosts}{parts.path}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def masked(settings: WorkerSettings) -> dict[str, Any]:
    """The effective settings, by field name, with every secret masked (JSON-ready values)."""
    out: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if _is_url(name):
            value = mask_url(value) if value else value
        elif is_secret(name) and value:
            value = MASK
        out[name] = value
    return out


def secrets_of(settings: WorkerSettings) -> list[str]:
    """Strings that must never appear in a log line: the Redis password, secret settings."""
    found: list[str] = []
    for name in WorkerSettings.model_fields:
        value = getattr(settings, name)
        if _is_url(name):
            found += _url_secrets(str(value))
            continue
        if isinstance(value, SecretStr | SecretBytes):
            value = value.get_secret_value()
        if is_secret(name) and value:
            found += _pieces(text(value))
    found += [unquote(s) for s in found]
    # Longest first, so a secret containing another is scrubbed whole.
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def _pieces(value: str) -> list[str]:
    """A secret setting, and each secret of a ``id:secret,id2:secret2`` list in it."""
    pieces = [value]
    for part in value.split(","):
        pieces.append(part.strip())
        for sep in (":", "="):
            if sep in part:
                pieces.append(part.split(sep, 1)[1].strip())
    return pieces
