"""fail2ban action in Python: each ban becomes a pushfw drop, sent over one Redis connection.

fail2ban loads this file into its own process, so a ban costs one ``XADD`` (well under a
millisecond) instead of a new ``pushfw`` process (about 0.16 s of CPU). Every host that
runs a pushfw worker then enforces this host's fail2ban bans (fail2ban/fail2ban#881).

    ban    -> drop.insert, ttl = the time left of fail2ban's ban (bantime < 0: no ttl, forever)
    unban  -> drop.delete (an unbanip, or "unban --all"); none when fail2ban's ban time is
              over, because the ttl has ended the ban in pushfw already, and a delete then
              could cut short a newer ban of the same address from another host
    stop   -> nothing: the bans carry their ttl and end on time on every host
              (unban_on_stop = true: one drop.delete per banned address, fail2ban's habit)

Install (docs/integrations.md has the whole story)::

    cp integrations/fail2ban/action.d/pushfw_redis.py /etc/fail2ban/action.d/

    # /etc/fail2ban/jail.local: pushfw bans for every jail ...
    [DEFAULT]
    action_pushfw = pushfw_redis.py[redis_url_file="/etc/pushfw/fail2ban.url",
                                    python_path="/opt/pushfw/venv"]
    action = %(action_pushfw)s

    # ... or for one jail, next to its local action
    [sshd]
    action = %(action_)s
             %(action_pushfw)s

(``banaction = pushfw_redis.py`` works too, but fail2ban passes a banaction only port,
protocol and chain: the Redis URL and prefix then come from PUSHFW_REDIS_URL and
PUSHFW_KEY_PREFIX in fail2ban's environment, as for the pushfw CLI.)

(The ``.py`` in the action's name is how fail2ban tells a Python action from a ``.conf``
one; the file is not named ``pushfw.py`` because fail2ban registers the module under the
file's name, which would hide the ``pushfw`` package this action imports.)

Options (all strings, as fail2ban passes them):

    redis_url      the Redis that holds pushfw's streams (default: PUSHFW_REDIS_URL, else
                   redis://127.0.0.1:6379/0); jail.local is readable by every user, so a
                   URL with a password belongs in redis_url_file
    redis_url_file a file (mode 0600) holding that URL, as ``pushfw --redis-url-file``
                   reads it: one URL, blank lines and "# comments" aside (default:
                   PUSHFW_REDIS_URL_FILE); read at start and at every reload
    key_prefix     the workers' key_prefix (default: PUSHFW_KEY_PREFIX, else {pushfw})
    target         * (every host, the default) or host names / labels, comma-separated
    unban_on_stop  true: a fail2ban stop or restart lifts this jail's bans on every host
    python_path    where pushfw is installed, when fail2ban's python3 cannot import it: a
                   virtualenv, or site-packages directories, separated by ":"; the venv
                   must be built with the Python version fail2ban runs on
    client         auto (default): pushfw's producer client if importable, else redis-py;
                   pushfw, or redis, to insist on one
    redis_timeout  seconds to wait for Redis per command (default 1)
    redis_retry_s  after Redis failed, how long to leave it alone before trying again
                   (default 10, doubling up to 300 while it stays away)

pushfw never holds fail2ban up: after Redis failed once (unreachable, or frozen past
redis_timeout), the action stops calling it (a circuit breaker). It logs one warning, holds
the commands of the bans and unbans meanwhile (up to 100,000, in order; a ban whose time is
over by then is dropped), returns at once so the jail's own actions go on, and a thread of
its own sends what it holds once Redis answers again, saying so in one line.

Signing: PUSHFW_HMAC_KEY in fail2ban's environment (e.g. a systemd drop-in with
``EnvironmentFile=``) signs every command, as the pushfw CLI does.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import site
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fail2ban.server.action import ActionBase  # type: ignore[import-not-found]
from fail2ban.server.mytime import MyTime  # type: ignore[import-not-found]

DEFAULTS = {
    "redis_url": "redis://127.0.0.1:6379/0",
    "redis_url_file": "",
    "key_prefix": "{pushfw}",
    "target": "*",
    "unban_on_stop": "false",
    "python_path": "",
    "client": "auto",
    "redis_timeout": "1",
    "redis_retry_s": "10",
}
# What fail2ban's banaction interface (jail.conf's action_ and friends) passes to every
# action; meaningless here, so accepted without a warning.
BANACTION_OPTIONS = frozenset(
    {"port", "protocol", "chain", "name", "bantime", "blocktype", "returntype", "actname"}
)
MAX_TTL_S = 10 * 365 * 24 * 3600  # the wire format's bound on ttl
SIGNED_FIELDS = ("op", "ip", "ttl", "target", "reason", "request_id", "origin", "ts")
MAX_HELD = 100_000  # commands held while Redis is away; the oldest go first past it
MAX_RETRY_S = 300.0


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} = {value!r}: say true or false")


def add_python_path(spec: str) -> None:
    """Put each directory of ``spec`` (":"-separated; a venv stands for its site-packages)
    in front of ``sys.path``, its ``.pth`` files processed (editable installs need them)."""
    for entry in filter(None, (part.strip() for part in spec.split(os.pathsep))):
        path = Path(entry)
        if (path / "pyvenv.cfg").is_file():
            version = f"python{sys.version_info.major}.{sys.version_info.minor}"
            path = path / "lib" / version / "site-packages"
        if not path.is_dir():
            raise ValueError(
                f"python_path: {path} is not a directory (fail2ban runs Python "
                f"{sys.version.split()[0]}; a venv must be built with that version)"
            )
        before = list(sys.path)
        site.addsitedir(str(path))
        # in front: pushfw's own redis-py and pydantic, not older ones the system may have
        sys.path[:] = [p for p in sys.path if p not in before] + before


def read_url_file(path: str) -> str:
    """The one URL in the file at ``path``, as ``pushfw --redis-url-file`` reads it (blank
    lines and lines starting with "#" aside). Errors never quote the file's content."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ValueError(f"redis_url_file = {path}: {why}") from None
    urls = [u for u in (line.strip() for line in text.splitlines()) if u and not u.startswith("#")]
    if len(urls) != 1:
        raise ValueError(f"redis_url_file = {path}: holds {len(urls)} URLs, not one")
    return urls[0]


def redis_url(options: dict[str, str], environ: dict[str, str]) -> str:
    """The URL from the jail's options, else fail2ban's environment, else the default; a
    file beats a URL at the same level, as for the pushfw CLI."""
    if options.get("redis_url") and options.get("redis_url_file"):
        raise ValueError("give the Redis URL once: redis_url or redis_url_file")
    for source in (options, environ):
        if source.get("redis_url_file"):
            return read_url_file(source["redis_url_file"])
        if source.get("redis_url"):
            return source["redis_url"]
    return DEFAULTS["redis_url"]


def remaining_s(ban_time_s: int, since: float, now: float) -> int | None:
    """What is left of a ban from ``since`` for ``ban_time_s`` (< 0: forever, None)."""
    if ban_time_s < 0:
        return None
    return min(max(math.ceil(since + ban_time_s - now), 0), MAX_TTL_S)


def wire_fields(
    op: str, ip: str, ttl_s: int | None, target: tuple[str, ...], reason: str
) -> dict[str, str]:
    """A command as docs/producers.md spells it; no ``reply``: hosts write no result per ban."""
    fields = {"op": op, "ip": ip, "reason": reason}
    if ttl_s is not None:
        fields["ttl"] = str(ttl_s)
    if target:
        fields["target"] = ",".join(target)
    return fields


class Sender(Protocol):
    """One way of putting a command into the stream."""

    name: str
    outages: tuple[type[BaseException], ...]
    """Errors that mean Redis cannot be reached now (they open the breaker)."""

    def check(self, op: str, ip: str) -> None:
        """Raise ValueError if the command is invalid: nothing is sent, nor held."""

    def send(self, op: str, ip: str, ttl_s: int | None) -> str: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...


class ProducerSender:
    """pushfw's own client: validates like the CLI, every Redis topology of its URLs."""

    name = "pushfw.producer"

    def __init__(
        self, url: str, prefix: str, target: tuple[str, ...], reason: str, timeout_s: float
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from pushfw.producer import Producer, parse_command
        from pushfw.producer.connection import connect

        self.outages: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
        client = connect(  # no retries: the breaker is the retry
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._producer = Producer(client, prefix, os.environ.get("PUSHFW_HMAC_KEY") or None)
        self._parse = parse_command
        self._target, self._reason = target, reason

    def check(self, op: str, ip: str) -> None:
        self._parse(wire_fields(op, ip, None, self._target, self._reason))

    def send(self, op: str, ip: str, ttl_s: int | None) -> str:
        fields = wire_fields(op, ip, ttl_s, self._target, self._reason)
        return self._producer.send(self._parse(fields))  # invalid: raises, nothing is sent

    def ping(self) -> bool:
        return bool(self._producer.client.ping())

    def close(self) -> None:
        self._producer.client.close()


def signature(fields: dict[str, str], key: bytes) -> str:
    """The v1 signing rule of docs/producers.md ("Signing commands")."""
    lines = sorted(f"{k}={v}" for k, v in fields.items() if k in SIGNED_FIELDS)
    return hmac.new(key, "\n".join(lines).encode("utf-8"), hashlib.sha256).hexdigest()


class RedisSender:
    """Plain redis-py (Debian: python3-redis) and the wire format of docs/producers.md."""

    name = "redis-py"

    def __init__(
        self, url: str, prefix: str, target: tuple[str, ...], reason: str, timeout_s: float
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.outages: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)
        self._client = redis.Redis.from_url(  # no retries: the breaker is the retry
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._stream = f"{prefix}:cmd"
        self._target, self._reason = target, reason
        key = os.environ.get("PUSHFW_HMAC_KEY")
        self._key = key.encode("utf-8") if key else None

    def check(self, op: str, ip: str) -> None:
        ipaddress.ip_network(ip, strict=True)

    def send(self, op: str, ip: str, ttl_s: int | None) -> str:
        ipaddress.ip_network(ip, strict=True)  # ValueError: nothing is sent
        fields = wire_fields(op, ip, ttl_s, self._target, self._reason)
        if self._key is not None:
            fields["ts"] = str(time.time_ns() // 1_000_000)
            fields["sig"] = signature(fields, self._key)
        return str(self._client.xadd(self._stream, fields))  # type: ignore[arg-type]

    def ping(self) -> bool:
        return bool(self._client.ping())

    def close(self) -> None:
        self._client.close()


def make_sender(
    choice: str, url: str, prefix: str, target: tuple[str, ...], reason: str, timeout_s: float
) -> Sender:
    """The client ``choice`` (auto, pushfw, redis) names; auto prefers pushfw's."""
    if choice not in ("auto", "pushfw", "redis"):
        raise ValueError(f"client = {choice!r}: say auto, pushfw or redis")
    why_not_pushfw = ""
    if choice in ("auto", "pushfw"):
        try:
            return ProducerSender(url, prefix, target, reason, timeout_s)
        except ImportError as exc:
            if choice == "pushfw":
                raise
            why_not_pushfw = f"pushfw: {exc}; "
    try:
        return RedisSender(url, prefix, target, reason, timeout_s)
    except ImportError as exc:
        raise RuntimeError(
            "the pushfw action needs pushfw (python_path = its virtualenv) or redis-py "
            f"(apt-get install python3-redis) in fail2ban's Python {sys.version.split()[0]} "
            f"({why_not_pushfw}redis-py: {exc})"
        ) from exc


@dataclass(frozen=True)
class Command:
    """One command for pushfw; a ban's ttl is what is left of it when it is sent."""

    op: str
    ip: str
    ban_time_s: int | None = None
    since: float = 0.0

    def ttl_s(self, now: float) -> int | None:
        if self.ban_time_s is None:
            return None
        return remaining_s(self.ban_time_s, self.since, now)


class Breaker:
    """After Redis failed, leave it alone for a while: fail2ban's own actions never wait.

    While open, commands are held in order and a thread of its own sends them once Redis
    answers (trying after ``retry_s``, doubling up to :data:`MAX_RETRY_S`); only then does
    it close, so nothing sent later overtakes what it holds.

    Args:
        deliver: sends one command (raises what ``is_outage`` tells apart when Redis is away).
        probe: asks Redis whether it answers (raises like ``deliver``).
        is_outage: whether an error means Redis cannot be reached now.
        log: fail2ban's logger for this action.
        label: the jail's name, for the log lines.
        retry_s: the first wait before trying Redis again.
    """

    def __init__(
        self,
        deliver: Callable[[Command], None],
        probe: Callable[[], object],
        is_outage: Callable[[BaseException], bool],
        log: Any,
        label: str,
        retry_s: float,
    ) -> None:
        self._deliver, self._probe, self._is_outage = deliver, probe, is_outage
        self._log, self._label = log, label
        self.retry_s = retry_s
        self._held: deque[Command] = deque()
        self._lost = 0
        self._open = False
        self._since = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_open(self) -> bool:
        return self._open

    def hold(self, command: Command) -> bool:
        """Hold ``command`` while open (True); False: closed, the caller sends it."""
        with self._lock:
            if not self._open:
                return False
            self._keep(command)
            return True

    def trip(self, exc: BaseException, command: Command | None = None) -> None:
        """Redis failed on ``command`` (held for later): open, and say so once."""
        with self._lock:
            if command is not None:
                self._keep(command)
            if self._open:
                return
            self._open, self._since = True, time.monotonic()
            self._stop.clear()
        self._log.warning(
            "[%s] pushfw action: Redis does not answer (%s): the jail's bans go on here; "
            "pushfw's are held and sent once it answers (tried again in %g s)",
            self._label,
            str(exc) or type(exc).__name__,
            self.retry_s,
        )
        self._thread = threading.Thread(
            target=self._recover, name=f"pushfw-{self._label}", daemon=True
        )
        self._thread.start()

    def _keep(self, command: Command) -> None:
        if len(self._held) >= MAX_HELD:
            self._held.popleft()
            self._lost += 1
        self._held.append(command)

    def _recover(self) -> None:
        delay = self.retry_s
        while not self._stop.wait(delay):
            try:
                self._probe()
                sent = self._send_held()
            except Exception as exc:  # whatever it is, the breaker must not die open
                if not self._is_outage(exc):
                    self._log.error("[%s] pushfw action: Redis: %s", self._label, exc)
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            with self._lock:
                lost, self._lost = self._lost, 0
            self._log.info(
                "[%s] pushfw action: Redis answers again after %.1f s: sent the %d command(s) "
                "held meanwhile%s",
                self._label,
                time.monotonic() - self._since,
                sent,
                f" ({lost} more were dropped: over {MAX_HELD} held)" if lost else "",
            )
            return

    def _send_held(self) -> int:
        """Send every held command in order, then close; raises an outage's error."""
        sent = 0
        while True:
            with self._lock:
                if not self._held:
                    self._open = False
                    return sent
                command = self._held[0]
            try:
                self._deliver(command)
                sent += 1
            except Exception as exc:
                if self._is_outage(exc):
                    raise
                self._log.error(
                    "[%s] pushfw action: %s %s not sent: %s",
                    self._label,
                    command.op,
                    command.ip,
                    exc,
                )
            with self._lock:
                if self._held and self._held[0] is command:  # close() may have emptied it
                    self._held.popleft()

    def close(self) -> None:
        """The action stops: what is still held is not sent (said so)."""
        self._stop.set()
        with self._lock:
            held, self._held, self._open = len(self._held), deque(), False
        if held:
            self._log.warning(
                "[%s] pushfw action: stopping while Redis does not answer: %d command(s) "
                "held for pushfw were not sent",
                self._label,
                held,
            )


def _targets(value: str) -> tuple[str, ...]:
    names = tuple(filter(None, (t.strip() for t in value.split(","))))
    return () if names in ((), ("*",)) else names


class Action(ActionBase):  # type: ignore[misc]
    """The pushfw action of one jail: one Redis connection, one command per ban or unban."""

    def __init__(self, jail: Any, name: str, **options: str) -> None:
        super().__init__(jail, name)
        self._sender: Sender | None = None
        self._unban_on_stop = False
        self._broken = ""
        self._breaker = Breaker(
            self._deliver,
            lambda: self.sender.ping(),
            self._is_outage,
            self._logSys,
            jail.name,
            float(DEFAULTS["redis_retry_s"]),
        )
        self._configure(options)

    def _configure(self, options: dict[str, str]) -> None:
        # An exception here would stop the whole fail2ban-server, the host's own firewall
        # actions too: log it, and let every ban of this action fail with it instead.
        try:
            self._setup(options)
            self._broken = ""
        except (ImportError, RuntimeError, ValueError) as exc:
            self._broken = f"pushfw action not configured: {exc}"
            self._logSys.error("[%s] %s", self._jail.name, self._broken)

    def _setup(self, options: dict[str, str]) -> None:
        unknown = set(options) - set(DEFAULTS) - BANACTION_OPTIONS
        if unknown:
            self._logSys.warning("pushfw action: unknown options ignored: %s", sorted(unknown))
        environ = {
            "redis_url": os.environ.get("PUSHFW_REDIS_URL", ""),
            "redis_url_file": os.environ.get("PUSHFW_REDIS_URL_FILE", ""),
            "key_prefix": os.environ.get("PUSHFW_KEY_PREFIX", ""),
        }
        given = {k: str(v) for k, v in options.items()}
        opts = {**DEFAULTS, **{k: v for k, v in environ.items() if v}, **given}
        self._unban_on_stop = _flag("unban_on_stop", opts["unban_on_stop"])
        retry_s = float(opts["redis_retry_s"])
        if not 0 < retry_s <= MAX_RETRY_S:
            raise ValueError(f"redis_retry_s = {retry_s:g}: say a number of seconds up to 300")
        self._breaker.retry_s = retry_s
        add_python_path(opts["python_path"])
        sender = make_sender(
            opts["client"].strip().lower(),
            redis_url(given, environ),
            opts["key_prefix"],
            _targets(opts["target"]),
            f"fail2ban {self._jail.name}",
            float(opts["redis_timeout"]),
        )
        if self._sender is not None:
            self._sender.close()
        self._sender = sender

    @property
    def sender(self) -> Sender:
        if self._broken or self._sender is None:
            raise RuntimeError(self._broken or "pushfw action: no sender")
        return self._sender

    def start(self) -> None:
        if self._broken:
            return
        if self._breaker.is_open:
            return
        try:
            self.sender.ping()
            self._logSys.info("pushfw action: Redis answers (client %s)", self.sender.name)
        except Exception as exc:  # fail2ban keeps the jail; the breaker tries Redis again
            if not self._is_outage(exc):
                self._logSys.warning("pushfw action: Redis does not answer yet: %s", exc)
                return
            self._breaker.trip(exc)

    def stop(self) -> None:
        self._breaker.close()
        if self._sender is not None:
            self._sender.close()

    def _send(self, command: Command) -> None:
        """Send now, or hold while the breaker is open; an invalid command raises."""
        sender = self.sender
        sender.check(command.op, command.ip)
        if self._breaker.hold(command):
            return
        try:
            self._deliver(command)
        except Exception as exc:
            if not self._is_outage(exc):
                raise
            self._breaker.trip(exc, command)

    def _deliver(self, command: Command) -> None:
        ttl_s = command.ttl_s(MyTime.time())
        if ttl_s == 0:
            return  # the ban is over: its drop would end at once
        self.sender.send(command.op, command.ip, ttl_s)

    def _is_outage(self, exc: BaseException) -> bool:
        return self._sender is not None and isinstance(exc, self._sender.outages)

    def ban(self, aInfo: Any) -> None:
        ban_time_s, since = int(aInfo["bantime"]), float(aInfo["time"])
        if remaining_s(ban_time_s, since, MyTime.time()) == 0:
            self._logSys.info("pushfw action: the ban of %s is over already", aInfo["ip"])
            return
        self._send(Command("drop.insert", str(aInfo["ip"]), ban_time_s, since))

    def reban(self, aInfo: Any) -> None:
        self.ban(aInfo)

    @property
    def _prolongable(self) -> bool:
        return True  # bantime.increment: a longer ban is the same drop with a longer ttl

    def prolong(self, aInfo: Any) -> None:
        self.ban(aInfo)

    def unban(self, aInfo: Any) -> None:
        if self._stopping():
            if not self._unban_on_stop:
                return
        elif remaining_s(int(aInfo["bantime"]), float(aInfo["time"]), MyTime.time()) == 0:
            return  # over: the ttl ended it in pushfw; a delete could end a newer ban
        self._send(Command("drop.delete", str(aInfo["ip"])))

    def flush(self) -> bool:
        """fail2ban's flush (on stop, on "unban --all", when a reload drops this action):
        True means done, so fail2ban calls no ``unban`` per address on this action."""
        if self._unban_on_stop or not self._leaving():
            return False
        self._logSys.notice(
            "[%s] pushfw action: leaving the bans in pushfw, they end with their ttl",
            self._jail.name,
        )
        return True

    # fail2ban keeps a Python action across "fail2ban-client reload" only if it has both.
    def clearAllParams(self) -> None:
        pass

    def reload(self, **options: str) -> None:
        self._configure(options)

    def _stopping(self) -> bool:
        """Whether the jail's actions thread is shutting down (fail2ban stop or restart)."""
        return getattr(getattr(self._jail, "actions", None), "active", None) is False

    def _leaving(self) -> bool:
        # Actions.reload sets _reload_actions while it removes actions a reload left out
        actions = getattr(self._jail, "actions", None)
        return self._stopping() or hasattr(actions, "_reload_actions")
