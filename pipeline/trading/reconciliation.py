"""Reconciliation: what the pipeline believes against what Gemini says. Pure: the caller
fetches Gemini's answers (``/v1/balances``, ``/v1/orders``, ``/v1/mytrades``) and publishes
the differences as ``ReconciliationEvent`` records.

What is compared:

* **Open orders.** An order Gemini has open that the pipeline does not know about is
  ``UNKNOWN_ORDER`` (reported, never adopted or cancelled); an order the pipeline holds
  open that Gemini does not have is ``MISSING_ORDER``; both open with a different
  remaining amount is ``ORDER_MISMATCH``.
* **Fills**, per order, of the trades ``mytrades`` returns that are younger than the
  pipeline's fill memory: Gemini filled more than the pipeline counted (a fill while
  execution was down, an order placed behind its back) is ``FILL_MISSING``; the same
  amount with other fees is ``FILL_MISMATCH``.
* **Balances.** The first check takes a baseline: Gemini's balance less what the
  pipeline's fills changed (what the account held apart from the pipeline). Every later
  check expects ``baseline + change`` per currency; a difference is ``BALANCE``.

Anything younger than ``grace_ms`` is left for the next check (an order just sent or a
fill just made may not be in ``orders.events`` yet); while such a trade exists the balance
comparison is deferred too. One ``CHECKED`` record sums up each check.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping

from pipeline.core.decimals import ZERO, plain
from pipeline.core.records import ReconciliationEvent
from pipeline.trading.portfolio import FILL_MEMORY_MS, Portfolio

KINDS = ("CHECKED", "BALANCE", "UNKNOWN_ORDER", "MISSING_ORDER", "ORDER_MISMATCH",
         "FILL_MISSING", "FILL_MISMATCH", "ERROR")


@dataclass(frozen=True)
class ExchangeView:
    """Gemini's answers, as its JSON: balances, active orders, recent trades."""

    balances: list[Mapping[str, Any]]
    orders: list[Mapping[str, Any]]
    trades: list[Mapping[str, Any]]


