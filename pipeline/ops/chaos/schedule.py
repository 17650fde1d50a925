"""A seeded fault schedule: which fault, on what, at which second of the run.

Same seed, same schedule. Faults are spread out so the pipeline recovers between them
(that is what is being tested: recovery, not a pile-up), broker faults one at a time and
never while the last restarted broker is still catching up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# kind -> what it does (the table of the chaos report lists them in this order)
FAULT_KINDS: dict[str, str] = {
    "kill_group": "kill -9 of one consumer group's process (the supervisor restarts it)",
    "kill_producer": "kill -9 of the market-data producer",
    "kill_broker": "kill -9 of one broker, restarted after a pause",
    "kill_controller": "kill -9 of the KRaft controller leader, restarted after a pause",
    "kill_leader": "kill -9 of the leader of orders.requests, restarted after a pause",
    "restart_registry": "the schema registry stopped and started again",
    "venue_drop": "the venue cuts the producer's connection (no close frame)",
    "venue_stall": "the venue stops sending for a few seconds",
    "venue_malformed": "the venue sends a malformed frame",
    "venue_gap": "the venue loses one depth update (the next one's update id jumps)",
}
BROKER_FAULTS = ("kill_broker", "kill_controller", "kill_leader")


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the topology is up
    kind: str
    target: str = ""  # the group's process name, or the broker node ("" : chosen when due)
    down_s: float = 0.0  # broker faults: how long the node stays down

    def describe(self) -> str:
        what = f"{self.kind}({self.target})" if self.target else self.kind
        return f"{self.at_s:6.1f}s {what}" + (f" down {self.down_s:.0f}s" if self.down_s else "")


def make_schedule(seed: int, minutes: float, groups: list[str], nodes: int = 1,
                  warmup_s: float = 30.0, settle_s: float = 30.0, gap_s: float = 10.0,
                  broker_gap_s: float = 60.0) -> list[Fault]:
    """Faults for a run of ``minutes``: none in the first ``warmup_s`` or the last
    ``settle_s``, at least ``gap_s`` apart (jittered), each kind early on and then at
    random; broker faults only on a cluster (``nodes`` >= 3), ``broker_gap_s`` apart."""
    rng = random.Random(seed)
    kinds = [k for k in FAULT_KINDS if nodes >= 3 or k not in BROKER_FAULTS]
    end = minutes * 60.0 - settle_s
    # First every kind once (and every group killed once), in a random order; then at random.
    first_round = [(k, g) for k in kinds for g in (groups if k == "kill_group" else [""])]
    rng.shuffle(first_round)
    faults: list[Fault] = []
    at, last_broker = warmup_s, -broker_gap_s

    def allowed(kind: str) -> bool:
        return kind not in BROKER_FAULTS or at - last_broker >= broker_gap_s

    while at < end:
        ready = [pick for pick in first_round if allowed(pick[0])]
        if ready:
            kind, target = ready[0]
            first_round.remove(ready[0])
        else:
            kind = rng.choice([k for k in kinds if allowed(k)])
            target = rng.choice(groups) if kind == "kill_group" else ""
        if kind == "kill_broker":
            target = str(rng.randint(1, nodes))
        down = 0.0
        if kind in BROKER_FAULTS:
            down = rng.uniform(5.0, 20.0)
            last_broker = at + down
        faults.append(Fault(round(at, 1), kind, target, round(down, 1)))
        at += gap_s * rng.uniform(1.0, 2.0) + down
    return faults
