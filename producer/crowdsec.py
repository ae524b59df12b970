"""``pushfw crowdsec``: a CrowdSec bouncer that turns Local API decisions into pushfw commands.

The bridge follows a CrowdSec Local API (LAPI) the way a firewall bouncer does: with a bouncer
API key (header ``X-Api-Key``) it pulls ``GET /v1/decisions/stream?startup=true`` (every
active decision) and then ``startup=false`` (what was added and removed since its last pull)
every interval. A ``ban`` on scope ``Ip`` or ``Range`` becomes ``drop.insert`` with the
decision's remaining duration as ``ttl`` (rounded up to whole seconds) and the reason
``crowdsec <origin>: <scenario>``; a ban that CrowdSec lifts becomes ``drop.delete``. Other
types (captcha, throttle) and scopes (Country, AS, ...) are skipped and counted.

What was sent lives in Redis, in the hash ``<prefix>:crowdsec`` (network -> the decision id,
its end in Redis's clock, the reason), and every change is one ``MULTI``/``EXEC`` with its
``XADD``: a crash leaves both or neither. The first pull of a process, and the first after
any failure (LAPI or Redis unreachable, LAPI restarted), is a startup pull that is diffed
against this hash: only bans the hash lacks are sent, and only bans it holds that CrowdSec no
longer has are lifted (a ban whose end has passed is forgotten without a command: its ttl
already ended it). So neither side's restart duplicates or loses a decision.

Exceptions::

    LapiError            the LAPI was unreachable or answered something unreadable (retried)
     └── LapiAuthError   the LAPI refused the API key (HTTP 401/403): fatal
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import click
import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pushfw.producer.client import Producer
from pushfw.producer.contract import MAX_REASON_LEN, MAX_TTL_S, Command, Op, parse_network
from pushfw.producer.duration import parse_duration
from pushfw.producer.journal import PriorityFormatter, journal_stream

__all__ = [
    "SLACK_MS",
    "Bridge",
    "Decision",
    "DecisionStream",
    "Lapi",
    "LapiAuthError",
    "LapiError",
    "PullStats",
    "Sent",
    "crowdsec_command",
    "parse_go_duration",
]

logger = logging.getLogger(__name__)

SLACK_MS = 2000
"""Ends closer than this are the same end: a decision's remaining duration, read at two
pulls, differs by the pulls' latency. A ban this close to its end is left to its ttl."""

_BATCH = 500  # changes per MULTI/EXEC: one round trip each, atomic each
_SCOPES = frozenset({"ip", "range"})
_GO_PART = re.compile(r"([0-9]*\.?[0-9]+)(h|ms|m|s|us|µs|μs|ns)")
_GO_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_GO_MAX_S = (2**63 - 1) / 1e9  # a Go time.Duration is an int64 of nanoseconds


class LapiError(Exception):
    """The Local API could not be reached, or answered something that is not a stream."""


class LapiAuthError(LapiError):
    """The Local API refused the bouncer API key."""


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration as CrowdSec writes it (``3h59m50.1s``, ``-123.7ms``).

    Raises:
        ValueError: ``text`` is not a Go duration.
    """
    raw = text.strip()
    body = raw.removeprefix("-").removeprefix("+")
    if body == "0":
        return 0.0
    parts = _GO_PART.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"{text[:40]!r} is not a duration")
    seconds = sum(float(n) * _GO_UNITS[u] for n, u in parts)
    if not seconds <= _GO_MAX_S:  # NaN and inf (310 digits) too
        raise ValueError(f"{text[:40]!r} is longer than a Go duration can be (292 years)")
    return -seconds if raw.startswith("-") else seconds


class Decision(BaseModel):
    """One decision of the LAPI's stream (fields this bridge does not use are ignored)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: int = Field(ge=0, lt=2**63)  # CrowdSec's ids are positive int64
    origin: str = ""
    type: str = ""
    scope: str = ""
    value: str = ""
    duration: str = ""
    scenario: str = ""


class DecisionStream(BaseModel):
    """An answer of ``/v1/decisions/stream``: ``null`` lists mean none.

    The decisions stay raw JSON here: each is checked on its own (:func:`_decisions`), so a
    bad one is skipped, never the pull that brought it.
    """

    model_config = ConfigDict(extra="ignore")

    new: list[Any] | None = None
    deleted: list[Any] | None = None


class Sent(BaseModel):
    """What the bridge sent for one network: the state it compares the next pull with."""

    id: int
    until_ms: int
    reason: str = ""


