"""pushfw producer side: the wire contract, the Python client and the ``pushfw`` CLI."""

from pushfw.producer.client import DeadLetter, Producer
from pushfw.producer.contract import (
    Action,
    Command,
    CommandRejected,
    Op,
    Result,
    Status,
    parse_command,
    parse_network,
)
from pushfw.producer.keys import Keys

__all__ = [
    "Action",
    "Command",
    "CommandRejected",
    "DeadLetter",
    "Keys",
    "Op",
    "Producer",
    "Result",
    "Status",
    "parse_command",
    "parse_network",
]
