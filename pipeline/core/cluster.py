"""Where Kafka and the schema registry are: one value passed instead of two strings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cluster:
    """A Kafka cluster and its schema registry, as clients reach them.

    ``bootstrap`` is Kafka's ``bootstrap.servers`` (``host:port[,host:port]``);
    ``registry_url`` the Confluent-compatible registry's base URL. Security settings are not
    here: every client merges them in from :mod:`pipeline.kafka.security`.
    """

    bootstrap: str
    registry_url: str

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("Cluster needs a bootstrap address (host:port)")
        if not self.registry_url:
            raise ValueError("Cluster needs the schema registry's URL")
