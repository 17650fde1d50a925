"""What one backtest is: :class:`BacktestConfig`, the one value :func:`run_backtest`,
:func:`sweep`, ``pipeline backtest`` and the bench pass around instead of two dozen
parameters. Where Kafka is (a :class:`~pipeline.core.cluster.Cluster`) is not in it: the
same config runs against any cluster, or against the archive with none.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pipeline.backtest.engine import BOOK_FILLS, FILL_MODELS, NEXT_OPEN, make_broker
from pipeline.core.errors import PipelineError
from pipeline.gemini.symbols import read_rules_file
from pipeline.kafka.catalog import Namespace
from pipeline.replay.ranges import Offsets, TimeLike, to_ms
from pipeline.trading.fees import GEMINI_API_FEES, FeeSchedule

if TYPE_CHECKING:
    from pipeline.trading.strategy import Strategy

SOURCES = ("kafka", "archive")


def _decimal(value: Any, what: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise PipelineError(f"{what} {value!r} is not a decimal number") from None
    if not result.is_finite():
        raise PipelineError(f"{what} {value!r} is not a finite number")
    return result


@dataclass(frozen=True)
class BacktestConfig:
    """One backtest's settings: who trades, what is read, how the market is simulated.

    Who trades: ``strategy`` (``"module:Class"``, built with ``params``; or a
    :class:`~pipeline.Strategy` instance, then without ``params``).

    What is read: ``topics`` of ``namespace`` (catalog names like ``bars`` or full names;
    default: what the strategy needs, see :func:`pipeline.backtest.run.default_topics`) over
    ``[start, end)`` (Kafka record timestamps: epoch ms, ISO text or a datetime; None: open)
    and/or ``offsets`` (``{(full topic, partition): (first, end)}``, end exclusive;
    partitions not named are read whole). ``source="kafka"`` reads the topics (the run is
    given a :class:`~pipeline.core.cluster.Cluster`); ``"archive"`` the same records from the
    Parquet archive (:mod:`pipeline.replay.archive`; ``archive_root`` default
    ``<run dir>/parquet/<ns>/archive``), with no cluster.

    The simulated market: ``fill`` (``"next-open"``, backtesting.py's rules, or ``"book"``,
    the simulated exchange over the L2 book), starting ``cash``. ``commission`` is the
    next-open model's rate, charged on entry and exit (default 0.002); book fills pay
    ``maker_fee``/``taker_fee`` (default Gemini's API schedule, or ``commission`` for both
    when only that is given). ``slippage`` (next-open: backtesting.py's spread) and ``lot``
    (fraction sizing rounds down to whole lots) are decimals; ``interval`` the bar interval
    traded when the topic holds several; ``finalize_trades`` closes open trades at the end
    (backtesting.py's). Book fills only: ``queue`` ("risk-averse" or "none"),
    ``latency_ms`` (orders and cancels reach the simulated exchange this long after their
    trigger), ``book_depth`` (levels in the snapshots given to ``on_book``), ``sample_ms``
    (equity points), ``rules_file`` (Gemini's symbol rules the simulated exchange refuses
    orders by, as paper execution does: a rules cache of :mod:`pipeline.gemini.symbols` or
    recorded ``/v1/symbols/details`` responses). Without it there are no symbol rules (ids
    and options are still checked): a backtest is not quietly checked against whatever
    table happens to be cached today, so the same inputs give the same result.

    Decimals may be given as text, ints or Decimals and are kept as exact text; the
    namespace as text or a :class:`~pipeline.Namespace`. Bad values (an unknown fill model
    or source, a number that is not one, a time that is not one) are a
    :class:`~pipeline.PipelineError` when the config is made. :meth:`replace` gives a copy
    with some settings changed.
    """

    strategy: str | Strategy
    namespace: Namespace | str
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    start: TimeLike = None
    end: TimeLike = None
    _: KW_ONLY
    # what is read
    topics: Sequence[str] | None = None
    offsets: Offsets | None = field(default=None, hash=False)
    source: str = "kafka"
    archive_root: str | Path | None = None
    # the simulated market
    fill: str = NEXT_OPEN
    cash: str = "1000000"
    commission: str | None = None
    slippage: str = "0"
    lot: str = "1"
    interval: str | None = None
    finalize_trades: bool = True
    book_depth: int = 10
    sample_ms: int = 1000
    maker_fee: str | None = None
    taker_fee: str | None = None
    queue: str = "risk-averse"
    latency_ms: int = 0
    rules_file: str | Path | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.namespace, str):
            put("namespace", Namespace(self.namespace))
        put("params", dict(self.params or {}))
        if self.topics is not None:
            put("topics", tuple(self.topics) or None)
        if self.offsets is not None:
            put("offsets", dict(self.offsets) or None)
        if self.archive_root is not None:
            put("archive_root", Path(self.archive_root))
        if self.rules_file is not None:
            put("rules_file", str(self.rules_file))
        to_ms(self.start, "start"), to_ms(self.end, "end")  # a bad time fails here
        if self.source not in SOURCES:
            raise PipelineError(f"source {self.source!r}: use kafka or archive")
        if self.fill not in FILL_MODELS:
            raise PipelineError(f"unknown fill model {self.fill!r}: one of "
                                f"{', '.join(FILL_MODELS)}")
        for name in ("cash", "commission", "slippage", "lot", "maker_fee", "taker_fee"):
            value = getattr(self, name)
            if value is not None:
                put(name, str(_decimal(value, name.replace("_", " "))))

    # -- derived

    @property
    def ns(self) -> Namespace:
        """``namespace`` as a :class:`~pipeline.Namespace` (it always is one once made)."""
        assert isinstance(self.namespace, Namespace)
        return self.namespace

    @property
    def start_ms(self) -> int | None:
        return to_ms(self.start, "start")

    @property
    def end_ms(self) -> int | None:
        return to_ms(self.end, "end")

    @property
    def strategy_name(self) -> str:
        """``module:Class`` of the strategy (as given, or of the instance)."""
        if isinstance(self.strategy, str):
            return self.strategy
        return f"{type(self.strategy).__module__}:{type(self.strategy).__qualname__}"

    def replace(self, **changes: Any) -> BacktestConfig:
        """A copy with ``changes``; an unknown name is a PipelineError."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise PipelineError(f"unknown backtest setting(s) {', '.join(unknown)}")
        return replace(self, **changes)

    def broker(self, strategy_id: str):
        """A fresh simulated broker with these settings."""
        fees = None
        if self.fill == BOOK_FILLS and (self.maker_fee is not None or self.taker_fee is not None):
            try:
                fees = FeeSchedule(
                    maker=Decimal(self.maker_fee if self.maker_fee is not None else
                                  self.commission if self.commission is not None else
                                  GEMINI_API_FEES.maker),
                    taker=Decimal(self.taker_fee if self.taker_fee is not None else
                                  self.commission if self.commission is not None else
                                  GEMINI_API_FEES.taker))
            except ValueError as exc:
                raise PipelineError(str(exc)) from None
        commission = self.commission if self.commission is not None else \
            ("0.002" if self.fill == NEXT_OPEN else None)
        options: dict[str, Any] = dict(lot=Decimal(self.lot), slippage=Decimal(self.slippage),
                                       interval=self.interval,
                                       finalize_trades=self.finalize_trades,
                                       sample_ms=self.sample_ms)
        if self.fill == BOOK_FILLS:
            options.update(fees=fees, queue=self.queue, latency_ms=self.latency_ms,
                           rules=read_rules_file(self.rules_file) if self.rules_file else None)
        return make_broker(self.fill, Decimal(self.cash),
                           None if commission is None else Decimal(commission), strategy_id,
                           **options)
