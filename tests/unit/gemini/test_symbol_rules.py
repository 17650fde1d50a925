"""Gemini's symbol rules: the one pure check, the loader and its cache against the local
venue over real HTTP, the venue's own enforcement, and execution's decision and the
simulator refusing the same orders with the same reasons. Only the last test (execution
over the WebSocket API) needs the broker.

The tests that need Kafka: tests/integration/test_symbol_rules.py."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from decimal import Decimal

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.rules import SymbolRules
from pipeline.gemini.rest import GeminiApiError, GeminiRestClient, NonceSource
from pipeline.gemini.symbols import RulesUnavailable, load_rules, parse_recorded, read_rules_file
from pipeline.market.orderbook import L2Book
from pipeline.trading.execution import REJECT, decide
from pipeline.trading.risk import BookTop, RiskLimits, RiskState
from pipeline.trading.rules import check_order
from pipeline.trading.signing import StrategyKeys, client_order_id, sign
from pipeline.trading.simulator import SimulatedExchange, SimulatorConfig
from tests.unit.gemini.test_rest import KEY, SECRET, Venue

D = Decimal


BTC = SymbolRules("BTCUSD", D("0.01"), D("1E-8"), D("0.00001"))


TABLE = {"BTCUSD": BTC,
         "ETHUSD": SymbolRules("ETHUSD", D("0.01"), D("0.000001"), D("0.001"), "post_only"),
         "BTCDAI": SymbolRules("BTCDAI", D("0.01"), D("1E-8"), D("0.00001"), "limit_only"),
         "BTCGUSD": SymbolRules("BTCGUSD", D("0.01"), D("1E-8"), D("0.00001"), "closed"),
         "BTCEUR": SymbolRules("BTCEUR", D("0.01"), D("1E-8"), D("0.00001"), "cancel_only")}


STRATEGY_KEY = b"rules-test-key-0123456789abcdef"


def check(symbol="BTCUSD", order_type="LIMIT", price="30000.01", amount="0.001", options=(),
          cid="sma-0123", action="NEW", rules=TABLE):
    return check_order(rules, symbol=symbol, order_type=order_type,
                       price=None if price is None else D(price), amount=D(amount),
                       options=options, client_order_id=cid, action=action)


def test_each_rule_names_geminis_reason() -> None:
    assert check() is None
    assert check(price="30000.015") == "InvalidPrice"
    assert check(amount="0.000001") == "InvalidQuantity"  # below the minimum: dust
    assert check(amount="0.000010001") == "InvalidQuantity"  # off the 1e-8 step
    assert check(amount="0.00001") is None  # exactly the minimum
    assert check(symbol="DOGEUSD") == "InvalidSymbol"
    assert check(options=("maker-or-cancel", "immediate-or-cancel")) == "ConflictingOptions"
    assert check(options=("good-till-mars",)) == "UnsupportedOption"
    assert check(cid="x" * 37) == "ClientOrderIdTooLong"
    assert check(cid="x" * 36) is None
    assert check(cid=17) == "ClientOrderIdMustBeString"
    assert check(cid="has space") == "InvalidClientOrderId"
    assert check(cid="a:b-c_d.e#F9") is None
    # No rules known: ids and options are still Gemini's; steps and symbols are not checked.
    assert check(symbol="DOGEUSD", price="1.23456789", rules=None) is None
    assert check(options=("fill-or-kill", "maker-or-cancel"), rules=None) == "ConflictingOptions"
    # The first failing check names the refusal: the id before the symbol before options.
    assert check(symbol="DOGEUSD", cid="x" * 40, options=("a", "b")) == "ClientOrderIdTooLong"


@pytest.mark.parametrize("symbol, order_type, options, action, expected", [
    ("BTCGUSD", "LIMIT", (), "NEW", "MarketNotOpen"),  # closed: everything refused
    ("BTCGUSD", "LIMIT", ("maker-or-cancel",), "NEW", "MarketNotOpen"),
    ("BTCGUSD", "LIMIT", (), "CANCEL", "MarketNotOpen"),
    ("BTCEUR", "LIMIT", ("maker-or-cancel",), "NEW", "MarketNotOpen"),  # cancel_only
    ("BTCEUR", "LIMIT", (), "REPLACE", "MarketNotOpen"),
    ("BTCEUR", "LIMIT", (), "CANCEL", None),  # ... but its cancels pass
    ("BTCEUR", "LIMIT", (), "CANCEL_ALL", None),
    ("ETHUSD", "LIMIT", (), "NEW", "MarketNotOpen"),  # post_only: a GTC limit is refused
    ("ETHUSD", "LIMIT", ("immediate-or-cancel",), "NEW", "MarketNotOpen"),
    ("ETHUSD", "MARKET", (), "NEW", "MarketNotOpen"),
    ("ETHUSD", "LIMIT", ("maker-or-cancel",), "NEW", None),  # only maker-or-cancel limits
    ("BTCDAI", "MARKET", (), "NEW", "MarketNotOpen"),  # limit_only: no market orders
    ("BTCDAI", "LIMIT", ("immediate-or-cancel",), "NEW", None),
    ("BTCDAI", "LIMIT", (), "NEW", None),
    ("BTCUSD", "MARKET", (), "NEW", None),
])
def test_statuses(symbol, order_type, options, action, expected) -> None:
    price = None if order_type == "MARKET" else "30000.01"
    assert check(symbol=symbol, order_type=order_type, price=price, options=options,
                 action=action) == expected


@settings(max_examples=300, deadline=None)
@given(ticks=st.integers(1, 10**12), extra=st.integers(1, 99),
       price_ticks=st.integers(1, 10**9))
def test_steps_are_exact_multiples(ticks: int, extra: int, price_ticks: int) -> None:
    on_grid = D(ticks) * D("1E-8") + D("0.00001")
    price = D(price_ticks) * D("0.01")
    assert check(price=str(price), amount=str(on_grid)) is None
    assert check(price=str(price), amount=str(on_grid + D(extra) * D("1E-10"))) == \
        "InvalidQuantity"
    assert check(price=str(price + D(extra) * D("0.0001")), amount=str(on_grid)) == \
        "InvalidPrice"


def test_client_order_ids_are_gemini_valid_for_any_strategy_id() -> None:
    short = client_order_id("sma", "md.l2/0/1")
    assert short.startswith("sma-") and len(short) == 24  # unchanged for short ids
    one = client_order_id("a-very-long-strategy-name/v2 (test)", "md.l2/0/1")
    two = client_order_id("a-very-long-strategy-name/v3 (test)", "md.l2/0/1")
    for cid in (one, two):
        assert len(cid) == 36 and check(cid=cid) is None
    assert one.startswith("a-very-long-str-") and one != two  # the digest has the whole id
    assert client_order_id("a-very-long-strategy-name/v2 (test)", "md.l2/0/1") == one


def test_parser_reads_the_recorded_responses(shared_data) -> None:
    path = shared_data / "gemini_rest_symbols_2021-06-24.txt"
    table = read_rules_file(path)
    assert table == parse_recorded(path.read_text())
    assert len(table) == 71
    assert table["BTCUSD"] == SymbolRules("BTCUSD", D("0.01"), D("1E-8"), D("0.00001"), "open",
                                          "BTC", "USD")
    assert table["ETHBTC"].price_step == D("0.00001") and table["ETHBTC"].amount_step == \
        D("0.000001") and table["ETHBTC"].min_amount == D("0.001")
    assert Counter(r.status for r in table.values()) == {"open": 59, "limit_only": 9,
                                                         "closed": 3}
    assert table["BTCGUSD"].status == "closed" and table["BTCDAI"].status == "limit_only"
    assert check(symbol="BTCGUSD", rules=table) == "MarketNotOpen"


def signed(**fields) -> dict:
    request = {"client_order_id": fields.pop("client_order_id", None), "strategy_id": "sma",
               "symbol": "BTCUSD", "side": "BUY", "order_type": "LIMIT", "price": "30000.00",
               "amount": "0.001", "options": [], "created_ms": 1_000, "expires_ms": 10**13,
               "trigger": "test", "action": "NEW", "target_client_order_id": None, **fields}
    if request["client_order_id"] is None:
        request["client_order_id"] = client_order_id(request["strategy_id"], str(fields))
    request["signature"] = sign(request, STRATEGY_KEY)
    return request


BAD = {  # what each bad order is refused for, by decide and by the simulator alike
    "off-step price": ({"price": "30000.005"}, "rules:InvalidPrice"),
    "dust amount": ({"amount": "0.000001"}, "rules:InvalidQuantity"),
    "post_only GTC": ({"symbol": "ETHUSD", "price": "2000.00"}, "rules:MarketNotOpen"),
    "two options": ({"options": ["maker-or-cancel", "fill-or-kill"]}, "rules:ConflictingOptions"),
    "long id": ({"strategy_id": "sma", "client_order_id": "sma-" + "0" * 40},
                "rules:ClientOrderIdTooLong"),
}


def test_decide_and_the_simulator_refuse_the_same_orders_with_the_same_reasons() -> None:
    keys = StrategyKeys({"sma": STRATEGY_KEY})
    book = BookTop("BTCUSD", ((D("29999.99"), D(1)),), ((D("30000.01"), D(1)),), 1_000,
                   D("0.01"))
    books = {"BTCUSD": L2Book("BTCUSD"), "ETHUSD": L2Book("ETHUSD")}
    exchange = SimulatedExchange(books, SimulatorConfig(rules=TABLE))
    for name, (fields, reason) in BAD.items():
        request = signed(**fields)
        verdict = decide(request, keys=keys, seen={}, killed=False, now_ms=2_000,
                         limits=RiskLimits(), state=RiskState(), book=book, rules=TABLE)
        assert (verdict.action, verdict.reason) == (REJECT, reason), name
        events = exchange.execute(request, 2_000_000)
        assert [(e["kind"], e["reason"]) for e in events] == [("REJECTED", reason)], name
    good = signed(price="30000.00")
    assert decide(good, keys=keys, seen={}, killed=False, now_ms=2_000, limits=RiskLimits(),
                  state=RiskState(), book=book, rules=TABLE).action == "NEW"


def test_a_market_orders_band_edge_is_on_the_rules_price_step() -> None:
    keys = StrategyKeys({"sma": STRATEGY_KEY})
    coarse = {"BTCUSD": SymbolRules("BTCUSD", D("0.5"), D("1E-8"), D("0.00001"))}
    book = BookTop("BTCUSD", ((D("29999.99"), D(1)),), ((D("30000.01"), D(1)),), 1_000,
                   D("0.01"))
    market = signed(order_type="MARKET", price=None)
    verdict = decide(market, keys=keys, seen={}, killed=False, now_ms=2_000,
                     limits=RiskLimits(), state=RiskState(), book=book, rules=coarse)
    assert verdict.action == "NEW" and verdict.price == D("30300.0")  # 1% above, on 0.5s
    limit_only = {"BTCUSD": SymbolRules("BTCUSD", D("0.01"), D("1E-8"), D("0.00001"),
                                        "limit_only")}
    refused = decide(market, keys=keys, seen={}, killed=False, now_ms=2_000,
                     limits=RiskLimits(), state=RiskState(), book=book, rules=limit_only)
    assert refused.reason == "rules:MarketNotOpen"
    assert RiskLimits(price_steps={"X": D(1)}).tick_sizes == {"X": D(1)}  # the old name


@pytest.fixture
def ruled_venue():
    venue = Venue()
    venue.book.books["ETHUSD"] = {"bid": [("2000.00", "1")], "ask": [("2001.00", "1")]}
    venue.on_loop(lambda: setattr(venue.exchange, "given_rules", dict(TABLE)))
    yield venue
    venue.close()


def test_the_venue_serves_its_rules_and_refuses_what_they_forbid(ruled_venue, tmp_path) -> None:
    listed = requests.get(ruled_venue.url + "/v1/symbols", timeout=10)
    assert listed.status_code == 200 and listed.json() == ["btcusd", "ethusd"]  # served ones
    details = requests.get(ruled_venue.url + "/v1/symbols/details/ethusd", timeout=10).json()
    assert details == {"symbol": "ETHUSD", "base_currency": None, "quote_currency": None,
                       "tick_size": "0.000001", "quote_increment": "0.01",
                       "min_order_size": "0.001", "status": "post_only"}
    unknown = requests.get(ruled_venue.url + "/v1/symbols/details/dogeusd", timeout=10)
    assert unknown.status_code == 400 and unknown.json()["reason"] == "InvalidSymbol"

    client = GeminiRestClient(ruled_venue.url, KEY, SECRET, NonceSource(tmp_path / "nonce"),
                              timeout_s=10)
    try:
        cases = [("btcusd", "0.001", "29000.005", [], "ok-1", "InvalidPrice"),
                 ("btcusd", "0.000001", "29000.00", [], "ok-2", "InvalidQuantity"),
                 ("btcusd", "0.0010000001", "29000.00", [], "ok-3", "InvalidQuantity"),
                 ("ethusd", "0.01", "1990.00", [], "ok-4", "MarketNotOpen"),
                 ("btcusd", "0.001", "29000.00", ["maker-or-cancel", "fill-or-kill"], "ok-5",
                  "ConflictingOptions"),
                 ("btcusd", "0.001", "29000.00", [], "x" * 37, "ClientOrderIdTooLong"),
                 ("btcusd", "0.001", "29000.00", [], "bad id", "InvalidClientOrderId")]
        for symbol, amount, price, options, cid, reason in cases:
            with pytest.raises(GeminiApiError) as refused:
                client.new_order(symbol, amount, price, "buy", options=options,
                                 client_order_id=cid)
            assert (refused.value.reason, refused.value.http_status) == (reason, 400), cid
        placed = client.new_order("ethusd", "0.01", "1990.00", "buy",
                                  options=["maker-or-cancel"], client_order_id="ok-6")
        assert placed["is_live"] is True  # post_only takes a maker-or-cancel that rests
    finally:
        client.close()
    outcomes = [(e["client_order_id"], e["outcome"]) for e in ruled_venue.log]
    assert outcomes == [(c[4], c[5]) for c in cases] + [("ok-6", "accepted")]


def test_the_loader_caches_a_day_refetches_the_next_and_falls_back_when_unreachable(
        ruled_venue, tmp_path, caplog) -> None:
    day = dt.date(2026, 12, 2)
    table = load_rules(ruled_venue.url, tmp_path, ["BTCUSD", "ETHUSD"], today=day)
    assert table == {"BTCUSD": TABLE["BTCUSD"], "ETHUSD": TABLE["ETHUSD"]}
    caches = sorted(p.name for p in (tmp_path / "gemini").iterdir())
    assert caches == ["symbols-127.0.0.1_%s-2026-12-02.json" % ruled_venue.url.rsplit(":", 1)[1]]
    assert read_rules_file(tmp_path / "gemini" / caches[0]) == table

    changed = dict(TABLE, ETHUSD=SymbolRules("ETHUSD", D("0.05"), D("0.0001"), D("0.01")))
    ruled_venue.on_loop(lambda: setattr(ruled_venue.exchange, "given_rules", changed))
    again = load_rules(ruled_venue.url, tmp_path, ["BTCUSD", "ETHUSD"], today=day)
    assert again["ETHUSD"].status == "post_only"  # today's cache, not asked again
    subset = load_rules(ruled_venue.url, tmp_path, ["ETHUSD"], today=day)
    assert subset["ETHUSD"].status == "post_only"  # the cache covers a subset too
    tomorrow = load_rules(ruled_venue.url, tmp_path, ["BTCUSD", "ETHUSD"],
                          today=day + dt.timedelta(days=1))
    assert tomorrow["ETHUSD"] == changed["ETHUSD"]  # a new day: fetched again
    wider = load_rules(ruled_venue.url, tmp_path, ["BTCUSD", "ETHUSD", "BTCDAI"],
                       today=day + dt.timedelta(days=1))
    assert set(wider) == {"BTCUSD", "ETHUSD"}  # asked again (BTCDAI is not served)

    url = ruled_venue.url
    ruled_venue.close()
    ruled_venue.close = lambda: None  # the fixture's teardown: already closed
    with caplog.at_level(logging.WARNING, logger="pipeline.gemini.symbols"):
        fallback = load_rules(url, tmp_path, ["BTCUSD", "ETHUSD"],
                              today=day + dt.timedelta(days=5), timeout_s=2)
    assert fallback["ETHUSD"] == changed["ETHUSD"]  # the newest cache
    assert "using the cache" in caplog.text and "2026-12-03" in caplog.text
    with pytest.raises(RulesUnavailable, match="no cache"):
        load_rules(url, tmp_path / "empty", ["BTCUSD"], today=day, timeout_s=2)


def test_the_venue_and_the_simulator_refuse_the_same_orders_with_gemini_names() -> None:
    """The venue's own implementation against the one check, order by order."""
    from pipeline.core.vocabulary import OrderType, Side
    from pipeline.trading.orders import Order
    from pipeline.venue.exchange import Exchange, ExchangeError
    from tests.unit.gemini.test_rest import starting_book

    book = starting_book()
    book.books["ETHUSD"] = {"bid": [("2000.00", "1")], "ask": [("2001.00", "1")]}
    venue = Exchange(book, rules=TABLE)
    sim = SimulatedExchange({s: L2Book(s) for s in ("BTCUSD", "ETHUSD")},
                            SimulatorConfig(rules=TABLE))
    orders = [("o1", "BTCUSD", "0.001", "29000.001", ()),
              ("o2", "BTCUSD", "0.000009", "29000", ()),
              ("o3", "BTCUSD", "0.000010001", "29000", ()),
              ("o4", "ETHUSD", "0.01", "1990", ()),
              ("o5", "ETHUSD", "0.01", "1990", ("immediate-or-cancel",)),
              ("o6", "BTCUSD", "0.001", "29000", ("maker-or-cancel", "immediate-or-cancel")),
              ("x" * 37, "BTCUSD", "0.001", "29000", ()),
              ("o 8", "BTCUSD", "0.001", "29000", ()),
              ("o9", "ETHUSD", "0.01", "1990", ("maker-or-cancel",)),
              ("o10", "BTCUSD", "0.00001", "29000.01", ())]
    venue_says, sim_says = [], []
    for cid, symbol, amount, price, options in orders:
        try:
            venue.new_order("k", symbol, amount, price, "buy", options=options,
                            client_order_id=cid)
            venue_says.append(None)
        except ExchangeError as refused:
            venue_says.append(refused.reason)
        order = Order(cid, "s", symbol, Side.BUY, OrderType.LIMIT, D(price), D(amount), options)
        first = sim.submit(order, 1_000_000)[0]
        sim_says.append(first["reason"] if first["kind"] == "REJECTED" else None)
    assert venue_says == ["InvalidPrice", "InvalidQuantity", "InvalidQuantity", "MarketNotOpen",
                          "MarketNotOpen", "ConflictingOptions", "ClientOrderIdTooLong",
                          "InvalidClientOrderId", None, None]
    assert sim_says == [None if r is None else f"rules:{r}" for r in venue_says]


