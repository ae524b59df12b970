"""Count a list's elements in the kernel: ``ip netns exec NS python -m bench.nftcount TABLE NAME``.

Prints one JSON object (set name -> elements) for the sets of list NAME in ``inet TABLE``,
read over netlink (``nft -j list``, even ``-t``, takes minutes at a million elements).
"""

from __future__ import annotations

import json
import re
import sys

from pushfw.worker.backends.nftables import set_element_count, set_names


def main(argv: list[str]) -> int:
    table, name = argv
    ours = re.compile(rf"list_[a-z]+_{re.escape(name)}[46]_\d+")
    names = sorted(n for n in set_names(table) if ours.fullmatch(n))
    json.dump({n: set_element_count(table, n) for n in names}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
