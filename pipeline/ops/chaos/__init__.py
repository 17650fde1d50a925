"""The chaos run (`pipeline chaos`, `make chaos`): the demo topology under a seeded schedule
of crashes and venue faults, then invariants checked over everything that was written.

:mod:`~pipeline.ops.chaos.schedule` draws the faults (pure, same seed same schedule),
:mod:`~pipeline.ops.chaos.invariants` checks records (pure, no Kafka),
:mod:`~pipeline.ops.chaos.run` runs the topology, injects the faults and collects the records.
"""
