"""The bars group as a process that gets kill -9 at a chosen point of its protocol.

``python -m tests.support.bars_crash POINT N <consumers.bars arguments>`` runs the group
and sends itself SIGKILL the N-th time it reaches POINT:

* ``checkpoint``: a checkpoint is written and the transaction not yet committed;
* ``committed``: a transaction with bars committed, its bars not yet in Parquet;
* ``parquet``: one Parquet file of a flush replaced, the rest not.
"""

from __future__ import annotations

import os
import signal
import sys

from consumers import bars
from pipeline.sinks import bars as bars_store

POINTS = ("checkpoint", "committed", "parquet")


def arm(point: str, n: int) -> None:
    reached = 0

    def hit() -> None:
        nonlocal reached
        reached += 1
        if reached >= n:
            sys.stderr.write(f"bars_crash: dying at {point} #{reached}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "checkpoint":
        original = bars.BarsHandler._checkpoint

        def checkpoint(self, *args):
            original(self, *args)
            hit()
        bars.BarsHandler._checkpoint = checkpoint  # type: ignore[method-assign]
    elif point == "committed":
        after_commit = bars.BarsHandler.after_commit

        def committed(self, offsets):
            if any(p.unconfirmed for p in self._parts.values()):
                hit()
            after_commit(self, offsets)
        bars.BarsHandler.after_commit = committed  # type: ignore[method-assign]
    elif point == "parquet":
        replace = bars_store._replace

        def replaced(path, *args):
            replace(path, *args)
            if path.suffix == ".parquet":
                hit()
        bars_store._replace = replaced
    else:
        raise SystemExit(f"unknown crash point {point!r}: use {', '.join(POINTS)}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(bars.main(sys.argv[3:]))
