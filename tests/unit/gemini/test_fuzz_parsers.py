"""Fuzzed inputs (hypothesis): the three market-data normalizers, the CSV loader and order
request verification. Whatever comes in ends in a record, a documented error or the DLQ,
never an exception of another type (which would end the producer's feed thread or the
loader with a stack trace) and never a hang.

The examples are seeded from real recorded Gemini data (``shared_data``) and are mostly
*structurally plausible*: a real frame, file or signed request with one part mutated
(wrong type, missing key, huge number, NaN/Infinity text, negative or zero quantity, other
scripts' digits, deep nesting), because random text stops at ``json.loads``.

Sizes: the default profile (``fuzz-quick``) runs the file in well under a minute; the long
run is ``HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m pytest`` on this file.
No broker is needed.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.avro import codec, schemas
from pipeline.core.decimals import plain
from pipeline.core.errors import PipelineError
from pipeline.core.vocabulary import OrderEventKind
from pipeline.gemini.marketdata import (
    FrameError,
    SequenceGap,
    UpdateGap,
    V1Normalizer,
    V2Normalizer,
    WsNormalizer,
)
from pipeline.trading.execution import (
    CANCEL_REJECT,
    REJECT,
    Verdict,
    cancel_rejected,
    decide,
    request_event,
)
from pipeline.trading.risk import BookTop, RiskLimits, RiskState
from pipeline.trading.signing import StrategyKeys, canonical, client_order_id, sign, verify
from producers.csv_bars import parse_ohlcv_csv

_QUICK = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz-quick", _QUICK)
settings.register_profile("fuzz", settings(_QUICK, max_examples=5_000, derandomize=False))
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" and "fuzz"
                               or "fuzz-quick")
fuzz = settings(PROFILE)

# What "a clear error" is for a frame: what producers/gemini_ws.IngestSink.frame catches.
FRAME_ERRORS = (FrameError, SequenceGap, UpdateGap)
PLAIN = re.compile(r"[0-9]+(\.[0-9]+)?")  # schemas/README.md: exact decimal strings
SIGNED_PLAIN = re.compile(r"-?[0-9]+(\.[0-9]+)?")
RECEIVED_US = 1_624_493_666_638_480
WRITERS = {topic: codec.compile_writer(schemas.load(name))
           for topic, name in (("md.l2", "L2Update"), ("md.trades", "Trade"))}
READERS = {topic: codec.compile_reader(schemas.load(name))
           for topic, name in (("md.l2", "L2Update"), ("md.trades", "Trade"))}


# --------------------------------------------------------------------------- seeds


def capture_frames(shared: Path) -> list[dict]:
    """The real v2 frames of the 2021 capture, in order (each line ``<time>: <frame>``)."""
    frames = []
    for line in (shared / "gemini_v2_l2_capture_2021-06-24.txt").read_text().splitlines():
        head, sep, body = line.partition(": ")
        if sep and body.startswith("{") and "<-" not in head:
            frames.append(json.loads(body))
    return frames


def ws_frames(v2: list[dict]) -> list[dict]:
    """The same real books and trades as new-API frames (the venue's layout): per symbol a
    snapshot ``depthUpdate`` with contiguous update ids after it, and ``trade`` frames."""
    out, ids = [], Counter()
    for frame in v2:
        if frame.get("type") == "l2_updates":
            symbol = frame["symbol"]
            first = ids[symbol] + 1
            ids[symbol] += max(1, len(frame["changes"]))
            out.append({"e": "depthUpdate", "E": RECEIVED_US * 1000, "s": symbol.lower(),
                        "U": first, "u": ids[symbol],
                        "b": [[p, q] for side, p, q in frame["changes"] if side == "buy"],
                        "a": [[p, q] for side, p, q in frame["changes"] if side == "sell"]})
        elif frame.get("type") == "trade":
            out.append({"E": frame["timestamp"] * 1_000_000, "s": frame["symbol"],
                        "t": frame.get("tid", frame.get("event_id")), "p": frame["price"],
                        "q": frame["quantity"], "m": frame.get("side") == "sell"})
    return out


def v1_frames(v2: list[dict], symbol: str) -> list[dict]:
    """One symbol's real books and trades as v1 frames, numbered from socket_sequence 0."""
    out = []
    for frame in v2:
        if frame.get("symbol") != symbol:
            continue
        if frame.get("type") == "l2_updates":
            events = [{"type": "change", "side": "bid" if side == "buy" else "ask",
                       "price": p, "remaining": q, "delta": q,
                       "reason": "initial" if not out else "place"}
                      for side, p, q in frame["changes"]]
        elif frame.get("type") == "trade":
            events = [{"type": "trade", "tid": frame["event_id"], "price": frame["price"],
                       "amount": frame["quantity"],
                       "makerSide": "bid" if frame.get("side") == "sell" else "ask"}]
        else:
            continue
        out.append({"type": "update", "eventId": len(out) + 1, "socket_sequence": len(out),
                    "timestampms": frame.get("timestamp", RECEIVED_US // 1000),
                    "events": events})
    return out


@pytest.fixture
def real(shared_data) -> dict[str, list[dict]]:
    return _real(shared_data)


@lru_cache(maxsize=None)
def _real(shared: Path) -> dict[str, list[dict]]:
    v2 = capture_frames(shared)
    symbol = Counter(f["symbol"] for f in v2 if f.get("type") == "trade").most_common(1)[0][0]
    return {"v2": v2, "ws": ws_frames(v2), "v1": v1_frames(v2, symbol), "v1_symbol": [symbol]}


# --------------------------------------------------------------------------- mutations

EVIL_TEXT = ["", " ", "NaN", "nan", "Infinity", "-Infinity", "inf", "-1", "-0", "0", "0.0",
             "00", "1e5", "1E-8", "1.", ".5", "+1", "0x1F", "1_000", "1,000", "1.5\n",
             " 1", "1 ", "\n", "١٢٣", "１２３", "²", "\u0000", "9" * 400,
             "0." + "0" * 300 + "1", "1" * 5000, "BTCUSD\n", "btc-usd", "ＢＴＣＵＳＤ",
             "buy", "sell", "bid", "ask", "trade", "l2_updates", "depthUpdate", "\ud800",
             "é" * 10]
EVIL_INTS = [0, 1, -1, 2**31, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 10**30,
             -10**30]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
deep = st.integers(1, 600).map(lambda n: json.loads("[" * n + "]" * n))
# as text, deeper than json.loads can go (the recursion limit): that is the producer's input
deep_text = st.integers(1, 5000).map(lambda n: '{"type":' + "[" * n + "]" * n + "}")
evil = st.one_of(st.sampled_from(EVIL_TEXT), st.sampled_from(EVIL_INTS),
                 st.integers(-2**70, 2**70), st.floats(), st.booleans(), st.none(),
                 st.text(max_size=20), json_values, deep,
                 st.sampled_from(['[]', '{}', '[[]]', '[["buy", "1", "1"]]', '[{}]', '["1", "1"]'])
                 .map(json.loads))  # a new list or object each time: mutations change them


def _slots(value, path=()):
    """Every place inside a JSON value down to 6 levels (the frames' own structure; a
    nested value put in by a mutation is not walked), the root's path empty."""
    yield path
    if len(path) >= 6:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _slots(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _slots(item, path + (i,))


@st.composite
def mutated(draw, seed: dict):
    """``seed`` (a real frame) with one to three places replaced, deleted or added to."""
    frame = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 3))):
        slots = [p for p in _slots(frame) if p]
        if not slots:
            break
        path = draw(st.sampled_from(slots))
        parent = frame
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "wrap"]))
        last = path[-1]
        if action == "replace":
            parent[last] = draw(evil)
        elif action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent, dict):
            key = draw(st.sampled_from(["type", "e", "trades", "events", "x", "tid", "m",
                                        "side", "id", "status", "B", "lastUpdateId"]))
            parent[key] = draw(evil)
        elif action == "add":
            parent.append(draw(evil))
        else:
            parent[last] = [parent[last]]
    return frame


def text_of(frame) -> str:
    """JSON text as a socket brings it; NaN/Infinity as Python writes them (json.loads
    reads them back as floats)."""
    return json.dumps(frame, allow_nan=True)


# --------------------------------------------------------------------------- the oracle


def check_record(record) -> None:
    """A normalized record the producer can publish: its schema encodes it (a SerdeError
    in IngestSink.frame is not caught: the feed thread would end), it reads back equal,
    and its prices and quantities are exact plain decimal strings."""
    assert record.topic in WRITERS
    value = record.value
    data = WRITERS[record.topic](value, b"")  # raises on a value its schema cannot hold
    assert READERS[record.topic](data, 0) == (value, len(data))
    assert record.key == value["symbol"]
    symbol = value["symbol"]
    assert symbol.isascii() and symbol.isalnum() and symbol == symbol.upper()
    decimals = ([(c["price"], c["quantity"]) for c in value["changes"]]
                if record.topic == "md.l2" else [(value["price"], value["quantity"])])
    for price, quantity in decimals:
        for text in (price, quantity):
            assert PLAIN.fullmatch(text), text
            assert Decimal(text).is_finite() and Decimal(text) >= 0


def outcome(normalizer, text: str) -> str:
    """'records' or 'empty' or the error's class name; anything else fails the test."""
    try:
        records = normalizer.normalize_text(text, RECEIVED_US)
    except FRAME_ERRORS as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return type(exc).__name__
    for record in records:
        check_record(record)
    return "records" if records else "empty"


def feed(normalizer, frames: list) -> Counter:
    return Counter(outcome(normalizer, text_of(f) if not isinstance(f, str) else f)
                   for f in frames)


# --------------------------------------------------------------------------- the seeds are real


def test_the_real_seeds_normalize_with_exact_decimals(real):
    """Unmutated, every seed frame is a record (the mutations start from valid input) and
    every price and quantity is the very string of the frame."""
    v2 = V2Normalizer("c")
    counts = feed(v2, real["v2"])
    assert counts["records"] == sum(f.get("type") in ("l2_updates", "trade") for f in real["v2"])
    assert set(counts) <= {"records", "empty"}
    ws = WsNormalizer("c")
    for symbol in {f["s"] for f in real["ws"]}:
        ws.expect_snapshot(symbol)
    assert feed(ws, real["ws"]) == Counter(records=len(real["ws"]))
    (symbol,) = real["v1_symbol"]
    assert feed(V1Normalizer("c", symbol), real["v1"]) == Counter(records=len(real["v1"]))
    first = real["ws"][0]
    (record,) = _snapshot_of(first)
    assert [(c["price"], c["quantity"]) for c in record.value["changes"]] == \
        [tuple(level) for level in first["b"] + first["a"]]


def _snapshot_of(frame: dict):
    ws = WsNormalizer("c")
    ws.expect_snapshot(frame["s"])
    return ws.normalize(json.loads(json.dumps(frame)), RECEIVED_US)


# --------------------------------------------------------------------------- the parsers


@fuzz
@given(text=st.text(max_size=200) | deep_text)
def test_any_text_is_a_record_or_a_frame_error(text):
    for normalizer in (V2Normalizer("c"), WsNormalizer("c"), V1Normalizer("c", "BTCUSD")):
        outcome(normalizer, text)


@fuzz
@given(value=json_values)
def test_any_json_is_a_record_or_a_frame_error(value):
    for normalizer in (V2Normalizer("c"), WsNormalizer("c"), V1Normalizer("c", "BTCUSD")):
        outcome(normalizer, text_of(value))


@fuzz
@given(data=st.data())
def test_mutated_v2_frames(real, data):
    """A mutated frame between real ones: records or a FrameError, and the real frames
    after it still normalize."""
    frames = real["v2"]
    at = data.draw(st.integers(0, len(frames) - 1))
    normalizer = V2Normalizer("c")
    feed(normalizer, frames[max(0, at - 2):at])
    result = outcome(normalizer, text_of(data.draw(mutated(frames[at]))))
    assert result in ("records", "empty", "FrameError")
    after = feed(normalizer, frames[at + 1:at + 3])
    assert set(after) <= {"records", "empty"}


@fuzz
@given(data=st.data())
def test_mutated_ws_frames(real, data):
    frames = real["ws"]
    at = data.draw(st.integers(0, len(frames) - 1))
    normalizer = WsNormalizer("c")
    for symbol in {f["s"] for f in frames}:
        normalizer.expect_snapshot(symbol)
    assert set(feed(normalizer, frames[:at])) <= {"records"}
    outcome(normalizer, text_of(data.draw(mutated(frames[at]))))
    feed(normalizer, frames[at + 1:at + 3])  # a gap (UpdateGap) or stale ones: any documented


@fuzz
@given(data=st.data())
def test_mutated_v1_frames(real, data):
    frames = real["v1"]
    (symbol,) = real["v1_symbol"]
    at = data.draw(st.integers(0, len(frames) - 1))
    normalizer = V1Normalizer("c", symbol)
    assert set(feed(normalizer, frames[:at])) <= {"records"}
    outcome(normalizer, text_of(data.draw(mutated(frames[at]))))
    feed(normalizer, frames[at + 1:at + 3])


@fuzz
@given(data=st.data(), cut=st.integers(0, 10_000))
def test_truncated_real_frames_are_frame_errors(real, data, cut):
    frame = data.draw(st.sampled_from(real["v2"][:60] + real["ws"][:60]))
    text = text_of(frame)
    assume(cut < len(text))
    for normalizer in (V2Normalizer("c"), WsNormalizer("c")):
        assert outcome(normalizer, text[:cut]) == "FrameError"


# Regression tests, each named after the input that found it (before: the exception named
# escaped IngestSink.frame, whose caller catches only these three, so the feed thread died).

def test_json_nested_deeper_than_the_recursion_limit_is_a_frame_error():
    """``[[[[...]]]]`` 100,000 deep: json.loads raised RecursionError."""
    for normalizer in (V2Normalizer("c"), WsNormalizer("c"), V1Normalizer("c", "BTCUSD")):
        with pytest.raises(FrameError, match="not JSON"):
            normalizer.normalize_text("[" * 100_000, 0)


@pytest.mark.parametrize("trades, error", [(5, "trades is not a list"),
                                           ([5], "trade is not a JSON object")])
def test_v2_snapshot_with_trades_not_a_list_of_objects_is_a_frame_error(trades, error):
    """``"trades": 5`` raised TypeError, ``"trades": [5]`` AttributeError."""
    frame = {"type": "l2_updates", "symbol": "BTCUSD", "changes": [], "trades": trades}
    with pytest.raises(FrameError, match=error):
        V2Normalizer("c").normalize(frame, 0)


def test_a_side_that_is_a_json_list_is_a_frame_error():
    """``[[], "1", "1"]`` as a change (and ``"side": []``) raised TypeError: unhashable."""
    with pytest.raises(FrameError, match="unknown side"):
        V2Normalizer("c").normalize({"type": "l2_updates", "symbol": "BTCUSD",
                                     "changes": [[[], "1", "1"]]}, 0)
    with pytest.raises(FrameError, match="unknown side"):
        V1Normalizer("c", "BTCUSD").normalize({"socket_sequence": 0, "type": "update", "events": [
            {"type": "change", "side": [], "price": "1", "remaining": "1"}]}, 0)
    trade = {"type": "trade", "symbol": "BTCUSD", "tid": 1, "timestamp": 1, "price": "1",
             "quantity": "1", "side": []}
    assert V2Normalizer("c").normalize(trade, 0)[0].value["taker_side"] == "UNKNOWN"
    v1 = V1Normalizer("c", "BTCUSD").normalize({"socket_sequence": 0, "type": "update",
                                                "timestampms": 1, "events": [
        {"type": "trade", "tid": 1, "price": "1", "amount": "1", "makerSide": {}}]}, 0)
    assert v1[-1].value["taker_side"] == "UNKNOWN"


@pytest.mark.parametrize("text", ["1.5\n", "١٢٣", "１２３", "1.٥"])
def test_a_price_with_a_trailing_newline_or_other_digits_is_a_frame_error(text):
    """``"1.5\\n"`` and Arabic-Indic or full-width digits passed ``^\\d+(\\.\\d+)?$`` and were
    published as prices that are not plain ASCII decimals."""
    with pytest.raises(FrameError, match="not a non-negative decimal"):
        V2Normalizer("c").normalize({"type": "l2_updates", "symbol": "BTCUSD",
                                     "changes": [["buy", text, "1"]]}, 0)


def test_a_full_width_symbol_is_a_frame_error():
    """``"ＢＴＣＵＳＤ"`` passed ``str.isalnum`` and became a record key."""
    with pytest.raises(FrameError, match="invalid symbol"):
        V2Normalizer("c").normalize({"type": "trade", "symbol": "ＢＴＣＵＳＤ", "tid": 1,
                                     "timestamp": 1, "price": "1", "quantity": "1"}, 0)


@pytest.mark.parametrize("field, value", [("tid", 2**63), ("tid", True), ("timestamp", 2**70)])
def test_v2_trade_ids_and_times_beyond_an_avro_long_are_frame_errors(field, value):
    """``"tid": 9223372036854775808`` (or ``true``) made a record its schema cannot encode:
    the SerdeError escaped IngestSink.frame."""
    trade = {"type": "trade", "symbol": "BTCUSD", "tid": 1, "timestamp": 1, "price": "1",
             "quantity": "1", field: value}
    with pytest.raises(FrameError, match="integer tid"):
        V2Normalizer("c").normalize(trade, 0)


def test_ws_times_and_ids_beyond_an_avro_long_are_frame_errors():
    """``"E": 2**70`` on a trade made an unencodable record."""
    with pytest.raises(FrameError, match="64-bit"):
        WsNormalizer("c").normalize({"e": "trade", "s": "btcusd", "t": 1, "E": 2**70,
                                     "p": "1", "q": "1"}, 0)


@pytest.mark.parametrize("frame", [
    {"socket_sequence": True, "type": "heartbeat"},
    {"socket_sequence": 0, "type": "update", "timestampms": 2**70, "eventId": 2**64,
     "events": []}])
def test_v1_true_sequence_or_huge_times_make_no_unencodable_record(frame):
    """``"socket_sequence": true`` counted as 1 and ``"timestampms": 2**70`` was published
    as the record's time; now the first is a FrameError, the second is no time (None)."""
    normalizer = V1Normalizer("c", "BTCUSD")
    if frame["socket_sequence"] is True:
        normalizer.normalize({"socket_sequence": 0, "type": "heartbeat"}, 0)
        with pytest.raises(FrameError, match="socket_sequence"):
            normalizer.normalize(frame, 0)
    else:
        (record,) = normalizer.normalize(frame, 0)
        check_record(record)
        assert record.value["exchange_ts_ms"] is None and record.value["event_id"] is None


# --------------------------------------------------------------------------- the CSV loader

def real_csv_lines(shared: Path, count: int = 40) -> list[str]:
    with (shared / "BTCUSD_GEMINI_1h.csv").open() as f:
        return [next(f).rstrip("\n") for _ in range(count)]


def as_cryptodatadownload(lines: list[str]) -> list[str]:
    """The same real rows in the other layout: a banner, then a unix-seconds column."""
    from datetime import datetime, timezone
    out = ["https://www.CryptoDataDownload.com",
           "Unix Timestamp,Date,Symbol,Open,High,Low,Close,Volume BTC,Volume USD"]
    for line in lines[1:]:
        date, symbol, o, h, low, c, v = line.split(",")
        unix = int(datetime.fromisoformat(date).replace(tzinfo=timezone.utc).timestamp())
        out.append(f"{unix},{date},{symbol},{o},{h},{low},{c},{v},0")
    return out


CSV_EVIL = EVIL_TEXT + ["2019-07-08 00:00:00", "2019-07-08T00:00:00+14:00",
                        "0001-01-01 00:00:00+14:00", "9999-12-31 23:59:59-14:00",
                        "2019-02-30 00:00:00", "1562544000", "1562544000000",
                        "99999999999999", "1e999999999", "1e-999999999", "8e-05", "-8e-05",
                        ".5e3", '"', '""', "a,b", "\r", "\ufeff", "BTC/USD", "btc-usd"]


csv_cells = st.one_of(
    st.sampled_from(CSV_EVIL), st.text(max_size=12),
    st.text(st.characters(whitelist_categories=("Nd", "No")), min_size=1, max_size=12),
    st.integers(-10**10, 10**10).map(lambda e: f"1e{e}"),
    st.integers(0, 10**16).map(str), st.decimals(allow_nan=True).map(str))


@st.composite
def mutated_csv(draw, lines: list[str]) -> str:
    lines = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        cells = lines[i].split(",")
        action = draw(st.sampled_from(["cell", "cell", "cell", "digits", "exponent",
                                       "drop_cell", "add_cell", "drop_line", "dup_line",
                                       "swap", "raw"]))
        if action in ("digits", "exponent"):
            # the same number written in another script's digits, or as a huge exponent
            at = draw(st.integers(0, len(cells) - 1))
            zero = draw(st.sampled_from(["\u0660", "\uff10", "\u0966", "\u2070"]))
            exponent = draw(st.sampled_from(["0", "-1", "39", "999999999", "-999999999"]))
            cells[at] = (cells[at].translate({ord(str(d)): chr(ord(zero) + d) for d in range(10)})
                         if action == "digits" else f"{cells[at]}e{exponent}")
            lines[i] = ",".join(cells)
        elif action == "cell":
            cells[draw(st.integers(0, len(cells) - 1))] = draw(csv_cells)
            lines[i] = ",".join(cells)
        elif action == "drop_cell" and len(cells) > 1:
            del cells[draw(st.integers(0, len(cells) - 1))]
            lines[i] = ",".join(cells)
        elif action == "add_cell":
            lines[i] = ",".join(cells + [draw(csv_cells)])
        elif action == "drop_line" and len(lines) > 1:
            del lines[i]
        elif action == "dup_line":
            lines.insert(i, lines[i])
        elif action == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = draw(st.text(max_size=40))
    text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))
    cut = draw(st.integers(0, len(text))) if draw(st.integers(0, 9)) == 0 else None
    return text if cut is None else text[:cut]


BAR_WRITER = codec.compile_writer(schemas.load("Bar"))


def parse_outcome(path: Path, data: bytes, interval: str | None = None) -> str:
    """'bars' (every bar publishable, every rejected row named by a line of the file) or
    'error' (a PipelineError saying what is wrong); anything else fails the test."""
    path.write_bytes(data)
    try:
        parsed = parse_ohlcv_csv(path, interval=interval)
    except PipelineError as exc:
        assert str(exc)
        return "error"
    lines = max(1, data.count(b"\n") + data.count(b"\r") + 1)
    for problem in parsed.problems:
        assert 1 <= problem.line <= lines and problem.reason
    for bar in parsed.bars:
        BAR_WRITER(bar, b"")
        prices = [Decimal(bar[k]) for k in ("open", "high", "low", "close")]
        for k in ("open", "high", "low", "close", "volume"):
            assert SIGNED_PLAIN.fullmatch(bar[k]), bar[k]
            assert len(bar[k]) <= 2 * len(data) + 64, f"{k} of {len(bar[k])} characters"
        assert min(prices) > 0 and Decimal(bar["volume"]) >= 0
        assert Decimal(bar["low"]) <= min(prices) and max(prices) <= Decimal(bar["high"])
    return "bars"


@fuzz
@given(data=st.data())
def test_mutated_csv_files_give_bars_or_errors_naming_lines(shared_data, tmp_path_factory,
                                                            data):
    lines = real_csv_lines(shared_data)
    lines = data.draw(st.sampled_from([lines, as_cryptodatadownload(lines)]))
    text = data.draw(mutated_csv(lines))
    encoding = data.draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]))
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    path = tmp_path_factory.mktemp("csv") / "bars.csv"
    parse_outcome(path, raw, data.draw(st.sampled_from([None, "1h"])))


@fuzz
@given(raw=st.binary(max_size=300))
def test_any_bytes_as_a_csv_file_give_bars_or_an_error(tmp_path_factory, raw):
    parse_outcome(tmp_path_factory.mktemp("csv") / "bytes.csv", raw)


SEED_HEAD = "Date,Symbol,Open,High,Low,Close,Volume"
SEED_ROWS = ["2019-07-08 01:00:00,BTCUSD,11480,11500,11400,11450,{v}",
             "2019-07-08 00:00:00,BTCUSD,11470,11490,11400,11480,1.5"]


@pytest.mark.parametrize("volume", ["1e999999999", "1e-999999999"])
def test_a_volume_with_an_exponent_of_a_billion_is_a_row_problem(tmp_path, volume):
    """``1e999999999`` was written out as a plain decimal of a billion digits: a hang of
    minutes and gigabytes of memory. Now the row is rejected, its line named."""
    path = tmp_path / "bars.csv"
    path.write_text("\n".join([SEED_HEAD, SEED_ROWS[0].format(v=volume), *SEED_ROWS[1:]]))
    parsed = parse_ohlcv_csv(path, interval="1h")
    assert [(p.line, "out of range" in p.reason) for p in parsed.problems] == [(2, True)]
    assert len(parsed.bars) == 1


@pytest.mark.parametrize("unix", ["²", "1" * 5000, "١٥٦٢٥٤٤٠٠٠"])
def test_a_unix_time_of_superscript_or_5000_digits_is_a_row_problem(tmp_path, unix):
    """``²`` passed ``str.isdigit`` and ``int()`` raised ValueError; so did 5000 digits
    (Python's int limit): the loader ended with a ValueError's stack trace."""
    path = tmp_path / "bars.csv"
    path.write_text("\n".join(as_cryptodatadownload([SEED_HEAD, SEED_ROWS[0].format(v="1"),
                                                     *SEED_ROWS[1:]]))
                    .replace("1562547600", unix, 1))
    parsed = parse_ohlcv_csv(path, interval="1h")
    assert [p.line for p in parsed.problems] == [3] and len(parsed.bars) == 1


@pytest.mark.parametrize("price", ["١١٤٨٠", "１１４８０"])
def test_a_price_of_other_scripts_digits_is_a_row_problem(tmp_path, price):
    """Arabic-Indic digits passed ``^-?\\d+`` and were published as the bar's open."""
    path = tmp_path / "bars.csv"
    path.write_text("\n".join([SEED_HEAD, SEED_ROWS[0].format(v="1").replace("11480", price, 1),
                               *SEED_ROWS[1:]]))
    parsed = parse_ohlcv_csv(path, interval="1h")
    assert [p.line for p in parsed.problems] == [2] and len(parsed.bars) == 1


# --------------------------------------------------------------------------- order requests

KEY = b"fuzz-signing-key-0123456789abcdef"
KEYS = StrategyKeys({"sma": KEY})
LIMITS = RiskLimits(max_notional=None, max_position=None, max_orders_per_minute=None,
                    price_band_bps=Decimal(500))
NOW_MS = 1_624_493_666_000
REQUEST_WRITER = codec.compile_writer(schemas.load("OrderRequest"))
REQUEST_READER = codec.compile_reader(schemas.load("OrderRequest"))
EVENT_WRITER = codec.compile_writer(schemas.load("OrderEvent"))


@pytest.fixture
def book(real) -> BookTop:
    """A real book: the 2021 capture's first BTCGBP snapshot, top 10 levels a side."""
    frames = real["v2"]
    snap = next(f for f in frames if f.get("type") == "l2_updates" and f["symbol"] == "BTCGBP")
    bids = sorted(((p, q) for s, p, q in snap["changes"] if s == "buy"),
                  key=lambda lv: -Decimal(lv[0]))[:10]
    asks = sorted(((p, q) for s, p, q in snap["changes"] if s == "sell"),
                  key=lambda lv: Decimal(lv[0]))[:10]
    return BookTop.from_snapshot({"symbol": "BTCGBP", "published_ts_us": NOW_MS * 1000,
                                  "bids": [{"price": p, "quantity": q} for p, q in bids],
                                  "asks": [{"price": p, "quantity": q} for p, q in asks]})


def signed_request(book: BookTop, **fields) -> dict:
    trigger = fields.pop("trigger", "md.l2/0/1200")
    request = {"client_order_id": client_order_id("sma", trigger), "strategy_id": "sma",
               "symbol": "BTCGBP", "side": "BUY", "order_type": "LIMIT",
               "price": str(book.bids[0][0]), "amount": "0.01", "options": [],
               "created_ms": NOW_MS, "expires_ms": NOW_MS + 60_000, "trigger": trigger,
               "action": "NEW", "target_client_order_id": None, **fields}
    request["signature"] = sign(request, KEY)
    return request


def verdict_of(request: dict, book: BookTop) -> Verdict:
    """What the execution group does with a request (consumers/execution._on_request up
    to the client): a verdict, and for a rejection the REJECTED/CANCEL_REJECTED event it
    publishes, which must encode."""
    verdict = decide(request, keys=KEYS, seen={}, killed=False, now_ms=NOW_MS, limits=LIMITS,
                     state=RiskState(), book=book)
    assert isinstance(verdict, Verdict)
    if verdict.action == REJECT:
        assert verdict.reason
        EVENT_WRITER(request_event(request, OrderEventKind.REJECTED, NOW_MS, "PAPER",
                                   reason=verdict.reason,
                                   price=plain(verdict.price) if verdict.price is not None
                                   else None), b"")
    elif verdict.action == CANCEL_REJECT:
        assert verdict.reason
        EVENT_WRITER(cancel_rejected(request, verdict.reason, NOW_MS, "PAPER"), b"")
    return verdict


def field_values(name: str):
    """Values of the field's schema type (what Avro decoding can hand execution: valid
    UTF-8, so no lone surrogate)."""
    text = st.sampled_from([t for t in EVIL_TEXT if t != "\ud800"]
                           + ["9e999999", "-9e999999", "1e-999999", "sNaN"]) | \
        st.text(max_size=40)
    return {
        "side": st.sampled_from(["BUY", "SELL"]),
        "order_type": st.sampled_from(["LIMIT", "MARKET"]),
        "action": st.sampled_from(["NEW", "CANCEL", "CANCEL_ALL", "REPLACE"]),
        "price": st.none() | text, "target_client_order_id": st.none() | text,
        "options": st.lists(st.sampled_from(["maker-or-cancel", "immediate-or-cancel",
                                             "fill-or-kill"]) | text, max_size=3),
        "created_ms": st.integers(-2**63, 2**63 - 1), "expires_ms": st.integers(-2**63, 2**63 - 1),
    }.get(name, text)


REQUEST_FIELDS = [f["name"] for f in schemas.load("OrderRequest")["fields"]]


@fuzz
@given(data=st.data())
def test_a_mutated_signed_request_is_rejected_with_a_reason(book, data):
    """Any field of a signed request changed (to a value its schema type allows, the
    signature included): REJECTED bad_signature, or unknown_strategy for another
    strategy id; never an exception."""
    request = signed_request(book)
    assert verdict_of(request, book).action == "NEW"  # the seed is accepted
    changed = dict(request)
    for name in data.draw(st.lists(st.sampled_from(REQUEST_FIELDS), min_size=1, max_size=3,
                                   unique=True)):
        changed[name] = data.draw(field_values(name))
    assume(canonical(changed) != canonical(request) or changed["signature"] != request["signature"])
    verdict = verdict_of(changed, book)
    expected = "unknown_strategy" if KEYS.key(changed["strategy_id"]) is None else "bad_signature"
    assert (verdict.action, verdict.reason) == (REJECT, expected)


@fuzz
@given(data=st.data())
def test_a_signed_request_of_any_field_values_gets_a_verdict(book, data):
    """A strategy that signs nonsense (its own bug; the signature is right): execution
    still decides it, and a rejection names a reason."""
    fields = {name: data.draw(field_values(name)) for name in data.draw(
        st.lists(st.sampled_from([n for n in REQUEST_FIELDS
                                  if n not in ("signature", "strategy_id")]),
                 min_size=1, max_size=4, unique=True))}
    verdict_of(signed_request(book, **fields), book)


@fuzz
@given(data=st.data())
def test_mutated_request_bytes_are_a_decode_error_or_rejected(book, data):
    """The Avro bytes of a signed request with bytes flipped, cut or inserted: the
    decoder's ValueError (serde's SerdeError: the DLQ) or, if it still decodes, rejected
    (or the very request, when the mutation did not change a value)."""
    request = signed_request(book)
    raw = bytearray(REQUEST_WRITER(request, b""))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at:]
            if not raw:
                break
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=10))
    try:
        value, end = REQUEST_READER(bytes(raw), 0)
    except ValueError:
        return  # SerdeError: dead-lettered
    verdict = verdict_of(value, book)
    if canonical(value) == canonical(request) and value["signature"] == request["signature"]:
        return
    assert (verdict.action, verdict.reason) in ((REJECT, "bad_signature"),
                                                (REJECT, "unknown_strategy"))


def test_a_signature_with_non_ascii_text_is_a_bad_signature(book):
    """``"signature": "é"``: hmac.compare_digest raised TypeError (it compares only ASCII
    str), so a forged request crashed verification instead of being rejected."""
    request = dict(signed_request(book), signature="é" * 64)
    assert verify(request, KEY) is False
    assert (verdict_of(request, book).action, verdict_of(request, book).reason) == \
        (REJECT, "bad_signature")


@pytest.mark.parametrize("field, text", [("price", "abc"), ("price", "NaN"), ("amount", "abc")])
def test_a_forged_request_with_a_price_that_is_not_a_number_is_rejected(book, field, text):
    """``"price": "abc"`` with a bad signature: building its REJECTED event raised
    decimal.InvalidOperation (``Decimal("abc")``), so no rejection was published."""
    request = dict(signed_request(book), **{field: text})
    verdict = verdict_of(request, book)
    assert (verdict.action, verdict.reason) == (REJECT, "bad_signature")
    event = request_event(request, OrderEventKind.REJECTED, NOW_MS, "PAPER", reason=verdict.reason)
    assert event[field] == text  # the request's own text, as published before


@pytest.mark.parametrize("fields", [{"price": "9e999999"}, {"amount": "9e999999"},
                                    {"price": "9e999999", "amount": "9e999999"}])
def test_a_signed_request_of_an_overflowing_price_or_amount_is_rejected(book, fields):
    """A signed LIMIT at ``9e999999`` (or of that amount, at the best bid): the band check's
    or the notional's Decimal arithmetic raised decimal.Overflow out of decide."""
    verdict = verdict_of(signed_request(book, **fields), book)
    assert (verdict.action, verdict.reason) == (REJECT, "invalid_request")