@dataclass
class PullStats:
    """What one pull brought and what the bridge did with it."""

    startup: bool
    new: int = 0
    deleted: int = 0
    inserts: int = 0
    deletes: int = 0
    forgotten: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        kind = "startup pull" if self.startup else "pull"
        text = (
            f"{kind}: {self.new} new, {self.deleted} deleted; sent {self.inserts} drop.insert,"
            f" {self.deletes} drop.delete"
        )
        if self.forgotten:
            text += f"; {self.forgotten} ended on their own"
        if self.skipped:
            text += "; skipped " + ", ".join(
                f"{n} {why}" for why, n in sorted(self.skipped.items())
            )
        return text


@dataclass(frozen=True)
class Lapi:
    """A CrowdSec Local API, read with a bouncer API key.

    Args:
        url: the LAPI's base URL (``http://127.0.0.1:8080``).
        api_key: a key from ``cscli bouncers add NAME``.
        timeout_s: for connecting and for each read.
    """

    url: str
    api_key: str = field(repr=False)
    timeout_s: float = 30.0

    def pull(self, startup: bool) -> DecisionStream:
        """``GET /v1/decisions/stream?startup=...``.

        Raises:
            LapiAuthError: the key was refused.
            LapiError: anything else went wrong; the caller retries with a startup pull.
        """
        url = f"{self.url.rstrip('/')}/v1/decisions/stream?startup={str(startup).lower()}"
        headers = {"X-Api-Key": self.api_key, "User-Agent": "pushfw-crowdsec/1"}
        request = urllib.request.Request(url, headers=headers)
        try:
            with _opener(self.url).open(request, timeout=self.timeout_s) as reply:
                body = reply.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise LapiAuthError(f"{self.url} refused the API key (HTTP {exc.code})") from exc
            raise LapiError(f"{self.url}: HTTP {exc.code} {exc.reason}") from exc
        except OSError as exc:  # URLError, refused, timeouts
            raise LapiError(f"{self.url}: {getattr(exc, 'reason', exc)}") from exc
        try:
            return DecisionStream.model_validate_json(body)
        except ValidationError as exc:
            raise LapiError(f"{self.url}: not a decision stream: {body[:80]!r}") from exc