def test_a_book_backtest_refuses_by_the_rules_it_is_given() -> None:
    from pipeline.backtest.engine import backtest_events
    from tests.support.backtest_strategies import Scripted
    from tests.unit.backtest.test_backtest import BOOK, l2

    events = [l2(0, BOOK, snapshot=True)]
    script = {0: [dict(side="BUY", amount="0.5", order_type="LIMIT", price="100.005"),
                  dict(side="BUY", amount="0.000001", order_type="LIMIT", price="100"),
                  dict(side="BUY", amount="0.5", order_type="LIMIT", price="100")]}
    ruled = Scripted(script)
    backtest_events(ruled, events, fill="book", finalize_trades=False, rules=TABLE)
    assert [(e["kind"], e["reason"]) for e in ruled.events] == [
        ("REJECTED", "rules:InvalidPrice"), ("REJECTED", "rules:InvalidQuantity"),
        ("ACCEPTED", None), ("BOOKED", None)]
    free = Scripted(script)  # no rules given: only ids and options are checked
    backtest_events(free, events, fill="book", finalize_trades=False)
    assert [e["kind"] for e in free.events] == ["ACCEPTED", "BOOKED"] * 3


def test_execution_start_up_picks_its_rules_by_mode(shared_data, tmp_path) -> None:
    from pipeline.core.errors import PipelineError
    from pipeline.gemini.symbols import startup_rules

    recorded = shared_data / "gemini_rest_symbols_2021-06-24.txt"
    nowhere = "http://127.0.0.1:9"  # nothing listens: refused at once
    assert startup_rules("paper", nowhere, tmp_path, None) is None  # paper asks no one
    assert startup_rules("paper", nowhere, tmp_path, None, rules_file=recorded)["BTCUSD"] == \
        read_rules_file(recorded)["BTCUSD"]
    with pytest.raises(RulesUnavailable):
        startup_rules("sandbox", nowhere, tmp_path, ["BTCUSD"])  # never without rules
    fallback = startup_rules("live", nowhere, tmp_path, ["BTCUSD"], rules_file=recorded)
    assert len(fallback) == 71
    with pytest.raises(PipelineError, match="always checks"):
        startup_rules("live", nowhere, tmp_path, None, off=True)
    assert startup_rules("paper", nowhere, tmp_path, None, off=True) is None


