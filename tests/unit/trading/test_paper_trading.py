"""One trading core: the order-book backtest and paper execution fill alike, and the
simulator agrees with the local venue (the independent oracle) where their models meet.
Pure logic: no broker.

The tests that need Kafka: tests/integration/test_paper_trading.py."""

from __future__ import annotations

import io
from decimal import Decimal

import fastavro

from pipeline.avro import schemas
from pipeline.backtest.engine import BookBroker
from pipeline.core.vocabulary import OrderType, Side
from pipeline.market.book_policy import IGNORED, BookPolicy
from pipeline.market.orderbook import L2Book
from pipeline.trading.fees import FeeSchedule
from pipeline.trading.orders import Order
from pipeline.trading.paper import PaperExecution
from pipeline.trading.signing import client_order_id
from pipeline.trading.simulator import SimulatedExchange, SimulatorConfig
from pipeline.venue.exchange import Exchange
from tests.support.kafka_io import read_all  # noqa: E402

D = Decimal


SYMBOL = "BTCUSD"


T0 = 1_700_000_000_000  # ms


def l2(changes, snapshot=False):
    return {"symbol": SYMBOL, "snapshot": snapshot,
            "changes": [{"side": s, "price": p, "quantity": q} for s, p, q in changes],
            "exchange_ts_ms": None, "received_ts_us": 0, "connection_id": "c", "sequence": 0,
            "event_id": None}


def trade(taker, price, quantity):
    return {"symbol": SYMBOL, "trade_id": 1, "price": price, "quantity": quantity,
            "taker_side": taker, "exchange_ts_ms": 0, "received_ts_us": 0,
            "connection_id": "c", "sequence": 0, "from_snapshot": False}


def request(n, side="BUY", price=None, amount="1", options=(), action="NEW", target=None,
            ttl_ms=60_000, strategy="s"):
    return {"client_order_id": client_order_id(strategy, f"script/{n}"), "strategy_id": strategy,
            "symbol": SYMBOL, "side": side, "order_type": "LIMIT" if price else "MARKET",
            "price": price, "amount": amount, "options": list(options),
            "created_ms": T0 + n, "expires_ms": T0 + n + ttl_ms, "trigger": f"script/{n}",
            "signature": "-", "action": action, "target_client_order_id": target}


BOOK = [("BID", "100", "1"), ("BID", "99", "2"), ("BID", "98", "5"),
        ("ASK", "101", "1"), ("ASK", "102", "2"), ("ASK", "103", "5")]


def script():
    """(ms after T0, kind, payload): book, trades and requests of every action."""
    buy = request(1, price="102", amount="2.5")  # takes 101 and 102: filled at once
    quote = request(2, side="SELL", price="104", amount="1")
    steps = [
        (0, "l2", l2(BOOK, snapshot=True)),
        (1, "request", buy),
        (2, "request", quote),
        (3, "request", request(3, side="SELL", amount="1.5")),  # market: 100, then 99
        (4, "request", request(4, price="99.5", amount="1", options=["maker-or-cancel"])),
        (5, "l2", l2([("BID", "99.5", "3")])),  # others join at 99.5, behind ours
        (6, "trade", trade("SELL", "99.5", "0.6")),  # ours was first: 0.6 of it fills
        (7, "request", request(7, action="REPLACE", target=quote["client_order_id"],
                               side="SELL", price="103.5", amount="1")),
        (8, "request", request(8, action="CANCEL", target=buy["client_order_id"],
                               amount="0")),  # too late: CANCEL_REJECTED
        (9, "l2", l2([("ASK", "103", "0"), ("ASK", "103.4", "2")])),
        (10, "trade", trade("BUY", "103.6", "0.7")),  # through the replaced quote
        (11, "request", request(11, side="SELL", price="105", amount="2", ttl_ms=5)),
        (20, "l2", l2([("BID", "98", "4")])),  # the 5 ms order has expired by now
        (21, "request", request(21, action="CANCEL_ALL", amount="0")),
        (22, "request", request(22, action="CANCEL", target="never-sent", amount="0")),
    ]
    return steps


