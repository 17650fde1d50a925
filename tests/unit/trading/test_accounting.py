"""The one accounting module against hand-computed cases (pure: no broker)."""

from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.trading.accounting import Ledger, conversion, fold


def test_partial_fills_then_a_flip_from_long_to_short():
    ledger = Ledger(D("10000"), currency="USD")
    ledger.fill("BTCUSD", D(1), D(100), 1, fee=D("0.2"))  # a buy filled in two parts
    ledger.fill("BTCUSD", D(1), D(101), 2, fee=D("0.202"))
    assert ledger.position["BTCUSD"] == 2 and ledger.cost["BTCUSD"] == 201
    assert ledger.average_entry("BTCUSD") == D("100.5")
    assert ledger.realized["BTCUSD"] == D("-0.402")  # the opening fees, when paid
    assert ledger.cash == D("9999.598")
    assert ledger.equity({"BTCUSD": D(110)}) == D("10018.598")  # 9999.598 + 220 - 201

    # Sell 3 at 105: closes 1@100 (+5) and 1@101 (+4) FIFO, opens a short of 1 at 105;
    # the fee 0.63 is shared by size, 0.21 each.
    ledger.fill("BTCUSD", D(-3), D(105), 3, fee=D("0.63"))
    assert ledger.position["BTCUSD"] == -1 and ledger.average_entry("BTCUSD") == 105
    assert [(t.entry_price, t.exit_price, t.pnl) for t in ledger.closed] == [
        (D(100), D(105), D("4.59")),  # 5 - 0.2 entry - 0.21 exit
        (D(101), D(105), D("3.588"))]  # 4 - 0.202 - 0.21
    assert ledger.realized["BTCUSD"] == D("7.968")  # -0.402 + 5 + 4 - 0.63
    assert ledger.fees == {"USD": D("1.032")}
    assert ledger.unrealized_of("BTCUSD", D(100)) == 5
    assert ledger.equity({"BTCUSD": D(100)}) == D("10012.968")
    assert ledger.exposure({"BTCUSD": D(100)}) == 100
    assert ledger.holdings() == {"USD": D("10112.968"), "BTC": D(-1)}


def test_a_fee_in_the_base_currency():
    ledger = Ledger(D("10000"), currency="USD")
    ledger.fill("BTCUSD", D(1), D(100), 1, fee=D("0.001"), fee_currency="BTC")
    assert ledger.balances == {"USD": D(10000), "BTC": D("-0.001")}
    assert ledger.fees == {"BTC": D("0.001")}
    assert ledger.realized["BTCUSD"] == D("-0.1")  # valued at the fill's price
    assert ledger.holdings() == {"USD": D(9900), "BTC": D("0.999")}  # what Gemini shows
    # equity values the BTC owed at today's mark: 10000 + (120 - 100) - 0.001 * 120
    assert ledger.equity({"BTCUSD": D(120)}) == D("10019.88")


def test_cross_currency_equity_converts_through_the_books():
    ledger = Ledger(D("10000"), currency="USD")
    ledger.fill("ETHBTC", D(10), D("0.05"), 1, fee=D("0.001"))  # fee in BTC, the quote
    assert ledger.balances == {"USD": D(10000), "BTC": D("-0.001")}
    marks = {"ETHBTC": D("0.06"), "BTCUSD": D(20000)}
    # 10000 USD + (0.6 - 0.5) BTC unrealized - 0.001 BTC fee, BTC at 20000 USD
    assert ledger.equity(marks) == D("11980")
    assert ledger.equity(marks, "BTC") == D("0.5") + D("0.099")  # USD at 1/20000
    assert ledger.exposure(marks) == D("12000")  # 10 ETH x 0.06 BTC x 20000
    assert ledger.equity({"ETHBTC": D("0.06")}) is None  # BTC cannot be valued in USD
    assert conversion("USD", "BTC", {"BTCUSD": D(20000)}) == D("0.00005")
    assert conversion("EUR", "USD", marks) is None


def test_commission_rate_when_fills_carry_no_fee():
    ledger = Ledger(D("1000"), D("0.01"))
    assert ledger.fill("XYZUSD", D(2), D(50), 1) == D(1)  # 1% of 100
    assert ledger.fill("XYZUSD", D(-2), D(60), 2) == D("1.2")
    trade, = ledger.closed
    assert (trade.pnl, trade.commission) == (D("17.8"), D("2.2"))
    assert ledger.currency == "USD" and ledger.cash == D("1017.8")


def test_dump_and_load_give_the_same_ledger():
    ledger = Ledger(D("500"), currency="USD")
    ledger.fill("ETHUSD", D("1.5"), D(10), 1, fee=D("0.03"))
    ledger.fill("ETHUSD", D("-0.5"), D(12), 2, fee=D("0.01"))
    ledger.fill("BTCUSD", D("-0.1"), D(100), 3, fee=D("0.02"))
    again = Ledger.load(ledger.dump())
    marks = {"ETHUSD": D(11), "BTCUSD": D(90)}
    assert again.dump() == ledger.dump()
    assert again.equity(marks) == ledger.equity(marks)
    again.fill("ETHUSD", D(-1), D(13), 4, fee=D("0.02"))
    ledger.fill("ETHUSD", D(-1), D(13), 4, fee=D("0.02"))
    assert again.dump() == ledger.dump() and again.realized == ledger.realized


def _event(side: str, amount: str, price: str, fee: str, ms: int) -> dict:
    return {"symbol": "BTCUSD", "client_order_id": f"o{ms}", "filled_amount": amount,
            "side": side, "last_fill_amount": amount,
            "last_fill_price": price, "last_fill_fee": fee, "fee_currency": "USD",
            "event_ms": ms, "kind": "FILLED"}


def test_fold_of_order_events():
    events = [_event("buy", "2", "100", "0.4", 1), {"kind": "BOOKED", "last_fill_amount": None},
              _event("sell", "1", "110", "0.22", 2)]
    ledger = fold(events, D(1000), "USD")
    assert ledger.position["BTCUSD"] == 1 and ledger.realized["BTCUSD"] == D("9.38")
    assert ledger.equity({"BTCUSD": D(105)}) == D("1014.38")  # 1000 + 9.38 + 5


fills = st.lists(st.tuples(st.integers(-5, 5).filter(bool), st.integers(90, 110),
                           st.integers(0, 50)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(fills)
def test_equity_is_capital_plus_realized_plus_unrealized(trades):
    ledger = Ledger(D(1000), currency="USD")
    for size, price, fee in trades:
        ledger.fill("BTCUSD", D(size), D(price), 0, fee=D(fee) / 100)
    mark = D(100)
    unrealized = ledger.unrealized_of("BTCUSD", mark)
    assert ledger.position["BTCUSD"] == sum(D(s) for s, _, _ in trades)
    # fee shares have bounded places, so every sum of cash is exact
    assert ledger.cash == D(1000) + ledger.realized["BTCUSD"]
    assert ledger.equity({"BTCUSD": mark}) == D(1000) + ledger.realized["BTCUSD"] + unrealized
    tiny = D("1e-20")
    # closed trades' PnL differs from realized by the open lots' entry fees
    open_fees = sum(lot.entry_fee for lot in ledger.lots.get("BTCUSD", ()))
    assert abs(sum(t.pnl for t in ledger.closed) - ledger.realized["BTCUSD"] - open_fees) < tiny
