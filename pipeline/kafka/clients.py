"""Kafka client factories: the one place that decides producer, consumer and admin settings.

Every client the pipeline makes starts from :func:`client_config`, which merges in the
security settings of :mod:`pipeline.kafka.security` (SASL_SSL/SCRAM, the CA), so one
environment or ``client.properties`` file secures them all. Producers are idempotent with
``acks=all`` and track every delivery report, so a failed delivery is never silent.
Consumers never auto-commit: the runtime commits what it has fully handled.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from pipeline.core.errors import DeliveryFailed, PipelineError
from pipeline.kafka.security import AUTH_FAILURE_CODES, load_security, refused_message

log = logging.getLogger(__name__)
_client_log = logging.getLogger("librdkafka")


class _RefusalFilter(logging.Filter):
    """librdkafka logs a refused password at every reconnect; the pipeline says it once,
    naming the principal (:func:`raise_if_refused`). While :func:`check_reachable` serves
    a client's events only to learn of a refusal, the log lines queued with them (one per
    failed connect) are dropped too: its error says what happened."""

    quiet = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.quiet, "on", False) and \
            "SASL authentication error" not in record.getMessage()


_client_log.addFilter(_RefusalFilter())


# The newest authentication failure librdkafka reported, per cluster and SASL user: a
# refused password surfaces as an error event, while the request itself only times out.
_refused: dict[tuple[str, str | None], str] = {}


class _ClientErrors:
    """A client's ``error_cb``: remembers refused credentials for :func:`raise_if_refused`;
    logs any other error, as librdkafka does for a client without an ``error_cb``."""

    def __init__(self, bootstrap: str, username: str | None) -> None:
        self.key = (bootstrap, username)

    def __call__(self, err: KafkaError) -> None:
        if err.name() in AUTH_FAILURE_CODES:
            _refused[self.key] = err.str()
        else:
            _client_log.error("%s", err.str())


def client_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """The settings every client starts from: where the cluster is and how to
    authenticate to it (:func:`pipeline.kafka.security.load_security`); ``overrides``
    (a caller's own settings) win."""
    security = load_security(bootstrap=bootstrap)
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _client_log,
                              "error_cb": _ClientErrors(bootstrap, security.username)}
    config.update(security.client_settings())
    config.update(overrides)
    return config


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    return client_config(bootstrap, **{
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,  # headroom for market-data bursts
        **overrides})


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    return client_config(bootstrap, **{
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
        # librdkafka waits fetch.queue.backoff.ms (default 1 s) before fetching again once
        # its local queue has held queued.min.messages (100,000): a group catching up on a
        # backlog, or a replay, idled a second per refill (200k records: 1.1 s -> 0.16 s).
        "fetch.queue.backoff.ms": 10,
        **overrides})


def make_admin(bootstrap: str, **overrides: Any) -> AdminClient:
    return AdminClient(client_config(bootstrap, **overrides))


def reader_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A plain consumer's settings (tools, restore readers): no commits, librdkafka's
    defaults otherwise, unlike a group's :func:`consumer_config`."""
    return client_config(bootstrap, **{"group.id": group_id, "enable.auto.commit": False,
                                       **overrides})


def check_reachable(admin: AdminClient, bootstrap: str, timeout: float = 10.0):
    """Cluster metadata, or one clear error when nothing answers at ``bootstrap`` or it
    refuses this process's credentials (asked in short steps, so a refusal ends the
    wait at once instead of after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin.list_topics(timeout=max(min(1.0, deadline - time.monotonic()), 0.1))
        except KafkaException as exc:
            _RefusalFilter.quiet.on = True
            try:
                admin.poll(0)  # serves the error events: a refused password is one of them
            finally:
                _RefusalFilter.quiet.on = False
            raise_if_refused(bootstrap)
            if time.monotonic() >= deadline:
                raise PipelineError(
                    f"Kafka at {bootstrap} does not answer ({exc.args[0].str()}): start the "
                    "broker with `make broker` or fix KAFKA_BOOTSTRAP_SERVERS") from None


def raise_if_refused(bootstrap: str) -> None:
    """One line naming the principal if the broker refused this process's credentials."""
    security = load_security(bootstrap=bootstrap)
    detail = _refused.get((bootstrap, security.username))
    if detail is not None:
        raise PipelineError(refused_message(bootstrap, security, detail))


class DeliveryTracker:
    """Counts delivery reports; ``raise_if_failed`` turns any failure into an exception."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed = 0  # since the last raise_if_failed
        self.failed_total = 0
        self.last_error: str | None = None

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        self.failed += 1
        self.failed_total += 1
        self.last_error = f"{msg.topic()}[{msg.partition()}]: {err.str()}"
        log.error("delivery failed: %s", self.last_error)

    def raise_if_failed(self) -> None:
        if self.failed:
            failed, error = self.failed, self.last_error
            self.failed, self.last_error = 0, None
            raise DeliveryFailed(f"{failed} record(s) were not delivered; last error: {error}")


class ReliableProducer:
    """An idempotent producer whose ``flush`` fails loudly if anything was not delivered."""

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        self.tracker = DeliveryTracker()
        self._producer = Producer(producer_config(bootstrap, **overrides))

    @property
    def raw(self) -> Producer:
        return self._producer

    def produce(self, topic: str, value: bytes | None, key: bytes | str | None = None,
                headers: list[tuple[str, bytes]] | None = None, timestamp: int = 0,
                partition: int | None = None) -> None:
        """``partition`` None: the client's partitioner picks it from the key."""
        extra = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers,
                                       timestamp=timestamp, on_delivery=self.tracker, **extra)
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self._producer.poll(0.05)

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 60.0) -> None:
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryFailed(f"{remaining} record(s) still undelivered after {timeout:.0f}s")
        self.tracker.raise_if_failed()