def _opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's, minus the environment's proxies for a LAPI on loopback (as Go's bouncers)."""
    host = urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if local:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


@dataclass(frozen=True)
class _Change:
    key: str
    command: Command | None  # None: only the bridge's state changes
    sent: Sent | None  # None: the network is forgotten


class Bridge:
    """Follows a LAPI and sends its bans to the command stream.

    Args:
        lapi: the Local API to follow.
        producer: sends the commands (its prefix also names the state hash).
        hmac_key: the producer's signing key, if any (each batch gets a producer of its own
            on a transaction).
        target: host names or labels every command is meant for (empty: every host).
    """

    def __init__(
        self,
        lapi: Lapi,
        producer: Producer,
        hmac_key: str | None = None,
        target: tuple[str, ...] = (),
    ) -> None:
        self.lapi = lapi
        self.producer = producer
        self.state_key = f"{producer.keys.prefix}:crowdsec"
        self._hmac_key = hmac_key
        self._target = target
        self._synced = False

    def state(self, keys: list[str] | None = None) -> dict[str, Sent]:
        """What the bridge has sent and not lifted yet, by network (all, or these)."""
        client = self.producer.client
        if keys is None:
            raw = cast(dict[str, str], client.hgetall(self.state_key))
        elif keys:
            values = cast(list[str | None], client.hmget(self.state_key, keys))
            raw = {k: v for k, v in zip(keys, values, strict=True) if v is not None}
        else:
            raw = {}
        return {k: _sent(k, v) for k, v in raw.items()}

    def pull(self) -> PullStats:
        """One pull and its commands: a startup pull first and after every failure.

        Raises:
            LapiError: from :meth:`Lapi.pull`.
            redis.RedisError: the commands or the state could not be written.
        """
        startup = not self._synced
        self._synced = False  # until this pull's commands are all written
        stream = self.lapi.pull(startup)
        now_ms = self.producer.now_ms()
        stats = PullStats(startup, len(stream.new or ()), len(stream.deleted or ()))
        wanted = _bans(stream.new or [], now_ms, stats.skipped)
        lifted = {} if startup else _bans(stream.deleted or [], now_ms, Counter())
        # a startup pull is the whole truth; a delta touches only the networks it names
        state = self.state(None if startup else [*wanted, *lifted.keys() - wanted.keys()])
        self._commit(self._plan(wanted, lifted, startup, state, now_ms, stats))
        self._synced = True
        return stats

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Pull every ``interval_s`` until ``stop`` is set; failures are logged and retried.

        Raises:
            LapiAuthError: the key was refused (retrying cannot help).
        """
        while not stop.is_set():
            self._iteration()
            stop.wait(interval_s)

    def _iteration(self) -> None:
        try:
            stats = self.pull()
        except LapiAuthError:
            raise
        except (LapiError, redis.RedisError) as exc:
            logger.warning("pull failed (the next one is a startup pull): %s", exc)
            return
        changed = stats.inserts or stats.deletes or stats.forgotten or stats.startup
        logger.log(logging.INFO if changed else logging.DEBUG, "%s", stats.line())

    def _plan(
        self,
        wanted: dict[str, tuple[Decision, int]],
        lifted: dict[str, tuple[Decision, int]],
        startup: bool,
        state: dict[str, Sent],
        now_ms: int,
        stats: PullStats,
    ) -> list[_Change]:
        if startup:  # whatever the whole truth lacks was lifted while nobody looked
            gone = [key for key in state if key not in wanted]
        else:  # the LAPI lists a deleted ban again for a while, and only once none is left
            gone = [key for key in lifted if key in state and key not in wanted]
        changes = [self._lift(key, state[key], now_ms, stats) for key in gone]
        for key, (decision, until_ms) in wanted.items():
            change = self._ban(key, decision, until_ms, state.get(key), startup, now_ms, stats)
            if change is not None:
                changes.append(change)
        return changes

    def _lift(self, key: str, sent: Sent, now_ms: int, stats: PullStats) -> _Change:
        if sent.until_ms - now_ms <= SLACK_MS:
            stats.forgotten += 1
            logger.debug("%s ended on its own (decision %d)", key, sent.id)
            return _Change(key, None, None)
        stats.deletes += 1
        logger.debug("%s lifted (decision %d)", key, sent.id)
        return _Change(key, self._command(Op.DROP_DELETE, key, None, sent.reason), None)

    def _ban(
        self,
        key: str,
        d: Decision,
        until_ms: int,
        sent: Sent | None,
        startup: bool,
        now_ms: int,
        stats: PullStats,
    ) -> _Change | None:
        """A new ban, a longer one, or (in a startup pull, which is the whole truth) a
        shorter one is sent; the same decision again, or one ending when it does, is not."""
        if sent is not None:
            longer = until_ms > sent.until_ms + SLACK_MS
            shorter = until_ms < sent.until_ms - SLACK_MS
            if sent.id == d.id or not (longer or (startup and shorter)):
                return None
        ttl_s = math.ceil((until_ms - now_ms) / 1000)
        if ttl_s <= 0:
            stats.skipped["already ended"] += 1
            return None
        reason = _reason(d)
        stats.inserts += 1
        logger.debug("%s banned for %d s (decision %d, %s)", key, ttl_s, d.id, reason)
        command = self._command(Op.DROP_INSERT, key, min(ttl_s, MAX_TTL_S), reason)
        return _Change(key, command, Sent(id=d.id, until_ms=until_ms, reason=reason))

    def _command(self, op: Op, key: str, ttl_s: int | None, reason: str) -> Command:
        return Command(
            op=op, network=key, ttl_s=ttl_s, target=self._target, reason=reason, origin="crowdsec"
        )

    def _commit(self, changes: list[_Change]) -> None:
        """Each batch's XADDs and state changes in one transaction."""
        for start in range(0, len(changes), _BATCH):
            with self.producer.client.pipeline(transaction=True) as pipe:
                sender = Producer(pipe, self.producer.keys.prefix, self._hmac_key)
                for change in changes[start : start + _BATCH]:
                    if change.command is not None:
                        sender.send(change.command)  # queued: the id comes from EXEC
                    if change.sent is None:
                        pipe.hdel(self.state_key, change.key)
                    else:
                        pipe.hset(self.state_key, change.key, change.sent.model_dump_json())
                pipe.execute()


def _sent(key: str, raw: str) -> Sent:
    """A record of the state hash; an unreadable one stands for a ban that has ended, so
    the next pull sends the ban again if CrowdSec still has it, and forgets it if not."""
    try:
        return Sent.model_validate_json(raw)
    except ValidationError as exc:
        logger.warning("state of %s unreadable, taken as ended: %s", key[:60], _why(exc))
        return Sent(id=-1, until_ms=0)


def _why(exc: ValidationError) -> str:
    """pydantic's errors in one short line: ``field: message`` each."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
        for err in exc.errors(include_url=False)[:3]
    )


def _decisions(raw: list[Any], skipped: Counter[str]) -> list[Decision]:
    """The decisions that are decisions: each bad one is logged, counted and skipped."""
    out = []
    for item in raw:
        try:
            out.append(Decision.model_validate(item))
        except ValidationError as exc:
            shown = item.get("id") if isinstance(item, dict) else item
            logger.warning("decision %.40r skipped: %s", shown, _why(exc))
            skipped["invalid"] += 1
    return out


def _bans(
    decisions: list[Any], now_ms: int, skipped: Counter[str]
) -> dict[str, tuple[Decision, int]]:
    """Bans by network, the longest per network, with their ends in Redis's clock."""
    out: dict[str, tuple[Decision, int]] = {}
    for d in _decisions(decisions, skipped):
        if d.type.lower() != "ban":
            skipped[f"type {d.type[:20] or '?'}"] += 1
            continue
        if d.scope.lower() not in _SCOPES:
            skipped[f"scope {d.scope[:20] or '?'}"] += 1
            continue
        try:
            net = parse_network(str(ipaddress.ip_network(d.value, strict=False)))
            seconds = parse_go_duration(d.duration)
        except ValueError as exc:
            logger.warning("decision %d skipped: %s", d.id, str(exc)[:200])
            skipped["invalid"] += 1
            continue
        key = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        until_ms = now_ms + math.ceil(seconds * 1000)
        if key not in out or until_ms > out[key][1]:
            out[key] = (d, until_ms)
    return out


def _reason(d: Decision) -> str:
    """``crowdsec <origin>: <scenario>``, without control characters, within the limit."""
    text = _CONTROL.sub(" ", f"crowdsec {d.origin or '?'}: {d.scenario or d.type}").strip()
    return text if len(text) <= MAX_REASON_LEN else text[: MAX_REASON_LEN - 3] + "..."


def _key(api_key: str | None, api_key_file: Path | None) -> str:
    if api_key and api_key_file:
        raise click.UsageError(
            "give the API key once: --api-key (or CROWDSEC_API_KEY) or --api-key-file"
        )
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except OSError as exc:
            raise click.BadParameter(
                f"{api_key_file}: {exc.strerror}", param_hint="--api-key-file"
            ) from None
    if not api_key:
        raise click.UsageError(
            "a bouncer API key is needed (cscli bouncers add pushfw): "
            "--api-key-file, env CROWDSEC_API_KEY or --api-key"
        )
    return api_key


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


def _check_interval(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_target(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in value.split(",") if t.strip() not in ("", "*"))
    try:
        Command(op=Op.DROP_DELETE, network="192.0.2.1", target=names)
    except ValidationError as exc:
        raise click.BadParameter(
            str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        ) from None
    return names


def _setup_logging(verbose: bool) -> None:
    """Log to stderr, each line with its syslog priority when stderr is the journal's."""
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            PriorityFormatter(
                "pushfw crowdsec: %(levelname)s %(message)s", journal_stream(sys.stderr)
            )
        )
        logging.getLogger().addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


@click.command(name="crowdsec")
@click.option(
    "--lapi-url",
    envvar="CROWDSEC_LAPI_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    callback=_check_url,
    help="The CrowdSec Local API (env CROWDSEC_LAPI_URL).",
)
@click.option(
    "--api-key",
    envvar="CROWDSEC_API_KEY",
    default=None,
    help="Bouncer API key from 'cscli bouncers add NAME' (env CROWDSEC_API_KEY).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the bouncer API key from this file.",
)
@click.option(
    "--interval",
    "interval_s",
    default="10s",
    show_default=True,
    callback=_check_interval,
    help="Time between pulls (10s, 1m).",
)
@click.option(
    "--target",
    default="*",
    show_default=True,
    callback=_check_target,
    help="Host names or labels, comma-separated.",
)
@click.option("--once", is_flag=True, help="One startup pull, its commands, then exit.")
@click.option("--verbose", "-v", is_flag=True, help="Log every decision.")
@click.pass_context
def crowdsec_command(ctx: click.Context, /, **opts: Any) -> None:
    """Send a CrowdSec Local API's bans to every host (a bouncer for the whole fleet)."""
    _setup_logging(opts["verbose"])
    lapi = Lapi(opts["lapi_url"], _key(opts["api_key"], opts["api_key_file"]))
    hmac_key = ctx.find_root().params.get("hmac_key")
    bridge = Bridge(lapi, cast(Producer, ctx.obj), hmac_key, opts["target"])
    try:
        if opts["once"]:
            logger.info("%s", bridge.pull().line())
            return
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        logger.info(
            "following %s every %d s; state in %s", lapi.url, opts["interval_s"], bridge.state_key
        )
        bridge.run(opts["interval_s"], stop)
        logger.info("stopped")
    except LapiError as exc:
        logger.error("%s", exc)  # through the handler: journald sees an error
        sys.exit(1)
