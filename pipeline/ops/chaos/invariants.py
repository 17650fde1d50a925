"""The chaos run's invariants, checked over records (pure: no Kafka, no venue).

Each check returns a :class:`Check`: how many records it looked at, whether it held, and
the first counterexample when it did not. Records are the decoded Avro dicts of the
topics, in each partition's offset order; the venue's side is its own witness of what it
sent, what it was asked to place and what it still holds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Iterable, Mapping, Sequence

from pipeline.core.vocabulary import TERMINAL_KINDS
from pipeline.market.bars import INTERVALS_MS, Bar, BarBuilder, BarSettings, Emitted
from pipeline.trading.accounting import fold

Record = Mapping[str, Any]


@dataclass
class Check:
    name: str
    records: int = 0
    held: bool = True
    counterexample: str = ""
    notes: list[str] = field(default_factory=list)

    def fail(self, counterexample: str) -> None:
        """Record a violation; the first one is the one shown."""
        if self.held:
            self.held, self.counterexample = False, counterexample


# --------------------------------------------------------------------------- frames


# A producer killed with ``kill -9`` loses the frames it had read but not yet written;
# they are its last ones, but as they go to different partitions (keyed by symbol), a
# later frame of another partition may have been written before an earlier one. Frames
# older than this before the producer's last written one must all be there.
KILLED_IN_FLIGHT_US = 5_000_000


@dataclass(frozen=True)
class SentConnection:
    """One market-data connection as the venue saw it: every frame it sent, in order, and
    how many of them had gone out when the sources were stopped (None: it ended before);
    ``killed``: the producer was killed (kill -9) while it was open."""

    frames: tuple[str, ...]
    sent_at_stop: int | None
    killed: bool = False


def check_frames(sent: Sequence[SentConnection], raw: Iterable[Record]) -> Check:
    """Every frame the venue sent is in ``raw.frames`` once per connection epoch, in order.

    A connection's frames are numbered 0, 1, ... by the producer; each of its connections
    must be one of the venue's, with the same texts in the same order, none twice and none
    skipped. Frames still in flight when a connection was cut (a drop, a killed producer)
    never reached the producer, so an earlier connection may end short of what the venue
    sent (counted, not a violation); the connection open when the sources stopped must
    hold everything sent until then. A producer killed while the connection was open may
    also miss frames it had read in its last moments (see ``KILLED_IN_FLIGHT_US``), and
    nothing before them.
    """
    check = Check("raw.frames = frames the venue sent, once per connection")
    by_conn: dict[str, list[Record]] = defaultdict(list)
    for rec in raw:
        by_conn[rec["connection_id"]].append(rec)
        check.records += 1
    unmatched = list(range(len(sent)))
    lost_tail = killed_lost = 0
    for conn_id, frames in sorted(by_conn.items(), key=lambda kv: min(r["received_ts_us"]
                                                                       for r in kv[1])):
        frames.sort(key=lambda r: r["sequence"])
        seqs = [r["sequence"] for r in frames]
        dup = [s for s, n in Counter(seqs).items() if n > 1]
        if dup:
            check.fail(f"connection {conn_id}: frame {dup[0]} written {seqs.count(dup[0])} times")
            continue
        match = next((i for i in unmatched if len(sent[i].frames) > seqs[-1] and
                      all(sent[i].frames[r["sequence"]] == r["text"] for r in frames)), None)
        if match is None:
            check.fail(f"connection {conn_id}: its {len(frames)} frames are not what any venue "
                       f"connection sent (first: {frames[0]['text'][:80]!r})")
            continue
        unmatched.remove(match)
        venue = sent[match]
        if seqs != list(range(len(seqs))):
            first_gap = next(i for i, s in enumerate(seqs) if s != i)
            last_us = frames[-1]["received_ts_us"]
            before_gap_us = frames[first_gap - 1]["received_ts_us"] if first_gap else 0
            if not venue.killed or last_us - before_gap_us > KILLED_IN_FLIGHT_US:
                check.fail(f"connection {conn_id}: frame {first_gap} missing (sequence jumps"
                           f"{'' if venue.killed else '; the producer was not killed'})")
                continue
            killed_lost += seqs[-1] + 1 - len(seqs)
        if venue.sent_at_stop is not None and len(frames) < venue.sent_at_stop:
            check.fail(f"connection {conn_id} (open at the end): {len(frames)} frames written, "
                       f"the venue had sent {venue.sent_at_stop}")
        lost_tail += len(venue.frames) - (seqs[-1] + 1)
    never = [i for i in unmatched if sent[i].frames]
    if never:
        check.fail(f"{len(never)} venue connection(s) sent frames of which none reached "
                   f"raw.frames (first sent {sent[never[0]].frames[0][:80]!r})")
    check.notes.append(f"{len(by_conn)} connections; {lost_tail} frames in flight when a "
                       f"connection was cut, {killed_lost} read by a producer killed before it "
                       "wrote them")
    return check


# --------------------------------------------------------------------------- books

Levels = Sequence[tuple[str, str]]


def check_books(venue: Mapping[str, tuple[Levels, Levels]], snapshots: Iterable[Record],
                depth: int) -> Check:
    """The newest ``book.snapshots`` record of every symbol equals the venue's own book
    (top ``depth`` levels, compared as exact decimals)."""
    check = Check("final books = the venue's books")
    latest: dict[str, Record] = {}
    for rec in snapshots:
        latest[rec["symbol"]] = rec
        check.records += 1
    for symbol, (bids, asks) in sorted(venue.items()):
        if not bids and not asks:
            continue
        got = latest.get(symbol)
        if got is None:
            check.fail(f"{symbol}: no book snapshot at all")
            continue
        for side, want, have in (("bids", bids, got["bids"]), ("asks", asks, got["asks"])):
            want_levels = [(Decimal(p), Decimal(q)) for p, q in want[:depth]]
            have_levels = [(Decimal(lv["price"]), Decimal(lv["quantity"])) for lv in have]
            if want_levels != have_levels:
                diff = next((i for i, (a, b) in enumerate(zip(want_levels, have_levels))
                             if a != b), min(len(want_levels), len(have_levels)))
                check.fail(f"{symbol} {side} level {diff}: venue "
                           f"{want_levels[diff] if diff < len(want_levels) else None}, "
                           f"snapshot {have_levels[diff] if diff < len(have_levels) else None}")
    check.notes.append(f"{len(venue)} symbols compared")
    return check


# --------------------------------------------------------------------------- bars


def _key(bar: Bar) -> tuple[str, str, int]:
    return bar.symbol, bar.interval, bar.start_ms


def recompute_bars(trades: Iterable[Record], late: Iterable[Record],
                   intervals: Sequence[str]) -> list[Bar]:
    """The bars of ``trades`` by event time alone, leaving out the trades the group set
    aside as late (``bars.late``): what the group must have published, bar for bar."""
    late_ids = {(t["symbol"], t["trade_id"]) for t in late}
    builder = BarBuilder(BarSettings(intervals=tuple(intervals), lateness_ms=10 ** 12,
                                     dedupe_window=10 ** 7), clock=lambda: 0)
    out = Emitted()
    for trade in trades:
        if (trade["symbol"], trade["trade_id"]) not in late_ids:
            builder.add(trade, out)
    builder.drain(out)
    return out.bars


def check_bars(trades: Sequence[Record], late: Sequence[Record], published: Sequence[Record],
               stored: Sequence[Bar], intervals: Sequence[str],
               lateness_ms: int = BarSettings().lateness_ms) -> Check:
    """Bars equal bars recomputed from ``md.trades``: none doubled, none missing, none
    different, in the topic and in Parquet.

    A bar still open when the run stopped is not published yet, so a recomputed bar is
    missing only if its symbol traded ``lateness_ms`` or more after its end (the group
    closes a bar by event time then, if the wall clock has not closed it already).
    """
    check = Check("bars = bars recomputed from md.trades (topic and Parquet)")
    bars = [Bar.from_record(r) for r in published]
    check.records = len(trades) + len(bars) + len(stored)
    for where, found in (("topic", bars), ("Parquet", stored)):
        counts = Counter(_key(b) for b in found)
        doubled = [k for k, n in counts.items() if n > 1]
        if doubled:
            check.fail(f"{where}: bar {doubled[0]} written {counts[doubled[0]]} times")
    expected = {_key(b): b for b in recompute_bars(trades, late, intervals)}
    last_start: dict[tuple[str, str], int] = {}
    for bar in bars:
        last_start[bar.symbol, bar.interval] = max(last_start.get((bar.symbol, bar.interval),
                                                                  0), bar.start_ms)
        want = expected.get(_key(bar))
        if bar.trade_count == 0 or bar.filled:
            continue  # an empty interval closed by the clock: nothing to recompute
        if want != bar:
            check.fail(f"topic bar {_key(bar)}: published {bar}, recomputed {want}")
    published_keys = {_key(b) for b in bars}
    last_trade: dict[str, int] = {}
    for trade in trades:
        last_trade[trade["symbol"]] = max(last_trade.get(trade["symbol"], 0),
                                          trade["exchange_ts_ms"])
    for key, bar in sorted(expected.items()):
        due = bar.end_ms + lateness_ms <= last_trade.get(bar.symbol, -1)
        if key not in published_keys and (due or key[2] < last_start.get(key[:2], -1)):
            check.fail(f"bar {key} ({bar.trade_count} trades) missing from the topic")
            break
    stored_keys = Counter(_key(b) for b in stored)
    stored_by_key = {_key(b): b for b in stored}
    for bar in bars:
        if _key(bar) not in stored_keys:
            check.fail(f"bar {_key(bar)} is in the topic but not in Parquet")
            break
        if stored_by_key[_key(bar)] != bar:
            check.fail(f"bar {_key(bar)}: Parquet {stored_by_key[_key(bar)]}, topic {bar}")
            break
    extra = set(stored_keys) - published_keys
    if extra:
        check.fail(f"bar {sorted(extra)[0]} is in Parquet but not in the topic")
    per_interval = Counter(b.interval for b in bars)
    check.notes.append("bars per interval: " + ", ".join(
        f"{i} {per_interval[i]}" for i in sorted(per_interval, key=INTERVALS_MS.get)))
    return check


# --------------------------------------------------------------------------- orders


@dataclass(frozen=True)
class VenueOrders:
    """The venue's witness: each order placement it was asked for (client order id), and
    what its exchange holds per client order id (filled amount, still live or not)."""

    placements: Sequence[str | None]
    filled: Mapping[str, Decimal]
    live: Sequence[str | None]


def check_orders(requests: Sequence[Record], events: Sequence[Record],
                 venue: VenueOrders) -> Check:
    """Every order request has exactly one terminal event; the venue was asked to place
    each client order id at most once; the venue holds no live order at the end, and none
    the pipeline does not know; what the venue filled is what the events say was filled."""
    check = Check("orders: one terminal event each, sent at most once, none unknown")
    # NEW and REPLACE requests are orders; CANCEL / CANCEL_ALL ones act on orders
    placed = [r for r in requests if (r.get("action") or "NEW") in ("NEW", "REPLACE")]
    orders = {r["client_order_id"] for r in placed}
    known = {r["client_order_id"] for r in requests}
    check.records = len(requests) + len(events) + len(venue.placements)
    terminal: Counter[str] = Counter()
    filled: dict[str, Decimal] = {}
    for event in events:
        cid = event["client_order_id"]
        if cid not in known:
            check.fail(f"event {event['kind']} for {cid}, which no strategy requested")
            continue
        if event["kind"] in TERMINAL_KINDS:
            terminal[cid] += 1
        if event.get("filled_amount"):
            filled[cid] = max(filled.get(cid, Decimal(0)), Decimal(event["filled_amount"]))
    for cid in sorted(orders):
        if terminal[cid] != 1:
            story = " ".join(f"{e['kind']}({e.get('reason') or ''}:{e.get('filled_amount')})"
                             for e in events if e["client_order_id"] == cid)
            check.fail(f"{cid}: {terminal[cid]} terminal events: {story}".rstrip(": "))
            break
    sends = Counter(c for c in venue.placements if c is not None)
    twice = [c for c, n in sends.items() if n > 1]
    if twice:
        check.fail(f"{twice[0]} was sent to the venue {sends[twice[0]]} times")
    unknown = [c for c in sends if c not in known]
    if unknown:
        check.fail(f"the venue was asked to place {unknown[0]}, which no strategy requested")
    if venue.live:
        check.fail(f"{len(venue.live)} order(s) still live at the venue after the kill switch "
                   f"(first {venue.live[0]})")
    for cid, amount in sorted(venue.filled.items()):
        if amount != filled.get(cid, Decimal(0)):
            check.fail(f"{cid}: the venue filled {amount}, the events say "
                       f"{filled.get(cid, Decimal(0))}")
            break
    check.notes.append(f"{len(orders)} orders, {len(sends)} placed at the venue, "
                       f"{sum(1 for a in filled.values() if a)} with fills")
    return check


def check_positions(events: Sequence[Record], positions: Iterable[Record]) -> Check:
    """Each strategy's newest position per symbol equals the fold of its fill events:
    the same quantity, fills, and PnL (realized plus unrealized at the record's mark).

    Realized PnL alone is not compared: FIFO lots split it from unrealized PnL by the
    order fills were booked in, and a strategy's fills of different orders sit in
    different partitions of ``orders.events`` (keyed by order), which no two readers
    interleave alike. Their sum is the same in any order.
    """
    check = Check("positions = fold of the fill events")
    latest: dict[tuple[str, str], Record] = {}
    for rec in positions:
        latest[rec["strategy_id"], rec["symbol"]] = rec
    by_strategy: dict[str, list[Record]] = defaultdict(list)
    for event in events:
        by_strategy[event["strategy_id"]].append(event)
    check.records = len(events) + len(latest)
    for strategy, own in sorted(by_strategy.items()):
        ledger = fold(own)
        for symbol, size in sorted(ledger.position.items()):
            got = latest.get((strategy, symbol))
            where = f"{strategy} {symbol}"
            if got is None:
                if size:
                    check.fail(f"{where}: fills fold to {size}, no position record")
                continue
            if Decimal(got["quantity"]) != size:
                check.fail(f"{where}: position {got['quantity']}, fills fold to {size}")
            fills = ledger.fill_count.get(symbol, 0)
            if got.get("fills") is not None and got["fills"] != fills:
                check.fail(f"{where}: {got['fills']} fills in the position, {fills} fill events")
            if got.get("mark") is not None:
                mark = Decimal(got["mark"])
                want = ledger.realized.get(symbol, Decimal(0)) + ledger.unrealized_of(symbol, mark)
                have = Decimal(got["realized_pnl"]) + Decimal(got["unrealized_pnl"] or 0)
                if have != want:
                    check.fail(f"{where}: PnL at mark {mark} is {have} in the position, the "
                               f"fills fold to {want}")
    check.notes.append(f"{len(latest)} positions of {len(by_strategy)} strategies")
    return check


# --------------------------------------------------------------------------- archive

Positioned = tuple[int, int, Record]  # (partition, offset, record)


def check_archive(topics: Mapping[str, Sequence[Positioned]],
                  archived: Mapping[str, Sequence[Positioned]]) -> Check:
    """The Parquet archive equals its topics: every committed record of each archived topic
    is in it once, at its partition and offset, with the same fields (decimal text
    included); none it holds is missing from the topic. Checked after the topology
    stopped, when the group has flushed every buffer."""
    check = Check("archive = md.l2 and md.trades (Parquet, once each)")
    for topic in sorted(topics):
        want = {(p, o): r for p, o, r in topics[topic]}
        got = Counter((p, o) for p, o, _ in archived.get(topic, ()))
        check.records += len(want) + sum(got.values())
        doubled = sorted(k for k, n in got.items() if n > 1)
        if doubled:
            check.fail(f"{topic}[{doubled[0][0]}] offset {doubled[0][1]} archived "
                       f"{got[doubled[0]]} times")
        extra = sorted(set(got) - set(want))
        if extra:
            check.fail(f"{topic}[{extra[0][0]}] offset {extra[0][1]} is archived but not "
                       "in the topic")
        missing = sorted(set(want) - set(got))
        if missing:
            check.fail(f"{topic}[{missing[0][0]}] offset {missing[0][1]} missing from the "
                       f"archive ({len(missing)} of {len(want)} records)")
        for p, o, record in archived.get(topic, ()):
            if (p, o) in want and dict(record) != dict(want[p, o]):
                check.fail(f"{topic}[{p}] offset {o}: archived {dict(record)}, topic "
                           f"{dict(want[p, o])}")
                break
        check.notes.append(f"{topic}: {len(want)} records, {sum(got.values())} archived")
    return check


# --------------------------------------------------------------------------- dead letters


def check_dlq(dead_letters: Sequence[bytes], sent: Sequence[SentConnection],
              raw: Iterable[Record], malformed: bytes, faults: int) -> Check:
    """The DLQ holds exactly the malformed frames the producer read: every one of them
    (``raw.frames`` has each frame the producer read, the frames invariant ties it to
    what the venue sent), once, and nothing else. The venue's own record of the frames it
    sent is the witness, not the fault calls: a malformed frame still in flight when its
    connection was cut never reached the producer."""
    text = malformed.decode()
    went_out = sum(1 for c in sent for f in c.frames if f == text)
    read = sum(1 for r in raw if r["text"] == text)
    check = Check("DLQ = the malformed frames the producer read", records=len(dead_letters))
    ours = sum(1 for value in dead_letters if value == malformed)
    others = [value for value in dead_letters if value != malformed]
    if others:
        check.fail(f"{len(others)} other dead letter(s), first {others[0][:80]!r}")
    if ours != read:
        check.fail(f"the producer read {read} malformed frame(s), {ours} in the DLQ")
    if read > went_out:
        check.fail(f"raw.frames holds {read} malformed frame(s), the venue sent {went_out}")
    check.notes.append(f"{faults} malformed fault(s), {went_out} frame(s) sent, {read} read "
                       f"by the producer, {ours} in the DLQ")
    return check
