"""docs/configuration.md, rendered from :class:`WorkerSettings` so the reference cannot drift.

``python -m pushfw.worker.settings_doc > docs/configuration.md`` rewrites it; a test fails
when the file and :func:`render` disagree, or when a setting has no ``description``.
"""

from __future__ import annotations

import socket
import sys
import typing
from collections.abc import Callable

import annotated_types
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from pushfw.worker.settings import RENAMED, WorkerSettings

__all__ = ["main", "render"]

_LIST_VALIDATOR = "_list"
"""The validator that lets a setting take a TOML array as well as a comma-separated string."""

_FACTORIES: dict[Callable[[], object], str] = {socket.gethostname: "the machine's host name"}

_HEADER = """\
# Configuration reference

<!-- Generated from WorkerSettings (worker/settings.py); do not edit by hand. -->

This page is generated from the worker's settings model, `WorkerSettings` in
[`worker/settings.py`](../worker/settings.py). After changing a setting, regenerate it with

```sh
.venv/bin/python -m pushfw.worker.settings_doc > docs/configuration.md
```

(`tests/test_docs.py` fails until you do). Every key of `/etc/pushfw/worker.toml` has an
environment variable, `PUSHFW_` plus the key in upper case, which wins over the file; list
settings take a TOML array or a comma-separated string. Where the file lives, precedence and
`pushfw-worker check-config` are described in [Operating pushfw](operating.md#configuration);
[`systemd/worker.toml.example`](../systemd/worker.toml.example) lists every key, commented.

| key | variable | type | default | description |
| --- | --- | --- | --- | --- |
"""


def _list_fields() -> frozenset[str]:
    """The list settings: their type is ``str`` in the model, a list to the operator."""
    validator = WorkerSettings.__pydantic_decorators__.field_validators[_LIST_VALIDATOR]
    return frozenset(validator.info.fields)


def _bounds(info: FieldInfo) -> str:
    """``1 to 10000``, ``at least 100``, ``> 0, at most 1.0``: what pydantic enforces."""
    ge: object = None
    gt: object = None
    le: object = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            ge = item.ge
        elif isinstance(item, annotated_types.Gt):
            gt = item.gt
        elif isinstance(item, annotated_types.Le):
            le = item.le
    if ge is not None and le is not None:
        return f"{ge} to {le}"
    parts = [f"at least {ge}"] if ge is not None else [f"> {gt}"] if gt is not None else []
    if le is not None:
        parts.append(f"at most {le}")
    return ", ".join(parts)


def _type(name: str, info: FieldInfo) -> str:
    annotation = info.annotation
    if name in _list_fields():
        return "list of strings"
    if typing.get_origin(annotation) is typing.Literal:
        return ", ".join(f"`{value}`" for value in typing.get_args(annotation))
    if annotation is bool:
        return "`true` or `false`"
    if SecretStr in typing.get_args(annotation) or annotation is SecretStr:
        return "string (secret)"
    kind = {int: "integer", float: "number", str: "string"}[typing.cast(type, annotation)]
    bounds = _bounds(info)
    return f"{kind}, {bounds}" if bounds else kind


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        factory = typing.cast(Callable[[], object], info.default_factory)
        return _FACTORIES.get(factory, f"`{factory.__qualname__}()`")
    value = info.default
    if value is None or value == "":
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md for the settings as they are now."""
    rows = []
    for name, info in WorkerSettings.model_fields.items():
        if not info.description:
            raise ValueError(f"setting {name} has no description")
        cells = [
            f"`{name}`",
            f"`PUSHFW_{name.upper()}`",
            _type(name, info),
            _default(info),
            _cell(info.description),
        ]
        rows.append(f"| {' | '.join(cells)} |\n")
    renamed = ", ".join(f"`{old}` (now `{new}`)" for old, new in RENAMED.items())
    footer = (
        "\nRenamed settings still work under their old names, in the file and as\n"
        f"`PUSHFW_*` variables, with a warning at start: {renamed}.\n"
    )
    return _HEADER + "".join(rows) + footer


def main() -> None:
    """Write the reference to stdout (redirect it into docs/configuration.md)."""
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