def test_the_captures_quotes_are_valid_under_that_days_rules(shared_data) -> None:
    """MidQuoter on the recorded FILUSD book, in memory, with and without Gemini's rules of
    the same day: quotes of 0.1 FIL at 0.0001 steps are all valid (the same events either
    way); the strategy's default 0.001 FIL is dust there (FILUSD's minimum is 0.1)."""
    from pipeline.backtest.engine import L2, backtest_events, event_time_us
    from pipeline.gemini.capture import received_frames
    from pipeline.gemini.marketdata import V2Normalizer
    from pipeline.strategy import load_strategy

    rules = read_rules_file(shared_data / "gemini_rest_symbols_2021-06-24.txt")
    events, offsets = [], Counter()
    normalizer = V2Normalizer("c")
    for frame in received_frames(shared_data / "gemini_v2_l2_capture_2021-06-24.txt"):
        for record in normalizer.normalize_text(frame.text, frame.received_us):
            kind = L2 if record.topic == "md.l2" else "trade"
            events.append((event_time_us(kind, record.value), "c." + record.topic, 0,
                           offsets[record.topic], kind, record.value))
            offsets[record.topic] += 1
    events.sort(key=lambda e: e[:4])

    def run(amount: str, table):
        strategy = load_strategy("pipeline.strategy:MidQuoter", {
            "symbol": "FILUSD", "tick": "0.0001", "spread_bps": 10, "requote_bps": 5,
            "amount": amount, "max_inventory": "1"})
        return backtest_events(strategy, events, fill="book", cash="100000", rules=table)

    free, ruled = run("0.1", None), run("0.1", rules)
    assert ruled.order_events == free.order_events and len(free.trades) >= 2
    assert free.orders.submitted > 10 and not free.orders.rejected
    dust = run("0.001", rules)
    reasons = Counter(e["reason"] for e in dust.order_events if e["kind"] == "REJECTED")
    assert reasons == {"rules:InvalidQuantity": dust.orders.submitted} and not dust.trades


