"""The chaos run's schedule and invariants, as pure logic (no broker): each invariant must
catch the failure it is there for, with the first counterexample named."""

from __future__ import annotations

from decimal import Decimal as D

from pipeline.kafka.catalog import replication_for
from pipeline.market.bars import Bar
from pipeline.ops.chaos.invariants import (
    SentConnection,
    VenueOrders,
    check_archive,
    check_bars,
    check_books,
    check_dlq,
    check_frames,
    check_orders,
    check_positions,
    recompute_bars,
)
from pipeline.ops.chaos.schedule import BROKER_FAULTS, FAULT_KINDS, make_schedule

GROUPS = ["orderbook", "bars", "strategy", "execution", "portfolio", "archive"]


# --------------------------------------------------------------------------- schedule


def test_same_seed_same_schedule_and_every_kind_and_group_early():
    one = make_schedule(7, 10, GROUPS, nodes=3)
    assert one == make_schedule(7, 10, GROUPS, nodes=3)
    assert one != make_schedule(8, 10, GROUPS, nodes=3)
    assert {f.kind for f in one} == set(FAULT_KINDS)
    assert {f.target for f in one if f.kind == "kill_group"} == set(GROUPS)
    times = [f.at_s for f in one]
    assert times == sorted(times) and times[0] >= 30 and times[-1] <= 10 * 60 - 30
    assert all(b - a >= 10 for a, b in zip(times, times[1:]))


def test_broker_faults_one_at_a_time_and_only_on_a_cluster():
    faults = make_schedule(3, 10, GROUPS, nodes=3)
    brokers = [f for f in faults if f.kind in BROKER_FAULTS]
    assert brokers and all(5 <= f.down_s <= 20 for f in brokers)
    for a, b in zip(brokers, brokers[1:]):
        assert b.at_s - (a.at_s + a.down_s) >= 60  # back and caught up before the next
    assert not [f for f in make_schedule(3, 10, GROUPS, nodes=1) if f.kind in BROKER_FAULTS]


def test_three_brokers_replicate_three_ways_one_broker_changes_nothing():
    assert replication_for(1) == {} and replication_for(2) == {}
    assert replication_for(3) == {"replication": 3, "config": {"min.insync.replicas": "2"}}


# --------------------------------------------------------------------------- frames


def raw(conn: str, texts: list[str], start: int = 0, ts: int = 0) -> list[dict]:
    return [{"connection_id": conn, "sequence": start + i, "text": t, "received_ts_us": ts + i}
            for i, t in enumerate(texts)]


def test_frames_held_with_a_cut_tail_and_a_complete_last_connection():
    sent = [SentConnection(("a", "b", "c", "d"), None), SentConnection(("x", "y"), 2)]
    check = check_frames(sent, raw("p1", ["a", "b"]) + raw("p2", ["x", "y"], ts=100))
    assert check.held and check.records == 4
    assert "2 frames in flight" in check.notes[0]


def test_a_killed_producer_may_miss_only_its_last_frames():
    sent = [SentConnection(tuple("abcdef"), None, killed=True)]
    # e and its neighbours went to partitions whose batches died with the process
    recent = [r for r in raw("p1", list("abcdef"), ts=0) if r["sequence"] not in (3, 4)]
    recent[-1]["received_ts_us"] = 1_000_000
    check = check_frames(sent, recent)
    assert check.held and "2 read by a producer killed" in check.notes[0]
    old = [dict(r) for r in recent]
    old[-1]["received_ts_us"] = 60_000_000  # a frame missing a minute before the end
    assert "frame 3 missing" in check_frames(sent, old).counterexample
    alive = [SentConnection(tuple("abcdef"), None, killed=False)]
    assert "the producer was not killed" in check_frames(alive, recent).counterexample


def test_frames_doubled_skipped_foreign_or_short_at_the_end_break():
    sent = [SentConnection(("a", "b", "c"), 3)]
    doubled = raw("p1", ["a", "b", "c"]) + raw("p1", ["b"], start=1)
    assert "frame 1 written 2 times" in check_frames(sent, doubled).counterexample
    skipped = [r for r in raw("p1", ["a", "b", "c"]) if r["sequence"] != 1]
    assert "frame 1 missing" in check_frames(sent, skipped).counterexample
    assert "not what any venue connection sent" in check_frames(
        sent, raw("p1", ["a", "z"])).counterexample
    short = check_frames(sent, raw("p1", ["a", "b"]))
    assert not short.held and "the venue had sent 3" in short.counterexample
    assert "none reached raw.frames" in check_frames(sent, []).counterexample


