"""One interpreter of backend scripts, for every test that drives a backend directly.

A script is a list of steps (``["add", "drop", "192.0.2.1"]``, ``["commit"]``, ...), each
giving one JSON-able result. The memory backend runs a script in the calling process; a
kernel backend runs it inside the namespace it manages, as ``python -m testbed.driver``
with the spec on stdin, so the backend sees only that namespace's kernel.

Steps: the backend's own (``open``, ``close``, ``discard``, ``uninstall``, ``intact``,
``add``, ``add_hosts``, ``delete``, ``commit``, ``timed_commit``, ``snapshot``), a named
list's (``load``, ``change``, ``remove``, ``names``, ``content``), and the world's
(``kernel``, ``dump``, ``flush``, ``shell``, ``hold_lock``, ``release_lock``, ``sleep``).
``verb@b`` addresses a second instance of the backend (``a`` by default).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.kernel import Firewall, kernel_view, list_content
from testbed.netns import Netns

__all__ = ["ROOT", "Script", "Step", "run", "run_process", "run_script"]

ROOT = Path(__file__).resolve().parents[1]
Step = list[Any]


@dataclass
class Script:
    """Steps to run in one process; each call returns the index of its step's result."""

    steps: list[Step] = field(default_factory=list)

    def __call__(self, *step: Any) -> int:
        self.steps.append(list(step))
        return len(self.steps) - 1


def _key(action: str, net: str) -> Any:
    from pushfw.producer.contract import Action
    from pushfw.worker.backends.base import RuleKey

    return RuleKey(Action(action), ipaddress.ip_network(net))


def _build(name: str, options: dict[str, Any]) -> Any:
    from pushfw.worker.backends import make_backend

    fail = [ipaddress.ip_network(n) for n in options.get("memory_fail", [])]
    offset_ms = options.get("clock_offset_ms", 0)  # Redis's clock, this far from the machine's
    backend = make_backend(
        name,
        memory_fail=fail,
        set_size=options.get("set_size", 1_000_000),
        clock=lambda: int(time.time() * 1000) + offset_ms,
    )
    if "lock_timeout_s" in options:
        backend.lock_timeout_s = options["lock_timeout_s"]  # type: ignore[attr-defined]
    if "list_chunk" in options:
        backend.list_chunk = options["list_chunk"]  # type: ignore[attr-defined]
    return backend


def _refusal(exc: Exception) -> dict[str, Any]:
    return {"error": type(exc).__name__, "detail": str(exc)}


def _commit(backend: Any, timed: bool) -> dict[str, Any]:
    from pushfw.worker.errors import BackendError

    started = time.perf_counter()
    try:
        backend.commit()
    except BackendError as exc:
        return _refusal(exc)
    return {"error": None, "seconds": time.perf_counter() - started} if timed else {"error": None}


def _backend_step(backend: Any, verb: str, args: list[Any]) -> Any:
    from pushfw.worker.backends.base import Rule

    match verb:
        case "open" | "close" | "discard" | "uninstall" | "intact":
            return getattr(backend, verb)()
        case "add":  # action, network[, expires_ms]
            backend.add(Rule(_key(args[0], args[1]), *args[2:]))
        case "add_hosts":  # action, first address, count[, expires_ms]
            first = ipaddress.ip_address(args[1])
            for i in range(args[2]):
                backend.add(Rule(_key(args[0], str(first + i)), *args[3:]))
        case "delete":
            backend.delete(_key(args[0], args[1]))
        case "commit" | "timed_commit":
            return _commit(backend, timed=verb == "timed_commit")
        case "snapshot":
            rules = (rule for _, rule in backend.committed().pairs())
            return sorted([r.key.action.value, str(r.key.network), r.expires_ms] for r in rules)
        case _:
            raise ValueError(f"unknown step {verb!r}")
    return None


def _spec(args: list[Any]) -> Any:
    from pushfw.producer.contract import Action
    from pushfw.worker.backends.base import BlockList

    name, action, *rest = args
    return BlockList(name, Action(action), "v", rest[0] if rest else None)