def _number(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except (InvalidOperation, TypeError):
        return ZERO


def finding(at_ms: int, mode: str, kind: str, detail: str, *, subject: str | None = None,
            symbol: str | None = None, strategy_id: str | None = None,
            expected: Decimal | str | None = None, actual: Decimal | str | None = None,
            differences: int = 1) -> ReconciliationEvent:
    """One ``ReconciliationEvent``."""
    def text(v: Decimal | str | None) -> str | None:
        return plain(v) if isinstance(v, Decimal) else v
    return {"at_ms": at_ms, "mode": mode, "kind": kind, "subject": subject,
            "symbol": symbol, "strategy_id": strategy_id, "expected": text(expected),
            "actual": text(actual), "detail": detail, "differences": differences}


def reconcile(portfolio: Portfolio, exchange: ExchangeView, baseline: dict[str, Decimal] | None,
              mode: str, now_ms: int, grace_ms: int = 30_000
              ) -> tuple[list[ReconciliationEvent], dict[str, Decimal]]:
    """The differences (``ReconciliationEvent`` dicts, the ``CHECKED`` summary last) and
    the balance baseline to keep (the one given, or a new one on the first check)."""
    out: list[ReconciliationEvent] = []
    settled = now_ms - grace_ms
    mine = {cid: o for cid, o in portfolio.open_orders.items() if o["mode"] == mode}
    by_exchange_id = {o["exchange_order_id"]: cid for cid, o in mine.items()
                      if o.get("exchange_order_id")}
    on_exchange: set[str] = set()
    for order in exchange.orders:
        oid, cid = str(order.get("order_id")), order.get("client_order_id")
        symbol = str(order.get("symbol", "")).upper()
        known = cid if cid in mine else by_exchange_id.get(oid)
        if known is None:
            if int(order.get("timestampms") or 0) > settled:
                continue
            out.append(finding(now_ms, mode, "UNKNOWN_ORDER",
                               f"Gemini has order {oid} open ({order.get('side')} "
                               f"{order.get('remaining_amount')} @ {order.get('price')}, "
                               f"client_order_id {cid!r}) that the pipeline did not place "
                               "or does not know: left alone", subject=oid, symbol=symbol,
                               actual=str(order.get("remaining_amount"))))
            continue
        on_exchange.add(known)
        ours = mine[known]
        expected = Decimal(ours["amount"]) - Decimal(ours["filled_amount"])
        actual = _number(order.get("remaining_amount"))
        if expected != actual:
            out.append(finding(now_ms, mode, "ORDER_MISMATCH",
                               f"order {known} has {plain(actual)} remaining on Gemini, "
                               f"{plain(expected)} in the pipeline", subject=known,
                               symbol=ours["symbol"], strategy_id=ours["strategy_id"],
                               expected=expected, actual=actual))
    for cid, ours in sorted(mine.items()):
        if cid not in on_exchange and ours["event_ms"] <= settled:
            out.append(finding(now_ms, mode, "MISSING_ORDER",
                               f"the pipeline holds order {cid} open ({ours['side']} "
                               f"{ours['amount']} {ours['symbol']}); Gemini does not have it "
                               "open", subject=cid, symbol=ours["symbol"],
                               strategy_id=ours["strategy_id"], expected="open", actual="absent"))
    recent = _fills(portfolio, exchange.trades, mode, now_ms, settled, out)
    if baseline is None:
        baseline = _baseline(exchange.balances, portfolio.holdings())
        note = "balance baseline taken"
    elif recent:
        note = f"balances not compared: {recent} trade(s) younger than the grace period"
    else:
        out += _balances(exchange.balances, portfolio.holdings(), baseline, mode, now_ms)
        note = "balances compared"
    found = len(out)
    out.append(finding(now_ms, mode, "CHECKED",
                       f"{found} difference(s); {len(exchange.orders)} open order(s), "
                       f"{len(exchange.trades)} trade(s) seen; {note}", differences=found))
    return out, baseline


def _fills(portfolio: Portfolio, trades: Iterable[Mapping[str, Any]], mode: str, now_ms: int,
           settled: int, out: list[ReconciliationEvent]) -> int:
    """Compare Gemini's trades per order with the pipeline's fills; returns how many
    trades were too young to compare."""
    horizon = now_ms - FILL_MEMORY_MS
    totals: dict[str, list[Any]] = {}  # order id -> [amount, fee, client_order_id, symbol]
    recent = 0
    for trade in trades:
        ms = int(trade.get("timestampms") or 0)
        if ms < horizon:
            continue
        if ms > settled:
            recent += 1
            continue
        oid = str(trade.get("order_id"))
        entry = totals.setdefault(oid, [ZERO, ZERO, trade.get("client_order_id"),
                                        str(trade.get("symbol") or "").upper() or None])
        entry[0] += _number(trade.get("amount"))
        entry[1] += _number(trade.get("fee_amount"))
    fills = portfolio.order_fills
    by_cid = {f["client_order_id"]: f for f in fills.values()}
    for oid, (amount, fee, cid, symbol) in sorted(totals.items()):
        ours = fills.get(oid) or by_cid.get(cid)
        if ours is not None and ours["mode"] != mode:
            ours = None
        counted = ZERO if ours is None else Decimal(ours["amount"])
        strategy = None if ours is None else ours["strategy_id"]
        if counted != amount:
            why = "not placed by the pipeline" if ours is None and cid is None else \
                "filled while the pipeline was not told (e.g. execution was down)"
            out.append(finding(now_ms, mode, "FILL_MISSING",
                               f"order {oid}: Gemini filled {plain(amount)}, the pipeline "
                               f"counted {plain(counted)} ({why})", subject=oid,
                               symbol=symbol or (None if ours is None else ours.get("symbol")),
                               strategy_id=strategy, expected=counted, actual=amount))
        elif ours is None:
            continue  # trades of an order we never had, adding up to nothing: nothing to compare
        elif Decimal(ours["fee"]) != fee:
            out.append(finding(now_ms, mode, "FILL_MISMATCH",
                               f"order {oid}: fees {plain(fee)} on Gemini, "
                               f"{ours['fee']} in the pipeline", subject=oid,
                               symbol=ours["symbol"], strategy_id=strategy,
                               expected=ours["fee"], actual=fee))
    return recent


def _amounts(balances: Iterable[Mapping[str, Any]]) -> dict[str, Decimal]:
    return {str(b["currency"]).upper(): _number(b.get("amount")) for b in balances}


def _baseline(balances: Iterable[Mapping[str, Any]], change: Mapping[str, Decimal]
              ) -> dict[str, Decimal]:
    have = _amounts(balances)
    return {c: have.get(c, ZERO) - change.get(c, ZERO) for c in sorted(set(have) | set(change))}


def _balances(balances: Iterable[Mapping[str, Any]], change: Mapping[str, Decimal],
              baseline: Mapping[str, Decimal], mode: str, now_ms: int
              ) -> list[ReconciliationEvent]:
    have = _amounts(balances)
    out = []
    for currency in sorted(set(have) | set(change) | set(baseline)):
        expected = baseline.get(currency, ZERO) + change.get(currency, ZERO)
        actual = have.get(currency, ZERO)
        if expected != actual:
            out.append(finding(now_ms, mode, "BALANCE",
                               f"{currency}: Gemini has {plain(actual)}, the pipeline expects "
                               f"{plain(expected)} (baseline {plain(baseline.get(currency, ZERO))}"
                               f" + its fills {plain(change.get(currency, ZERO))})",
                               subject=currency, expected=expected, actual=actual))
    return out
