"""pushfw's Redis Function library: the seed's commands, and how a producer stores a list.

RedisPushIptables users call ``drop_insert 1.2.3.4`` and ``ttl_drop_insert 1.2.3.4 600``
inside Redis. The library in ``functions.lua`` (Redis >= 7, ``FUNCTION LOAD``) keeps those
names working: each function appends the equivalent command to the command stream and
returns its entry id. It builds stream fields and nothing else; the workers validate.
Which ops have a function is said once, in :data:`~.ops.OPS` (``fcall``): the library's
table of them is rendered from there when the library is loaded.

``list_store`` is the producer's only write on list content (:func:`store_list`): a string,
once, with no expiry, so a producer's ACL needs no ``SET`` there (see :mod:`.acl`).
"""

from __future__ import annotations

from importlib import resources

import redis

from pushfw.producer.connection import text
from pushfw.producer.keys import DEFAULT_PREFIX, Keys
from pushfw.producer.ops import OPS

__all__ = ["FUNCTIONS", "LIBRARY_NAME", "LIST_STORE", "install", "library_code", "store_list"]

LIBRARY_NAME = "pushfw"
_SEED_OPS = tuple(row for row in OPS.values() if row.fcall)
FUNCTIONS = tuple(row.function for row in _SEED_OPS)
"""The seed's commands, each a Redis Function (``drop_insert``, ``ttl_drop_insert``...)."""
LIST_STORE = "list_store"

_DEFAULT_STREAM_LINE = "local DEFAULT_STREAM = '{pushfw}:cmd'"
_COMMANDS_LINE = "local COMMANDS = {}\n"


def _lua_string(text: str) -> str:
    """``text`` as a Lua 5.1 string literal: printable ASCII as is, every other byte escaped."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append(f"\\{byte:03d}" if not 0x20 <= byte < 0x7F or char in "\\\"'" else char)
    return '"' + "".join(out) + '"'


def _commands_table() -> str:
    """The library's ``COMMANDS`` table, one row per op with a function (from code only)."""
    rows = (
        f"    {{name = {_lua_string(row.function)}, op = {_lua_string(row.op)}, "
        f"timed = {'true' if row.ttl == 'required' else 'false'}}},\n"
        for row in _SEED_OPS
    )
    return "local COMMANDS = {\n" + "".join(rows) + "}\n"


def library_code(prefix: str = DEFAULT_PREFIX) -> str:
    """The library's Lua source; with another prefix, numkeys 0 means that prefix's stream."""
    code = resources.files("pushfw.producer").joinpath("functions.lua").read_text("utf-8")
    for line in (_DEFAULT_STREAM_LINE, _COMMANDS_LINE):
        if line not in code:  # pragma: no cover - guards edits of functions.lua
            raise RuntimeError(f"functions.lua lost its line {line.strip()!r}")
    code = code.replace(_COMMANDS_LINE, _commands_table(), 1)
    if prefix == DEFAULT_PREFIX:
        return code
    line = f"local DEFAULT_STREAM = {_lua_string(Keys(prefix).cmd)}"
    return code.replace(_DEFAULT_STREAM_LINE, line, 1)


def install(client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> str:
    """``FUNCTION LOAD REPLACE`` the library (on every primary of a cluster); returns its name.

    Raises:
        redis.ResponseError: Redis refused it (older than 7, or an ACL without FUNCTION).
    """
    reply: object = client.function_load(library_code(prefix), replace=True)
    # a cluster client answers {node: name} from every primary
    names = set(reply.values()) if isinstance(reply, dict) else {reply}
    return ", ".join(sorted(text(n) for n in names))


def _missing(exc: redis.ResponseError) -> bool:
    # redis-py has no exception class for it (as it has NoScriptError for EVALSHA)
    return str(exc).startswith("Function not found")


def store_list(client: redis.Redis, key: str, content: bytes, prefix: str = DEFAULT_PREFIX) -> bool:
    """``FCALL list_store``: write a list's content once; True if it was new.

    A Redis without the library (or with one from before ``list_store``) gets it loaded
    first when this user may (``FUNCTION LOAD``), as redis-py loads a script on NOSCRIPT.

    Raises:
        redis.ResponseError: the key holds something else, or the library is missing and
            this user may not load it (an administrator runs ``pushfw redis-functions
            install``).
    """
    try:
        return bool(client.fcall(LIST_STORE, 1, key, content))
    except redis.ResponseError as exc:
        if not _missing(exc):
            raise
        try:
            install(client, prefix)
        except redis.ResponseError as refused:
            raise redis.ResponseError(
                f"the pushfw Redis Functions are not loaded ({exc}) and this user may not load "
                "them: run `pushfw redis-functions install` as an administrator"
            ) from refused
    return bool(client.fcall(LIST_STORE, 1, key, content))
