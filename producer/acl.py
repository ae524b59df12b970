"""Redis ACL users for pushfw: a producer that can push and read, a worker with just its needs.

Every rule here was worked out from the code that runs under it (``client.py`` and the
``pushfw`` CLI for the producer; ``worker/stream.py``, ``ledger.py``, ``scheduler.py``,
``retention.py``, ``heartbeat.py`` and the Lua they load for the worker) and is proven by
``tests/test_acl.py`` against a real redis-server. Rules need Redis >= 7.0 (read/write key
permissions ``%R~``/``%W~``).

- **producer**: ``XADD`` to the command stream and nothing else may be written but list
  contents, and those only through the ``list_store`` Redis Function (``pushfw import``):
  a string, once, with no expiry. Redis checks what a Function calls against the caller's
  ACL, so a selector grants on content keys ``FCALL`` and the commands ``list_store``
  calls: ``SETNX`` and ``PERSIST`` (which cannot overwrite, set an expiry or change a type),
  ``TYPE`` and ``GET``; never ``SET``, ``XADD``, ``PEXPIRE`` or ``DEL``. It may read results,
  dead letters, the ledger and the heartbeats (``pushfw wait/results/dead/list/lists/status``).
  ``minimal=True`` leaves only ``XADD`` (no lists). ACLs cannot look at arguments:
  ``XADD ... MAXLEN 0`` can still trim the command stream.
- **worker**: stream consumption (its group and the ledger's), results, dead letters,
  the ledger hash, the expiry queue, the TTL marker keys, heartbeats, and the key-expiry
  channel. Not ``CONFIG``: it cannot be limited to one parameter, so set
  ``notify-keyspace-events Ex`` in redis.conf; without it the worker logs one line and the
  scheduler's timer alone meets the expiry bound.

Passwords are written as ``#<sha256 hex>``, so the printed rules do not carry them.
"""

from __future__ import annotations

import hashlib
import re

from pushfw.producer.keys import DEFAULT_PREFIX, Keys

__all__ = [
    "PRODUCER_USER",
    "WORKER_USER",
    "acl_file_lines",
    "password_rule",
    "producer_rules",
    "setuser_commands",
    "worker_rules",
]

PRODUCER_USER = "pushfw-producer"
WORKER_USER = "pushfw-worker"

# redis-py's handshake and health checks (AUTH needs no permission). CLIENT SETINFO exists
# from Redis 7.2 on; redis-py ignores its failure, so it is granted only where it exists.
_CONNECTION = ("+ping", "+hello")
_SETINFO = "+client|setinfo"

_PRODUCER_READ = (
    "+xread",  # Producer.wait (pushfw ... --wait)
    "+xrange",
    "+xrevrange",  # pushfw results, pushfw dead
    "+hscan",  # pushfw list: the ledger
    "+hgetall",  # pushfw status, pushfw list --host: the heartbeats
    "+time",  # Redis's clock, which every expiry is measured by
)
_PRODUCER_LISTS = (
    # pushfw import: FCALL list_store, and what it calls (functions.lua), on content keys
    # only: the one selector that names them grants no other command
    "+fcall",
    "+setnx",  # a new string, never over a key, never with an expiry
    "+persist",  # the same content again: the version is kept, not left to expire
    "+type",
    "+get",  # list_store compares what is there; content is not secret
)

_WORKER = (
    # its host group and the shared ledger group (stream.py, ledger.py, retention.py)
    "+xgroup|create",
    "+xgroup|destroy",  # retention retires hosts silent past retire_after_s
    "+xreadgroup",
    "+xautoclaim",
    "+xclaim",
    "+xpending",
    "+xack",
    "+xinfo|groups",
    "+xinfo|stream",  # a follower's position against the stream (follower.py)
    "+xread",  # a follower reads the stream on a replica (read_url)
    "+xrevrange",
    "+xadd",  # results, dead letters; the scheduler's *.delete (from Lua)
    "+xtrim",  # retention
    "+multi",  # results + XACK in one transaction
    "+exec",
    # the ledger, scheduler and retention scripts, which redis-py loads on first use
    "+evalsha",
    "+script|load",
    "+script|exists",
    # what the worker and those scripts call on the ledger, queue, markers and heartbeats
    "+hget",
    "+hmget",
    "+hset",
    "+hsetnx",  # first-seen stamps of entries ahead of Redis's clock
    "+hincrby",
    "+hdel",
    "+hlen",
    "+hscan",
    "+hgetall",
    "+zadd",
    "+zrem",
    "+zscore",
    "+zrangebyscore",
    "+set",  # TTL marker keys, from the fold script; the ledger's generation marker
    "+get",
    "+type",  # a list's content is read only if it is a string ...
    "+strlen",  # ... of the length its command's size allows
    "+exists",
    "+del",
    "+pexpire",  # the list fold script: a replaced version's content expires after a grace
    "+pexpireat",  # ... and a timed list's content with the list
    "+persist",  # ... and the version it installs stays
    "+time",
    "+psubscribe",  # key-expiry events wake the scheduler
)

_GLOB = re.compile(r"([*?\[\]\\])")
_VERSION = re.compile(r"(\d+)\.(\d+)")


