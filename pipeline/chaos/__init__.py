"""The chaos run (`pipeline chaos`, `make chaos`): the demo topology under a seeded schedule
of crashes and venue faults, then invariants checked over everything that was written.

:mod:`~pipeline.chaos.schedule` draws the faults (pure, same seed same schedule),
:mod:`~pipeline.chaos.invariants` checks records (pure, no Kafka),
:mod:`~pipeline.chaos.run` runs the topology, injects the faults and collects the records.
"""