# --------------------------------------------------------------------------- books


def snapshot(symbol: str, bids, asks) -> dict:
    return {"symbol": symbol, "bids": [{"price": p, "quantity": q} for p, q in bids],
            "asks": [{"price": p, "quantity": q} for p, q in asks]}


def test_books_compare_exact_decimals_of_the_newest_snapshot():
    venue = {"BTCUSD": ([("100.0", "1")], [("101", "2.50")])}
    old = snapshot("BTCUSD", [("99", "1")], [("101", "2.5")])
    new = snapshot("BTCUSD", [("100", "1.0")], [("101", "2.5")])
    assert check_books(venue, [old, new], 10).held
    broken = check_books(venue, [new, old], 10)
    assert not broken.held and "BTCUSD bids level 0" in broken.counterexample
    assert "no book snapshot" in check_books(venue, [], 10).counterexample


# --------------------------------------------------------------------------- bars


def trade(tid: int, ts: int, price: str, qty: str = "1", symbol: str = "BTCUSD") -> dict:
    return {"symbol": symbol, "trade_id": tid, "price": price, "quantity": qty,
            "taker_side": "BUY", "exchange_ts_ms": ts, "received_ts_us": ts * 1000,
            "connection_id": "c", "sequence": tid, "from_snapshot": False,
            "exchange_ts_ns": None}


MINUTE = 60_000
TRADES = [trade(1, 0, "10"), trade(2, 30_000, "12"), trade(3, MINUTE + 1, "11"),
          trade(4, 2 * MINUTE + 5, "13")]


def published(trades: list[dict], late: list[dict] = ()) -> list[Bar]:
    """What a correct group publishes: closed bars, the last one of each interval open."""
    bars = recompute_bars(trades, late, ["1m"])
    return [b for b in bars if b.start_ms < 2 * MINUTE]


def test_bars_held_and_each_kind_of_wrong_bar_is_caught():
    bars = published(TRADES)
    records = [b.record() for b in bars]
    assert [b.trade_count for b in bars] == [2, 1]
    assert check_bars(TRADES, [], records, bars, ["1m"]).held
    doubled = check_bars(TRADES, [], records + records[:1], bars, ["1m"])
    assert "topic: bar ('BTCUSD', '1m', 0) written 2 times" in doubled.counterexample
    missing = check_bars(TRADES, [], records[1:], bars[1:], ["1m"])
    assert "missing from the topic" in missing.counterexample
    changed = dict(records[0], close="13")
    assert "published" in check_bars(TRADES, [], [changed, records[1]], bars,
                                     ["1m"]).counterexample
    assert "not in Parquet" in check_bars(TRADES, [], records, bars[:1], ["1m"]).counterexample


def test_a_trade_set_aside_as_late_is_left_out_of_its_bar():
    late = [TRADES[1]]
    bars = published(TRADES, late)
    assert bars[0].trade_count == 1 and bars[0].close == D("10")
    assert check_bars(TRADES, late, [b.record() for b in bars], bars, ["1m"]).held
    assert not check_bars(TRADES, [], [b.record() for b in bars], bars, ["1m"]).held


# --------------------------------------------------------------------------- orders


def request(cid: str, action: str = "NEW") -> dict:
    return {"client_order_id": cid, "action": action}


def event(cid: str, kind: str, filled: str = "0", strategy: str = "s", **kw) -> dict:
    return {"client_order_id": cid, "kind": kind, "filled_amount": filled,
            "strategy_id": strategy, **kw}


def test_orders_held_and_each_violation_named():
    requests = [request("a"), request("b"), request("c", "REPLACE"), request("x", "CANCEL")]
    events = [event("a", "ACCEPTED"), event("a", "FILLED", "1"), event("b", "REJECTED"),
              event("c", "ACCEPTED"), event("c", "CANCELLED")]
    venue = VenueOrders(["a", "c"], {"a": D("1"), "c": D("0")}, [])
    assert check_orders(requests, events, venue).held
    twice = check_orders(requests, events + [event("b", "CANCELLED")], venue)
    assert twice.counterexample == "b: 2 terminal events: REJECTED(:0) CANCELLED(:0)"
    none = check_orders(requests, events[:-1], venue)
    assert none.counterexample == "c: 0 terminal events: ACCEPTED(:0)"
    sent_twice = VenueOrders(["a", "c", "a"], venue.filled, [])
    assert "a was sent to the venue 2 times" in check_orders(requests, events,
                                                             sent_twice).counterexample
    stranger = VenueOrders(["a", "c", "zz"], venue.filled, [])
    assert "zz, which no strategy requested" in check_orders(requests, events,
                                                             stranger).counterexample
    resting = VenueOrders(["a", "c"], venue.filled, ["c"])
    assert "still live at the venue" in check_orders(requests, events, resting).counterexample
    overfilled = VenueOrders(["a", "c"], {"a": D("2"), "c": D("0")}, [])
    assert "a: the venue filled 2" in check_orders(requests, events, overfilled).counterexample