def through_backtest_broker(fees: FeeSchedule) -> list[dict]:
    broker = BookBroker(D(1_000_000), "s", fees=fees)
    policy = BookPolicy(10, books=broker.books)
    events = []
    for offset, (ms, kind, payload) in enumerate(script()):
        t = (T0 + ms) * 1000
        if t >= broker.exchange.next_due_us:
            events += broker.advance(t)
        if kind == "l2":
            if policy.apply(payload, 0, offset)[0] != IGNORED:
                events += broker.on_book(SYMBOL, None if payload["snapshot"] else
                                         payload["changes"], t) or []
        elif kind == "trade":
            events += broker.on_trade(payload, t) or []
        else:
            events += broker.execute(payload, t)
    return events


def through_paper_execution(fees: FeeSchedule) -> list[dict]:
    paper = PaperExecution(SimulatorConfig(fees=fees))
    events = []
    for offset, (ms, kind, payload) in enumerate(script()):
        now = T0 + ms
        events += paper.poll(now)
        if kind == "l2":
            events += paper.on_l2(payload, 0, offset, now)
        elif kind == "trade":
            events += paper.on_trade(payload, now)
        elif payload["action"] == "NEW":
            events += paper.place(payload, None, now)[0]
        elif payload["action"] == "REPLACE":
            events += paper.replace(payload, None, now)[0]
        elif payload["action"] == "CANCEL":
            events += paper.cancel(payload, now)[0]
        else:
            events += paper.cancel_all(payload, now, "Requested")[0]
    return events


def test_a_newly_booked_order_is_in_the_next_checkpoint_and_survives_a_restart():
    """Regression: an order that rested with nothing else changing was missing from
    paper.state, so a restart lost it without a terminal event (its strategy then saw it
    open for ever)."""
    paper = PaperExecution(SimulatorConfig())
    paper.on_l2(l2(BOOK, snapshot=True), 0, 0, T0)
    paper.order_states(0)
    events, _ = paper.place(request(1, price="99.5", amount="1", ttl_ms=1_000), None, T0 + 1)
    assert [e["kind"] for e in events] == ["ACCEPTED", "BOOKED"]
    states = paper.order_states(0)
    assert [[o["client_order_id"] for o in s["orders"]] for s in states] == \
        [[events[0]["client_order_id"]]]
    restarted = PaperExecution(SimulatorConfig())
    for state in states + paper.book_states(0, True):
        restarted.restore(state)
    assert restarted.open_orders() == 1
    expired = restarted.poll(T0 + 2_000)
    assert [(e["kind"], e["client_order_id"]) for e in expired] == \
        [("EXPIRED", events[0]["client_order_id"])]


def avro_bytes(events: list[dict]) -> list[bytes]:
    schema = fastavro.parse_schema(schemas.load("OrderEvent"))
    out = []
    for event in events:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, event)
        out.append(buffer.getvalue())
    return out


def test_the_backtest_broker_and_paper_execution_give_identical_events_byte_for_byte():
    fees = FeeSchedule(maker=D("0.001"), taker=D("0.003"))
    backtest, paper = through_backtest_broker(fees), through_paper_execution(fees)
    assert avro_bytes(backtest) == avro_bytes(paper)
    assert backtest == paper
    kinds = [e["kind"] for e in paper]
    # The script exercises every step of the lifecycle.
    for kind in ("ACCEPTED", "BOOKED", "PARTIALLY_FILLED", "FILLED", "CANCELLED", "EXPIRED",
                 "CANCEL_REJECTED"):
        assert kind in kinds, kind
    fills = [(e["last_fill_price"], e["last_fill_amount"], e["liquidity"]) for e in paper
             if e["last_fill_amount"]]
    assert fills == [("101", "1", "TAKER"), ("102", "1.5", "TAKER"), ("100", "1", "TAKER"),
                     ("99", "0.5", "TAKER"), ("99.5", "0.6", "MAKER"), ("103.5", "0.7", "MAKER")]
    reasons = [(e["kind"], e["reason"]) for e in paper if e["reason"]]
    assert reasons == [("CANCELLED", "Requested"), ("CANCEL_REJECTED", "order_closed"),
                       ("EXPIRED", "expired"), ("CANCELLED", "Requested"),
                       ("CANCELLED", "Requested"), ("CANCEL_REJECTED", "unknown_order")]
    replaced = [e for e in paper if e["kind"] == "CANCELLED"][0]
    assert replaced["request_id"] == client_order_id("s", "script/7"), \
        "the replaced quote is cancelled by the replacing request, which then books"


