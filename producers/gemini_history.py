"""Backfill Gemini's public history into Kafka: trades onto ``<namespace>.md.trades``,
candles onto ``<namespace>.bars``. Never into ``live``: that namespace holds what the
WebSocket producer saw, and a backfill is history fetched later.

Trades land where the WebSocket producer puts them: keyed by symbol through the same
idempotent producer (so the same partitioner picks the same partition), Avro through the
project's registry, the Kafka timestamp the time the page was read (as a live trade's is
the time its frame was read). The topic is the resume point: a run reads the symbol's
trades there first, starts after the highest trade id and leaves out any id already there,
and flushes each page before asking for the next, so a run killed at any moment leaves
a prefix of the history behind and the next run loads the rest exactly once.

Candles are published as bars by ``producers/csv_bars.publish_bars`` (the one way bars are
loaded): closed candles only, and none that is there already.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from pipeline.avro.registry import SchemaRegistry
from pipeline.avro.serde import Serde
from pipeline.core.errors import GeminiApiError, GeminiError, PipelineError
from pipeline.gemini.history import (
    CONNECTION_PREFIX,
    MAX_TRADES,
    Since,
    candle_bars,
    read_page,
    start_cursor,
    time_frame,
    trade_record,
)
from pipeline.gemini.marketdata import FrameError
from pipeline.gemini.public_rest import PublicClient
from pipeline.kafka.catalog import Namespace, ensure_topics
from pipeline.kafka.clients import ReliableProducer
from pipeline.runtime.runner import read_to_end
from producers.csv_bars import publish_bars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TradesReport:
    """What a trades backfill did."""

    topic: str
    symbol: str
    since: Since
    loaded: int  # records the broker acknowledged
    already: int  # trades of the pages that were in the topic already
    pages: int
    requests: int
    rate_limited: int  # 429s waited out
    resumed_from: int | None  # the highest trade id in the topic before the run
    first_tid: int | None
    last_tid: int | None
    complete: bool  # the history's end was reached (False: stopped by max_pages)


@dataclass(frozen=True)
class CandlesReport:
    """What a candles backfill did."""

    topic: str
    symbol: str
    interval: str
    time_frame: str
    candles: int  # closed candles Gemini sent
    published: int
    already: int


def refuse_live(namespace: Namespace) -> None:
    if namespace.is_live:
        raise PipelineError(f"a backfill is history fetched later, not live data: load it "
                            f"into a sim or replay namespace, not {namespace}")


def loaded_trades(bootstrap: str, registry_url: str, topic: str,
                  symbol: str) -> tuple[set[int], tuple[int, int] | None]:
    """The trade ids of ``symbol`` in ``topic`` and (tid, exchange time) of the highest."""
    decode = Serde(SchemaRegistry(registry_url)).decoder()
    key = symbol.encode()
    tids: set[int] = set()
    newest: tuple[int, int] | None = None
    for msg in read_to_end(bootstrap, topic):
        if msg.key() != key or msg.value() is None:
            continue
        trade = decode(msg.value())
        tids.add(trade["trade_id"])
        if newest is None or trade["trade_id"] > newest[0]:
            newest = (trade["trade_id"], trade["exchange_ts_ms"])
    return tids, newest


def _refusal(exc: GeminiApiError, symbol: str, url: str) -> PipelineError:
    if exc.reason == "InvalidSymbol":
        return PipelineError(f"unknown symbol {symbol}: {url} answered InvalidSymbol; "
                             "nothing was written")
    return PipelineError(f"{url} refused the backfill of {symbol}: {exc.reason} "
                         f"({exc.http_status}): {exc.message}")


def backfill_trades(base_url: str, bootstrap: str, registry_url: str, namespace: Namespace,
                    symbol: str, since: Since = Since(), until_ms: int | None = None,
                    limit: int = MAX_TRADES, max_pages: int | None = None,
                    client: PublicClient | None = None) -> TradesReport:
    """Load the trades of ``symbol`` after ``since`` (and before ``until_ms``) that are not
    in ``<namespace>.md.trades`` yet, oldest first. ``max_pages`` stops early (the next
    run goes on from there)."""
    refuse_live(namespace)
    symbol = symbol.strip().upper()
    ensure_topics(bootstrap, namespace, ["md.trades"])
    topic = namespace.topic("md.trades")
    tids, newest = loaded_trades(bootstrap, registry_url, topic, symbol)
    cursor = start_cursor(since, newest, limit)
    client = client or PublicClient(base_url)
    encode = Serde(SchemaRegistry(registry_url)).encoder(topic)
    producer = ReliableProducer(bootstrap)
    connection_id = f"{CONNECTION_PREFIX}{uuid.uuid4().hex[:12]}"
    pages = already = 0
    first = last = None
    requests_before, limited_before = client.requests, client.rate_limited
    complete = False
    while max_pages is None or pages < max_pages:
        try:
            entries = client.trades(symbol, cursor.params())
            received_us = time.time_ns() // 1000
            page = read_page(entries, cursor, until_ms)
            records = [trade_record(t, symbol, received_us, connection_id, pages)
                       for t in page.trades]
        except GeminiApiError as exc:
            raise _refusal(exc, symbol, client.base_url) from None
        except (GeminiError, FrameError) as exc:
            raise PipelineError(f"backfill of {symbol} from {client.base_url}: {exc}") from None
        for record in records:
            if record["trade_id"] in tids:
                already += 1
                continue
            producer.produce(topic, encode(record), key=symbol, timestamp=received_us // 1000)
            tids.add(record["trade_id"])
            first = record["trade_id"] if first is None else first
            last = record["trade_id"]
        producer.flush()  # this page is in the topic before the next is asked for
        pages += 1
        cursor = page.cursor
        log.info("%s: page %d, %d trade(s), up to tid %s", symbol, pages, len(records),
                 cursor.since_tid)
        if page.done:
            complete = True
            break
    return TradesReport(topic, symbol, since, producer.tracker.delivered, already, pages,
                        client.requests - requests_before,
                        client.rate_limited - limited_before,
                        newest[0] if newest else None, first, last, complete)


def backfill_candles(base_url: str, bootstrap: str, registry_url: str, namespace: Namespace,
                     symbol: str, interval: str, client: PublicClient | None = None,
                     now_ms: int | None = None) -> CandlesReport:
    """Publish Gemini's closed candles of ``symbol`` as ``interval`` bars onto
    ``<namespace>.bars``, leaving out those already there."""
    refuse_live(namespace)
    symbol = symbol.strip().upper()
    name, frame = time_frame(interval)
    client = client or PublicClient(base_url)
    try:
        rows = client.candles(symbol, frame)
        bars = candle_bars(rows, symbol, name,
                           now_ms if now_ms is not None else int(time.time() * 1000))
    except GeminiApiError as exc:
        raise _refusal(exc, symbol, client.base_url) from None
    except (GeminiError, FrameError) as exc:
        raise PipelineError(f"candles of {symbol} from {client.base_url}: {exc}") from None
    topic = namespace.topic("bars")
    if not bars:
        return CandlesReport(topic, symbol, name, frame, 0, 0, 0)
    topic, published, already = publish_bars(bars, bootstrap, registry_url, namespace, symbol,
                                              name, f"Gemini {symbol} {frame} candles")
    return CandlesReport(topic, symbol, name, frame, len(bars), published, already)