def _list_step(backend: Any, verb: str, args: list[Any]) -> Any:
    from pushfw.worker.errors import BackendError

    try:
        match verb:
            case "load":  # name, action, entries[, expires_ms]
                backend.load_list(_spec([args[0], args[1], *args[3:]]), args[2])
            case "change":  # name, action, add, remove[, expires_ms]
                backend.change_list(_spec([args[0], args[1], *args[4:]]), args[2], args[3])
            case "remove":
                backend.remove_list(args[0])
            case "names":
                return sorted(backend.list_names())
    except BackendError as exc:
        return _refusal(exc)
    return {"error": None}


@dataclass
class _Driver:
    """Backend instances by label (``open@b`` is instance b), and the xtables lock held."""

    name: str
    options: dict[str, Any]
    netns: str | None
    instances: dict[str, Any] = field(default_factory=dict)
    lock_fd: int | None = None

    def backend(self, label: str) -> Any:
        if label not in self.instances:
            self.instances[label] = _build(self.name, self.options)
        return self.instances[label]

    def step(self, step: Step) -> Any:
        verb, _, label = str(step[0]).partition("@")
        args = step[1:]
        match verb:
            case "sleep":
                time.sleep(args[0])
                return None
            case "kernel" | "dump" | "flush" | "hold_lock" | "release_lock":
                return self.kernel_step(verb, *args)
            case "shell":  # a hand change to the kernel, as an operator would make it
                return subprocess.run(args, capture_output=True, text=True).returncode
            case "content":  # what the kernel holds for a list, read with the operator's tools
                return list_content(self.name, args[0], self.backend(label or "a"))
            case "load" | "change" | "remove" | "names":
                return _list_step(self.backend(label or "a"), verb, args)
        return _backend_step(self.backend(label or "a"), verb, args)

    def kernel_step(self, verb: str, *args: str) -> Any:
        from pushfw.worker.backends.iptables import XTABLES_LOCK

        if verb == "hold_lock":  # flock: another open file description conflicts, same process
            self.lock_fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            return None
        if verb == "release_lock":
            assert self.lock_fd is not None
            os.close(self.lock_fd)
            return None
        if self.netns is None:
            return None  # the memory backend has no kernel
        if verb == "flush":  # every managed rule (or those of one action) removed by hand
            Firewall(Netns(self.netns), self.name).flush(*args)
            return None
        return kernel_view(Netns(self.netns), self.name, dump=verb == "dump")


def run_script(spec: dict[str, Any]) -> list[Any]:
    """Run ``spec['steps']`` against backends named ``spec['backend']``, built with
    ``spec['options']``, in this process; one result per step."""
    driver = _Driver(spec["backend"], spec.get("options", {}), spec.get("netns"))
    return [driver.step(step) for step in spec["steps"]]


def run_process(
    spec: dict[str, Any], ns: Netns, private_lock: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``spec`` in a fresh process inside ``ns`` (with ``private_lock`` bind-mounted over
    the xtables lock in a mount namespace of its own); the finished process."""
    argv = [sys.executable, "-m", "testbed.driver"]  # the spec on stdin: it can be big
    if private_lock is not None:  # the lock of this test's own, not the machine's
        argv = [
            *("unshare", "--mount", "--propagation", "private", "--"),
            *("sh", "-c", 'mount --bind "$0" /run/xtables.lock && exec "$@"'),
            str(private_lock),
            *argv,
        ]
    return subprocess.run(
        ["ip", "netns", "exec", ns.name, *argv],
        input=json.dumps({**spec, "netns": ns.name}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run(
    spec: dict[str, Any], ns: Netns | None = None, private_lock: Path | None = None
) -> list[Any]:
    """One result per step of ``spec``: in this process without ``ns``, else inside it."""
    if ns is None:
        return run_script(spec)
    proc = run_process(spec, ns, private_lock)
    assert proc.returncode == 0, proc.stderr
    results: list[Any] = json.loads(proc.stdout)
    return results


if __name__ == "__main__":
    print(json.dumps(run_script(json.loads(sys.stdin.read()))))
