"""Count a list's elements in the kernel: ``ip netns exec NS python -m bench.nftcount TABLE NAME``.

Prints one JSON object (set name -> elements) for the shared sets of list NAME's action in
``inet TABLE`` (its marker set ``mark_<action>_<name>`` says which; with one list of that
action, its own entries), read over netlink (``nft -j list``, even ``-t``, takes minutes at
a million elements).
"""

from __future__ import annotations

import json
import re
import sys

from pushfw.worker.backends.netlink import set_element_count, set_names


def main(argv: list[str]) -> int:
    table, name = argv
    present = set_names(table)
    actions = [a for a in ("drop", "accept") if f"mark_{a}_{name}" in present]
    ours = re.compile(rf"lists_({'|'.join(actions) or '-'})[46]_\d+b?")
    names = sorted(n for n in present if ours.fullmatch(n))
    json.dump({n: set_element_count(table, n) for n in names}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
