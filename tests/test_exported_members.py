"""The public surface of each package is exactly its ``__all__`` (as in httpx's test).

A name imported into a package ``__init__`` but missing from ``__all__`` is invisible to
``from pushfw.producer import *`` and to documentation tools; a name in ``__all__`` that does
not exist breaks star imports. Order follows ruff's RUF022 (isort-style), so the test and
the linter never disagree.
"""

from __future__ import annotations

import importlib
import re
import types

import pytest

PACKAGES = ["pushfw.producer", "pushfw.worker"]
MODULES_WITH_ALL = [
    "pushfw.producer.acl",
    "pushfw.producer.cli",
    "pushfw.producer.client",
    "pushfw.producer.connection",
    "pushfw.producer.crowdsec",
    "pushfw.producer.contract",
    "pushfw.producer.duration",
    "pushfw.producer.functions",
    "pushfw.producer.journal",
    "pushfw.producer.records",
    "pushfw.producer.render",
    "pushfw.worker.backends",
    "pushfw.worker.config",
    "pushfw.worker.errors",
    "pushfw.worker.log",
    "pushfw.worker.metrics",
    "pushfw.worker.notify",
    "pushfw.worker.settings_doc",
    "pushfw.worker.supervisor",
]


def isort_key(name: str) -> tuple[int, list[int | str]]:
    """RUF022 order: SCREAMING_CASE, then CamelCase, then the rest; numbers naturally."""
    if len(name) > 1 and name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    parts: list[int | str] = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
    return group, parts


def public_names(module: types.ModuleType) -> set[str]:
    """Names the module defines or imports, without private names and submodules."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted(package: str) -> None:
    """``__all__`` is sorted and has no duplicates."""
    exported = list(importlib.import_module(package).__all__)
    assert exported == sorted(exported, key=isort_key)
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_public_names_are_exported(package: str) -> None:
    """Every public name of the package ``__init__`` is in ``__all__``, and no other."""
    module = importlib.import_module(package)
    assert set(module.__all__) == public_names(module)


@pytest.mark.parametrize("package", PACKAGES)
def test_exported_names_are_importable(package: str) -> None:
    """``from package import name`` works for every name in ``__all__``."""
    module = importlib.import_module(package)
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    for name in module.__all__:
        assert namespace[name] is getattr(module, name)


@pytest.mark.parametrize("module_name", MODULES_WITH_ALL)
def test_module_all_names_exist(module_name: str) -> None:
    """A module's ``__all__`` names only things the module has."""
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing
