"""The vocabulary, the exact decimals and the exception tree: one place each."""

from __future__ import annotations

import importlib
import inspect
from decimal import Decimal

import pytest

from pipeline.core import decimals, errors
from pipeline.core.vocabulary import BookSide, OrderOption, OrderType, Side, TakerSide
from pipeline.strategy import OPTIONS, ORDER_TYPES, SIDES


def test_members_are_their_wire_strings():
    assert Side.BUY == "BUY" and Side.BUY.wire == "buy" and Side.SELL.book_side == "ASK"
    assert Side.BUY.book_side is BookSide.BID and BookSide.BID.opposite is BookSide.ASK
    assert [BookSide.parse(t) for t in ("buy", "BID", "ask", "SELL")] == ["BID", "BID", "ASK",
                                                                         "ASK"]
    assert tuple(TakerSide) == ("BUY", "SELL", "UNKNOWN")
    assert (SIDES, ORDER_TYPES) == (("BUY", "SELL"), ("LIMIT", "MARKET"))
    assert OPTIONS[:3] == ("maker-or-cancel", "immediate-or-cancel", "fill-or-kill")
    assert OPTIONS == tuple(OrderOption) and ORDER_TYPES == tuple(OrderType)
    with pytest.raises(ValueError):
        BookSide.parse("middle")


@pytest.mark.parametrize("text, canonical, exact", [
    ("1.2300", "1.23", "1.2300"), ("100", "100", "100"), ("1E+3", "1000", "1000"),
    ("8E-5", "0.00008", "0.00008"), ("-1.50", "-1.5", "-1.50"), ("0E-8", "0", "0E-8"),
    ("1.00000000000000000000000000001", "1.00000000000000000000000000001",
     "1.00000000000000000000000000001"),
])
def test_plain_and_fixed_text(text, canonical, exact):
    assert decimals.plain(Decimal(text)) == canonical
    if text != "0E-8":
        assert decimals.fixed(Decimal(text)) == exact


def test_the_old_decimal_helpers_are_the_one_module():
    from pipeline.market.bars import decimal_text
    from pipeline.venue.rest import decimal_text as venue_text

    assert decimal_text is decimals.plain and venue_text is decimals.plain
    assert decimals.decimal_string(Decimal("1.50"), "amount") == "1.50"
    assert decimals.decimal_string("2", "amount") == "2"
    with pytest.raises(TypeError):
        decimals.decimal_string(1.5, "amount")  # type: ignore[arg-type]
    assert decimals.UNSIGNED.fullmatch("1.5") and not decimals.UNSIGNED.fullmatch("-1")
    assert decimals.PLAIN.fullmatch("-1.5") and not decimals.PLAIN.fullmatch("1e5")


OLD_HOMES = {
    "pipeline.avro.serde": ["SerdeError"],
    "pipeline.avro.registry": ["RegistryError", "IncompatibleSchema", "UnknownSchemaId"],
    "pipeline.gemini.rest": ["GeminiError", "GeminiApiError", "GeminiRateLimited",
                             "GeminiInDoubt"],
    "pipeline.gemini.ws_session": ["WsError", "WsDisconnected", "WsTimeout"],
    "pipeline.gemini.symbols": ["RulesUnavailable"],
    "pipeline.trading.portfolio": ["BadFill"],
    "pipeline.sinks.archive": ["ArchiveError"],
    "pipeline.backtest.engine": ["StrategyFailed"],
}


def test_one_exception_tree_documented_in_core_errors():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__]
    for cls in classes:
        assert issubclass(cls, errors.PipelineError), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} not in the tree"
    for module, names in OLD_HOMES.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert getattr(loaded, name) is getattr(errors, name), (module, name)


def test_one_strategy_error_for_backtests_and_the_live_group():
    import consumers.strategy
    import pipeline

    assert consumers.strategy.StrategyError is errors.StrategyFailed is pipeline.StrategyFailed
