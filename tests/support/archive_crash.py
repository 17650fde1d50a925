"""The archive group as a process that gets kill -9 at a chosen point of its protocol.

``python -m tests.support.archive_crash POINT N <consumers.archive arguments>`` runs the
group and sends itself SIGKILL the N-th time a flush reaches POINT (one of
:data:`pipeline.sinks.archive.CRASH_POINTS`: files staged; journal written; one file
renamed into place; entry marked done, offsets not yet committed).
"""

from __future__ import annotations

import os
import signal
import sys

from consumers import archive
from pipeline.sinks import archive as store


def arm(point: str, n: int) -> None:
    if point not in store.CRASH_POINTS:
        raise SystemExit(f"unknown crash point {point!r}: use {', '.join(store.CRASH_POINTS)}")
    reached = 0

    def hit(at: str) -> None:
        nonlocal reached
        if at == point:
            reached += 1
            if reached >= n:
                os.write(2, f"archive_crash: dying at {point} #{reached}\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)

    store.crash_hook = hit


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(archive.main(sys.argv[3:]))
