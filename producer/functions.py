"""The seed's commands as a Redis Function library: ``FCALL drop_insert 0 192.168.1.6``.

RedisPushIptables users call ``drop_insert 1.2.3.4`` and ``ttl_drop_insert 1.2.3.4 600``
inside Redis. The library in ``functions.lua`` (Redis >= 7, ``FUNCTION LOAD``) keeps those
names working: each function appends the equivalent command to the command stream and
returns its entry id. It builds stream fields and nothing else; the workers validate.
"""

from __future__ import annotations

from importlib import resources

import redis

from pushfw.producer.keys import DEFAULT_PREFIX, Keys

__all__ = ["FUNCTIONS", "LIBRARY_NAME", "install", "library_code"]

LIBRARY_NAME = "pushfw"
FUNCTIONS = (
    "drop_insert",
    "drop_delete",
    "accept_insert",
    "accept_delete",
    "ttl_drop_insert",
    "ttl_accept_insert",
)

_DEFAULT_STREAM_LINE = "local DEFAULT_STREAM = '{pushfw}:cmd'"


def _lua_string(text: str) -> str:
    """``text`` as a Lua 5.1 string literal: printable ASCII as is, every other byte escaped."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append(f"\\{byte:03d}" if not 0x20 <= byte < 0x7F or char in "\\\"'" else char)
    return '"' + "".join(out) + '"'


def library_code(prefix: str = DEFAULT_PREFIX) -> str:
    """The library's Lua source; with another prefix, numkeys 0 means that prefix's stream."""
    code = resources.files("pushfw.producer").joinpath("functions.lua").read_text("utf-8")
    if _DEFAULT_STREAM_LINE not in code:  # pragma: no cover - guards edits of functions.lua
        raise RuntimeError("functions.lua lost its DEFAULT_STREAM line")
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
    return ", ".join(sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names))