def _glob(text: str) -> str:
    """``text`` as a literal inside an ACL key pattern."""
    return _GLOB.sub(r"\\\1", text)


def _check_prefix(prefix: str) -> None:
    if not prefix or any(c.isspace() or not c.isprintable() or c in "\"'" for c in prefix):
        raise ValueError(f"prefix {prefix!r} must be printable, without spaces or quotes")


def _version(redis_version: str) -> tuple[int, int]:
    match = _VERSION.match(redis_version)
    if match is None:
        raise ValueError(f"redis version {redis_version!r} is not MAJOR.MINOR (e.g. 7.2)")
    return int(match[1]), int(match[2])


def _connection(db: int, redis_version: str) -> list[str]:
    rules = list(_CONNECTION)
    if _version(redis_version) >= (7, 2):
        rules.append(_SETINFO)
    if db:
        rules.append("+select")
    return rules


def password_rule(password: str) -> str:
    """``#<sha256 hex>``: the ACL rule that sets this password without spelling it."""
    if not password:
        raise ValueError("an empty password would let anyone in")
    return "#" + hashlib.sha256(password.encode("utf-8")).hexdigest()


def producer_rules(
    prefix: str = DEFAULT_PREFIX,
    *,
    minimal: bool = False,
    fcall: bool = False,
    db: int = 0,
    redis_version: str = "7.0",
) -> list[str]:
    """Key, channel and command rules of the producer user (no password, no ``on``).

    ``fcall`` adds the Redis Functions (``FCALL drop_insert ...``); Redis checks the keys a
    FCALL declares for reading and writing, so the command stream becomes readable too.
    """
    _check_prefix(prefix)
    keys = Keys(prefix)
    rules = ["resetchannels", f"%{'RW' if fcall else 'W'}~{_glob(keys.cmd)}"]
    if not minimal:
        rules += [
            f"%R~{_glob(k)}" for k in (keys.results, keys.dead, keys.rules, keys.hosts, keys.ahead)
        ]
        rules.append(f"%R~{_glob(keys.hits(''))}*")  # pushfw list --hits: every host's hash
        rules.append(f"%R~{_glob(keys.list_hits(''))}*")  # pushfw lists: hits per list
        rules.append(f"%R~{_glob(keys.lists)}")  # pushfw lists
    rules += ["-@all", "+xadd", *_connection(db, redis_version)]
    if fcall:
        rules.append("+fcall")
    if not minimal:
        rules += list(_PRODUCER_READ)
        # a selector: its commands apply to content keys only, and the commands above
        # (XADD) never reach them
        content = f"~{_glob(keys.list_content('', ''))[:-1]}*"
        rules += [f"({content}", *_PRODUCER_LISTS[:-1], f"{_PRODUCER_LISTS[-1]})"]
    return rules


def worker_rules(
    prefix: str = DEFAULT_PREFIX, *, db: int = 0, redis_version: str = "7.0"
) -> list[str]:
    """Key, channel and command rules of the worker user (no password, no ``on``).

    The channel is literal: Redis matches a PSUBSCRIBE pattern against the user's channel
    rules as a string, so ``&__keyevent@*__:expired`` would not admit it.
    """
    _check_prefix(prefix)
    return [
        "resetchannels",
        f"&__keyevent@{db}__:expired",
        f"~{_glob(prefix)}:*",
        "-@all",
        *_connection(db, redis_version),
        *_WORKER,
    ]


def _users(
    producer_secret: str,
    worker_secret: str,
    prefix: str,
    minimal: bool,
    fcall: bool,
    db: int,
    version: str,
) -> list[tuple[str, list[str]]]:
    producer = producer_rules(prefix, minimal=minimal, fcall=fcall, db=db, redis_version=version)
    worker = worker_rules(prefix, db=db, redis_version=version)
    return [
        (PRODUCER_USER, ["reset", "on", producer_secret, *producer]),
        (WORKER_USER, ["reset", "on", worker_secret, *worker]),
    ]


def setuser_commands(
    producer_password: str,
    worker_password: str,
    prefix: str = DEFAULT_PREFIX,
    *,
    minimal: bool = False,
    fcall: bool = False,
    db: int = 0,
    redis_version: str = "7.0",
) -> list[list[str]]:
    """``ACL SETUSER`` commands (as argument lists) that create or redefine both users.

    ``reset`` first, so running them again leaves exactly these rules.
    """
    users = _users(
        password_rule(producer_password),
        password_rule(worker_password),
        prefix,
        minimal,
        fcall,
        db,
        redis_version,
    )
    return [["ACL", "SETUSER", name, *rules] for name, rules in users]


def acl_file_lines(
    producer_secret: str,
    worker_secret: str,
    prefix: str = DEFAULT_PREFIX,
    *,
    minimal: bool = False,
    fcall: bool = False,
    db: int = 0,
    redis_version: str = "7.0",
) -> list[str]:
    """``user ...`` lines for an ACL file (``aclfile``) or redis.conf.

    The secrets are rules as written: ``#<sha256 hex>`` (see :func:`password_rule`) or a
    ``>password`` placeholder.
    """
    users = _users(producer_secret, worker_secret, prefix, minimal, fcall, db, redis_version)
    return [" ".join(["user", name, *rules]) for name, rules in users]
