"""Gemini's public (unsigned) REST endpoints, client side: the trade history and candles,
within Gemini's public rate.

Gemini allows 120 public requests a minute and recommends at most one a second
(docs.gemini.com/rate-limit); beyond the rate it queues five, then answers 429. The client
spends from a :class:`~pipeline.gemini.ratelimit.TokenBucket` (by default one a second,
bursts of five) and, should a 429 come anyway (another process on the same address),
waits with capped exponential backoff and asks again: a refused request did nothing.
"""

from __future__ import annotations

import json
import logging
import time
from decimal import Decimal
from typing import Any, Callable

import requests

from pipeline.core.errors import GeminiApiError, GeminiError, GeminiRateLimited
from pipeline.gemini.ratelimit import TokenBucket

log = logging.getLogger(__name__)

PUBLIC_RATE_PER_S, PUBLIC_BURST = 1.0, 5


class PublicClient:
    """``GET`` of Gemini's public endpoints at ``base_url`` (Gemini, or the local venue)."""

    def __init__(self, base_url: str, rate_per_s: float = PUBLIC_RATE_PER_S,
                 burst: int = PUBLIC_BURST, timeout_s: float = 10.0, max_retries: int = 8,
                 backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.bucket = TokenBucket(rate_per_s, burst, sleep=sleep)
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.backoff_max_s, self.sleep = backoff_s, backoff_max_s, sleep
        self.session = requests.Session()
        self.requests = 0
        self.rate_limited = 0  # 429s answered (and waited out)

    def trades(self, symbol: str, params: dict[str, int]) -> Any:
        """``GET /v1/trades/{symbol}``: the page as Gemini sent it (newest first)."""
        return self.get(f"/v1/trades/{symbol}", params)

    def candles(self, symbol: str, time_frame: str) -> Any:
        """``GET /v2/candles/{symbol}/{time_frame}``, numbers read as exact Decimals."""
        return self.get(f"/v2/candles/{symbol}/{time_frame}", {})

    def get(self, path: str, params: dict[str, int]) -> Any:
        """The JSON answer (floats as Decimal); raises GeminiApiError for a refusal,
        GeminiRateLimited once the retries are spent, GeminiError for no usable answer."""
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            self.bucket.take()
            self.requests += 1
            try:
                response = self.session.get(self.base_url + path, params=params,
                                            timeout=self.timeout_s)
            except requests.RequestException as exc:
                raise GeminiError(f"GET {self.base_url}{path}: {exc}") from None
            if response.status_code != 429:
                return _answer(path, response)
            self.rate_limited += 1
            if attempt == self.max_retries:
                break
            log.warning("GET %s: 429 rate limited, waiting %.1f s", path, delay)
            self.sleep(delay)
            delay = min(self.backoff_max_s, delay * 2)
        raise GeminiRateLimited("RateLimit", f"still rate limited after {self.max_retries} "
                                "retries", 429)

    def close(self) -> None:
        self.session.close()


def _answer(path: str, response: requests.Response) -> Any:
    try:
        body = json.loads(response.text, parse_float=Decimal)
    except ValueError:
        raise GeminiError(f"GET {path}: HTTP {response.status_code}, not JSON: "
                          f"{response.text[:200]!r}") from None
    if response.status_code == 200:
        return body
    if isinstance(body, dict) and body.get("result") == "error":
        raise GeminiApiError(str(body.get("reason")), str(body.get("message")),
                             response.status_code)
    raise GeminiError(f"GET {path}: HTTP {response.status_code}: {response.text[:200]!r}")
