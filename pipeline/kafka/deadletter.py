"""Dead-letter records, in the layout Kafka Connect's dead-letter queues use.

The value and key are the failed record's original bytes; where it came from and why it
failed travel in headers named as Connect names them (``__connect.errors.*``), so Connect
tooling and anyone who knows it can inspect and re-drive them.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass

H_TOPIC = "__connect.errors.topic"
H_PARTITION = "__connect.errors.partition"
H_OFFSET = "__connect.errors.offset"
H_CONNECTOR = "__connect.errors.connector.name"
H_STAGE = "__connect.errors.stage"
H_EXCEPTION = "__connect.errors.exception.class.name"
H_MESSAGE = "__connect.errors.exception.message"
H_STACKTRACE = "__connect.errors.exception.stacktrace"
H_TIMESTAMP = "__pipeline.errors.timestamp.ms"  # Connect has none; when it failed

STAGE_DECODE = "VALUE_CONVERTER"  # Connect's name for "could not deserialize"
STAGE_HANDLE = "TASK_PUT"  # Connect's name for "the task's own logic failed"
STAGE_INGEST = "SOURCE_INGEST"  # a producer got input it could not normalize


@dataclass(frozen=True)
class DeadLetter:
    """A parsed dead-letter record: where the original came from and why it failed."""

    source_topic: str
    source_partition: int
    source_offset: int
    owner: str
    stage: str
    error_class: str
    error_message: str
    failed_at_ms: int
    key: bytes | None
    value: bytes | None


def dead_letter_headers(*, source_topic: str, source_partition: int, source_offset: int,
                        owner: str, stage: str, error: BaseException,
                        original_headers: list[tuple[str, bytes]] | None = None,
                        ) -> list[tuple[str, bytes]]:
    """The original headers followed by the ``__connect.errors.*`` headers for ``error``."""
    stack = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return [
        *(original_headers or []),
        (H_TOPIC, source_topic.encode()),
        (H_PARTITION, str(source_partition).encode()),
        (H_OFFSET, str(source_offset).encode()),
        (H_CONNECTOR, owner.encode()),
        (H_STAGE, stage.encode()),
        (H_EXCEPTION, f"{type(error).__module__}.{type(error).__qualname__}".encode()),
        (H_MESSAGE, str(error)[:4000].encode()),
        (H_STACKTRACE, stack[-16000:].encode()),
        (H_TIMESTAMP, str(int(time.time() * 1000)).encode()),
    ]


def parse_dead_letter(key: bytes | None, value: bytes | None,
                      headers: list[tuple[str, bytes]] | None) -> DeadLetter:
    """Read back a dead letter written with :func:`dead_letter_headers`."""
    found = {name: raw.decode() for name, raw in (headers or []) if raw is not None}
    return DeadLetter(
        source_topic=found[H_TOPIC],
        source_partition=int(found[H_PARTITION]),
        source_offset=int(found[H_OFFSET]),
        owner=found.get(H_CONNECTOR, ""),
        stage=found.get(H_STAGE, ""),
        error_class=found.get(H_EXCEPTION, ""),
        error_message=found.get(H_MESSAGE, ""),
        failed_at_ms=int(found.get(H_TIMESTAMP, "0")),
        key=key,
        value=value,
    )
