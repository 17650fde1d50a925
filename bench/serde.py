"""Encode and decode of the book-change record (L2Update): our serde vs bare fastavro.

Both sides encode the same records with the same parsed schema; ours adds the Confluent
header and decodes it (magic byte, schema id lookup, trailing-bytes check). Target: at
most 15% slower than bare fastavro.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

from fastavro import schemaless_reader, schemaless_writer

from bench.figures import Figure, best_rate
from pipeline.avro import schemas
from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Decoder, Encoder
from pipeline.kafka.catalog import Namespace

CAPTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "gemini_v2_l2_capture_2021-06-24.txt"


def book_changes(events: int) -> list[dict]:
    """``events`` L2Update records: the real capture's frames repeated, else synthetic ones."""
    if CAPTURE.exists():
        from pipeline.gemini.capture import received_frames
        from pipeline.gemini.marketdata import V2Normalizer

        normalizer = V2Normalizer("bench")
        base = [out.value for frame in received_frames(CAPTURE)
                for out in normalizer.normalize_text(frame.text, frame.received_us)
                if out.topic == "md.l2" and not out.value["snapshot"]]
    else:
        rng = random.Random(7)
        base = [{"symbol": "BTCUSD", "snapshot": False,
                 "changes": [{"side": rng.choice(["BID", "ASK"]),
                              "price": f"{34000 + rng.randrange(2000) / 100:.2f}",
                              "quantity": f"{rng.randrange(10**6) / 10**6:.6f}"}
                             for _ in range(rng.randint(1, 12))],
                 "exchange_ts_ms": None, "received_ts_us": 1624493666638480 + i,
                 "connection_id": "bench", "sequence": i, "event_id": None}
                for i in range(1000)]
    return list(itertools.islice(itertools.cycle(base), events))


def run(registry_url: str, events: int) -> list[Figure]:
    records = book_changes(events)
    encode = Encoder(SchemaRegistry(registry_url), Namespace("sim-bench").topic("md.l2"))
    decode = Decoder(SchemaRegistry(registry_url), [schemas.load("L2Update")])
    parsed = schemas.parsed("L2Update")

    def bare_encode() -> list[bytes]:
        out = []
        for record in records:
            buf = io.BytesIO()
            schemaless_writer(buf, parsed, record)
            out.append(buf.getvalue())
        return out

    bare_bytes = bare_encode()
    our_bytes = [encode(r) for r in records]
    assert all(o[5:] == b for o, b in zip(our_bytes, bare_bytes))  # the same Avro body

    def ours_encode() -> None:
        for record in records:
            encode(record)

    def bare_decode() -> None:
        for data in bare_bytes:
            schemaless_reader(io.BytesIO(data), parsed, None)

    def ours_decode() -> None:
        for data in our_bytes:
            decode(data)

    rates = {name: best_rate(fn, events) for name, fn in
             [("bare_encode", bare_encode), ("ours_encode", ours_encode),
              ("bare_decode", bare_decode), ("ours_decode", ours_decode)]}
    changes = sum(len(r["changes"]) for r in records)
    note = f"{changes / events:.1f} changes/record"
    return [
        Figure("serde encode L2Update", rates["ours_encode"], "records/s", events,
               "bare fastavro schemaless_writer", rates["bare_encode"], f"ratio >= 0.85 ({note})"),
        Figure("serde decode L2Update", rates["ours_decode"], "records/s", events,
               "bare fastavro schemaless_reader", rates["bare_decode"], f"ratio >= 0.85 ({note})"),
    ]


if __name__ == "__main__":
    import sys

    print(json.dumps([f.__dict__ for f in run(sys.argv[1], int(sys.argv[2]))], indent=2))
