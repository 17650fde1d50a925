"""The kill switch: the file ``<run_dir>/kill-switch``.

While it exists execution rejects every request (``risk:kill_switch``) and cancels every
open order. It is a file so that anything on the machine can flip it without Kafka: an
operator's ``touch``, ``pipeline kill-switch on``, the web dashboard's button, the chaos run.
"""

from __future__ import annotations

from pathlib import Path

KILL_SWITCH_FILE = "kill-switch"
CONFIRM = {True: "Turn the kill switch ON? Execution rejects every new order and cancels "
                 "every open one until it is turned off.",
           False: "Turn the kill switch OFF? Execution accepts orders again."}


def kill_switch_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / KILL_SWITCH_FILE


def is_on(run_dir: Path | str) -> bool:
    return kill_switch_path(run_dir).exists()


def turn(run_dir: Path | str, on: bool) -> bool:
    """Set the switch; returns its state afterwards."""
    path = kill_switch_path(run_dir)
    if on:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    else:
        path.unlink(missing_ok=True)
    return path.exists()