def fill(cid: str, amount: str, price: str, side: str, total: str) -> dict:
    return event(cid, "FILLED", total, symbol="BTCUSD", side=side, price=price,
                 last_fill_amount=amount, last_fill_price=price, avg_fill_price=price,
                 fee="0", last_fill_fee="0", fee_currency="USD", event_ms=1, amount=total,
                 liquidity="MAKER", mode="SANDBOX")


def test_positions_equal_the_fold_of_the_fills():
    events = [fill("a", "2", "10", "BUY", "2"), fill("b", "1", "12", "SELL", "1")]
    good = {"strategy_id": "s", "symbol": "BTCUSD", "quantity": "1", "realized_pnl": "2",
            "unrealized_pnl": "1", "mark": "11", "fills": 2}
    assert check_positions(events, [good]).held
    wrong = dict(good, quantity="2")
    assert "position 2, fills fold to 1" in check_positions(events, [good, wrong]).counterexample
    assert "no position record" in check_positions(events, []).counterexample
    # Realized and unrealized may split differently (FIFO over another interleaving)...
    assert check_positions(events, [dict(good, realized_pnl="1.5", unrealized_pnl="1.5")]).held
    # ...but their sum may not differ, nor the count of fills.
    lost = check_positions(events, [dict(good, unrealized_pnl="0.5")])
    assert "PnL at mark 11 is 2.5 in the position, the fills fold to 3" in lost.counterexample
    assert "3 fills in the position" in check_positions(
        events, [dict(good, fills=3)]).counterexample


def test_dlq_holds_exactly_the_malformed_frames_the_producer_read():
    bad = '{"broken'
    sent = [SentConnection(("a", bad, "b", bad), None), SentConnection(("c", bad), None)]
    read = raw("p1", ["a", bad, "b", bad]) + raw("p2", ["c"])  # the last one cut in flight
    held = check_dlq([bad.encode()] * 2, sent, read, bad.encode(), faults=4)
    assert held.held, held.counterexample
    assert held.notes == ["4 malformed fault(s), 3 frame(s) sent, 2 read by the producer, "
                          "2 in the DLQ"]
    lost = check_dlq([bad.encode()], sent, read, bad.encode(), faults=3)
    assert lost.counterexample == "the producer read 2 malformed frame(s), 1 in the DLQ"
    other = check_dlq([bad.encode()] * 2 + [b"other"], sent, read, bad.encode(), faults=3)
    assert "1 other dead letter" in other.counterexample
    forged = check_dlq([bad.encode()] * 3, sent[:1], read + raw("p3", [bad]), bad.encode(), 2)
    assert forged.counterexample == "raw.frames holds 3 malformed frame(s), the venue sent 2"


# --------------------------------------------------------------------------- archive


def test_the_archive_check_names_a_missing_doubled_extra_or_changed_record():
    def trade(i: int, price: str = "1.50") -> dict:
        return {"symbol": "BTCUSD", "trade_id": i, "price": price, "amount": "0.1"}

    topic = [(0, 0, trade(1)), (0, 1, trade(2)), (1, 0, trade(3))]
    topics = {"md.trades": topic, "md.l2": []}
    held = check_archive(topics, {"md.trades": list(reversed(topic))})
    assert held.held and held.records == 6
    assert held.notes == ["md.l2: 0 records, 0 archived", "md.trades: 3 records, 3 archived"]
    missing = check_archive(topics, {"md.trades": topic[:2]})
    assert missing.counterexample == ("md.trades[1] offset 0 missing from the archive "
                                      "(1 of 3 records)")
    doubled = check_archive(topics, {"md.trades": topic + topic[1:2]})
    assert doubled.counterexample == "md.trades[0] offset 1 archived 2 times"
    extra = check_archive(topics, {"md.trades": topic + [(0, 2, trade(4))]})
    assert extra.counterexample == "md.trades[0] offset 2 is archived but not in the topic"
    changed = check_archive(topics, {"md.trades": [topic[0], (0, 1, trade(2, "1.5")),
                                                   topic[2]]})
    assert not changed.held and "md.trades[0] offset 1: archived" in changed.counterexample
    assert "'1.5'" in changed.counterexample  # decimal text, not just the value, must match
