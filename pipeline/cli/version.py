"""`pipeline version`."""

from __future__ import annotations

from pipeline.cli.common import console


def version() -> None:
    """Versions of the pipeline, the Kafka jars it runs and the client library."""
    import confluent_kafka

    from pipeline import __version__
    from pipeline.ops.broker import kafka_version

    console.print(f"pipeline {__version__}; Apache Kafka {kafka_version()} (local broker); "
                  f"confluent-kafka {confluent_kafka.__version__}, "
                  f"librdkafka {confluent_kafka.libversion()[0]}")
