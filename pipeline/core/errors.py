"""The pipeline's exceptions: one tree, rooted at :class:`PipelineError`.

A ``PipelineError`` is a failure the user can act on; the ``pipeline`` command turns any
of them into one error line (no traceback) and exit status 1. Catch ``PipelineError`` for
"anything the pipeline refused or could not do"; catch a subclass to handle one cause.

Every class of the tree is defined here (nothing to import but this module) and
re-exported by the module that raises it, where it has always been importable from::

    PipelineError                anything the user can act on
    ├── ConfigError              settings, the topology file: ops/settings.py, ops/topology.py
    ├── DeliveryFailed           a produced record the brokers did not acknowledge:
    │                              kafka/clients.py (every producer's flush)
    ├── SerdeError               bytes that are not a record in the Confluent wire format:
    │                              avro/serde.py (a consumer dead-letters them)
    ├── RegistryError            the schema registry refused or could not be reached:
    │   │                          avro/registry.py
    │   ├── IncompatibleSchema     a schema the subject's compatibility level refuses
    │   └── UnknownSchemaId        a record names a schema id the registry lacks
    ├── StrategyFailed           a strategy callback raised or returned something that is
    │                              not an intent; the one strategy error of backtests
    │                              (backtest/engine.py) and of the live strategy group
    │                              (consumers/strategy.py, which dead-letters the input)
    ├── GeminiError              a Gemini private API call without a usable answer:
    │   │                          gemini/rest.py, gemini/execution.py
    │   ├── GeminiApiError         Gemini answered result=error
    │   │   └── GeminiRateLimited  over the key's rate; nothing was executed
    │   └── GeminiInDoubt          maybe executed: ask for the order's status, never resend
    ├── WsError                  a Gemini WebSocket API request without an answer:
    │   │                          gemini/ws_session.py
    │   ├── WsDisconnected         the connection ended first (in doubt)
    │   └── WsTimeout              no answer in time (in doubt)
    ├── RulesUnavailable         no symbol rules from Gemini and no cache: gemini/symbols.py
    ├── BadFill                  a fill the portfolio refuses: trading/portfolio.py
    └── ArchiveError             the archive cannot be read or written: sinks/archive.py

Everything else raised with a message for the user is a plain ``PipelineError`` (replay
ranges, the local broker and registry, the CLI's own checks).

Outside the tree on purpose: ``ValueError`` subclasses for malformed input that the caller
dead-letters or reports (``market.orderbook.BookError``, ``gemini.marketdata.FrameError``,
``trading.orders.OrderStateError``, ``trading.requests.IntentError``), the feed's control
flow (``SequenceGap``, ``UpdateGap``, ``producers.gemini_ws.Disconnected``),
``trading.execution.ExecutionHalted`` (a ``BaseException``: nothing may swallow it), and the
local venue's own errors (``pipeline/venue``), which it turns into Gemini's answers.
"""


class PipelineError(Exception):
    """A failure the user can act on; its message says what happened and what to do."""


class ConfigError(PipelineError):
    """Settings, a topology file or an option that cannot be used as given; the message
    names the file, the key and (where known) the line."""


class DeliveryFailed(PipelineError):
    """At least one produced record was not acknowledged by the brokers."""


class SerdeError(PipelineError):
    """Bytes that are not a valid record in the Confluent wire format."""


class RegistryError(PipelineError):
    """The registry refused a request or could not be reached."""


class IncompatibleSchema(RegistryError):
    """The registry refused a schema under the subject's compatibility level."""


class UnknownSchemaId(RegistryError):
    """A record names a schema id the registry does not have."""


class StrategyFailed(PipelineError):
    """A strategy callback raised (or returned something that is not an intent): names the
    strategy, the callback and the input record. Raised by the backtest engine and by the
    live strategy group alike."""


class GeminiError(PipelineError):
    """A private API call did not give an answer we can use."""

    nonce: int | None = None  # the request's nonce, when one was sent


class GeminiApiError(GeminiError):
    """Gemini answered ``{"result": "error", "reason": ..., "message": ...}``."""

    def __init__(self, reason: str, message: str, http_status: int) -> None:
        super().__init__(f"Gemini refused the request: {reason} ({http_status}): {message}")
        self.reason = reason
        self.message = message
        self.http_status = http_status


class GeminiRateLimited(GeminiApiError):
    """429 / ``RateLimit``: over the key's rate; nothing was executed, retry later."""


class GeminiInDoubt(GeminiError):
    """The request may or may not have been executed (timeout, lost connection, 5xx,
    an answer that is not JSON). Never resend an order after this; ask for its status by
    ``client_order_id`` instead."""


class WsError(PipelineError):
    """A request that got no usable answer."""


class WsDisconnected(WsError):
    """The connection ended before the answer: the request is in doubt."""


class WsTimeout(WsError):
    """No answer in time: the request is in doubt."""


class RulesUnavailable(PipelineError):
    """Gemini could not be asked and there is no cache to fall back on."""


class BadFill(PipelineError):
    """A fill the portfolio refuses (it goes to the dead-letter topic, nothing changes)."""


class ArchiveError(PipelineError):
    """The archive cannot be read or written as asked (a damaged file, a bad record)."""