class _VenueBook:
    """The venue's BookSource over a book the test scripts."""

    def __init__(self, book: L2Book) -> None:
        self.book = book

    def symbols(self) -> set[str]:
        return {SYMBOL}

    def levels(self, symbol: str, side: str):
        bids, asks = self.book.depth()
        return [(D(p), D(q)) for p, q in (bids if side == "bid" else asks)]


def test_the_simulator_and_the_venue_fill_one_scripted_scenario_alike():
    """The venue keeps its own matching (the oracle): without a queue model, on books
    without trades, and with no two orders taking one level, both must fill alike."""
    book = L2Book(SYMBOL)
    book.apply_snapshot([{"side": s, "price": p, "quantity": q} for s, p, q in BOOK])
    venue = Exchange(_VenueBook(book), taker_fee=D("0.0035"), maker_fee=D("0.0025"),
                     initial_balances={"USD": D(10**6), "BTC": D(100)})
    sim = SimulatedExchange({SYMBOL: book}, SimulatorConfig(
        fees=FeeSchedule(maker=D("0.0025"), taker=D("0.0035")), queue="none"))
    orders = [("a", "buy", "2", "102", ()),  # takes 101 and 102: filled
              ("b", "buy", "1", "101", ("maker-or-cancel",)),  # would take: cancelled
              ("c", "sell", "3", "99", ("immediate-or-cancel",)),  # 100 and 99: filled
              ("d", "sell", "4", "99", ("fill-or-kill",)),  # 3 at or above 99: killed
              ("e", "buy", "1", "100.5", ()),  # rests
              ("f", "sell", "2", "102.5", ())]  # rests
    sim_fills: dict[str, list] = {}
    for cid, side, amount, price, options in orders:
        venue.new_order("k", SYMBOL, amount, price, side, options=options, client_order_id=cid)
        order = Order(cid, "s", SYMBOL, Side.parse(side), OrderType.LIMIT, D(price), D(amount),
                      options)
        for event in sim.submit(order, T0 * 1000):
            if event["last_fill_amount"]:
                sim_fills.setdefault(cid, []).append(event)

    def move(changes):
        book.apply([{"side": s, "price": p, "quantity": q} for s, p, q in changes])
        venue.on_book_update(SYMBOL)
        for event in sim.on_book(SYMBOL, [{"side": s, "price": p, "quantity": q}
                                          for s, p, q in changes], T0 * 1000) or []:
            if event["last_fill_amount"]:
                sim_fills.setdefault(event["client_order_id"], []).append(event)

    move([("ASK", "100.4", "0.6")])  # reaches e
    move([("ASK", "100.4", "0"), ("ASK", "100.5", "1")])  # the rest of e
    move([("ASK", s, "0") for s in ("100.5", "101", "102", "103")] +
         [("ASK", "104", "5"), ("BID", "103", "3")])  # the market moves up through f
    venue_fills = {}
    for fill in sorted(venue.trades("k", SYMBOL, limit=100), key=lambda f: f.tid):
        venue_fills.setdefault(fill.client_order_id, []).append(
            (fill.price, fill.amount, fill.fee, "TAKER" if fill.aggressor else "MAKER"))
    ours = {cid: [(D(e["last_fill_price"]), D(e["last_fill_amount"]), D(e["last_fill_fee"]),
                   e["liquidity"]) for e in events] for cid, events in sim_fills.items()}
    assert ours == venue_fills
    assert set(ours) == {"a", "c", "e", "f"}
    states = {cid: ("open" if o.is_live else o.cancel_reason or "filled")
              for cid, o in ((o.client_order_id, o) for o in venue._orders.values())}
    assert states == {"a": "filled", "b": "MakerOrCancelWouldTake", "c": "filled",
                      "d": "FillOrKillWouldNotFill", "e": "filled", "f": "filled"}
    assert not sim.open_orders()


def values(kafka: str, decode, topic: str) -> list[dict]:
    return [decode(r.value) for r in read_all(kafka, topic)]


