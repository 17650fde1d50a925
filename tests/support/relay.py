"""A minimal consumer group the runtime tests run as a real process.

It reads JSON records, copies each to an output topic tagged with the instance name and
the source position, raises on the value "POISON" and can sleep per record, so a test
can kill it mid-batch; a record with "hang" never returns (the stall watchdog's test).
Run: ``python -m tests.support.relay --bootstrap ... --in T --out T``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

from pipeline.runtime.runner import GroupConfig, GroupRunner, Handler, Output, Record


def json_value(value: bytes) -> dict:
    return json.loads(value)


class Relay(Handler):
    def __init__(self, out_topic: str, instance: str, delay_s: float) -> None:
        self.out_topic, self.instance, self.delay_s = out_topic, instance, delay_s

    def handle(self, record: Record):
        if record.value.get("poison"):
            raise ValueError(f"poison record {record.value}")
        if record.value.get("hang"):  # a step that never returns (the watchdog's test)
            threading.Event().wait()
        if self.delay_s:
            time.sleep(self.delay_s)
        tagged = {**record.value, "instance": self.instance, "src_partition": record.partition,
                  "src_offset": record.offset}
        yield Output(self.out_topic, json.dumps(tagged).encode(), record.key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--in", dest="in_topic", required=True)
    ap.add_argument("--out", dest="out_topic", required=True)
    ap.add_argument("--dlq", required=True)
    ap.add_argument("--instance", default="a")
    ap.add_argument("--delay-ms", type=float, default=0)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--transactional-id")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = GroupConfig(
        group_id=args.group, topics=[args.in_topic], dead_letter_topic=args.dlq,
        handler=lambda: Relay(args.out_topic, args.instance, args.delay_ms / 1000),
        decoder=json_value, batch_size=args.batch_size, transactional_id=args.transactional_id)
    runner = GroupRunner(config, args.bootstrap)
    runner.install_signal_handlers()
    stats = runner.run()
    print(json.dumps(stats.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
