"""What the two conversion tools share: the exit-status contract.

A :class:`~luspo_megatron.errors.UserError` (bad input) prints one line to stderr and exits 2
(docs/design.md §5); anything else is a bug and keeps its traceback. Under torchrun every rank reports
its own error, prefixed with its rank.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from luspo_megatron.errors import UserError


def run(body: Callable[[], None]) -> int:
    try:
        body()
        return 0
    except UserError as err:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 2
