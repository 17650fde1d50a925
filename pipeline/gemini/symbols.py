"""Gemini's symbol rules, loaded: ``GET /v1/symbols`` and ``/v1/symbols/details/:symbol``
(public, unsigned), cached per day in the run directory, as pure
:class:`~pipeline.core.rules.SymbolRules` values that :mod:`pipeline.trading.rules`
checks orders with.

:func:`load_rules` fetches once a day: a cache written today for the same URL (and
covering the symbols asked for) is used as it is; otherwise the rules are fetched and the
cache rewritten. When Gemini cannot be reached, the newest cache for that URL is used
with a warning (rules change rarely; a day-old table beats not trading), and with no
cache at all it is an error: orders are never checked against rules that were guessed.

The cache is ``<run_dir>/gemini/symbols-<host>-<YYYY-MM-DD>.json`` (the host, because the
sandbox, live Gemini and the local venue have different tables): ``{"url", "date",
"fetched_ms", "symbols": [details, ...]}``, numbers as exact decimal strings.

:func:`read_rules_file` reads either such a cache or recorded responses, one a line
(``<url> -> <unix time>: <json>``, the format of ``gemini_rest_symbols_2021-06-24.txt``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit

import requests

from pipeline.core.errors import PipelineError, RulesUnavailable
from pipeline.core.rules import SymbolRules

log = logging.getLogger(__name__)
CACHE_DIR = "gemini"
DEFAULT_TIMEOUT_S = 5.0
RulesTable = dict[str, SymbolRules]


def parse_details(text: str) -> SymbolRules:
    """One ``/v1/symbols/details/:symbol`` response body (JSON numbers kept exact)."""
    return SymbolRules.from_details(json.loads(text, parse_float=Decimal))


def parse_recorded(text: str) -> RulesTable:
    """Recorded responses, one a line: ``<url> -> <unix time>: <body>``; the details
    lines make the table (the ``/v1/symbols`` line only lists names)."""
    table: RulesTable = {}
    for number, line in enumerate(text.splitlines(), 1):
        url, arrow, rest = line.partition(" -> ")
        if not arrow or "/v1/symbols/details/" not in url:
            continue
        _, colon, body = rest.partition(": ")
        if not colon:
            raise ValueError(f"line {number}: no ': ' after the time")
        rule = parse_details(body)
        table[rule.symbol] = rule
    return table


def read_rules_file(path: str | Path) -> RulesTable:
    """A rules table from a cache file of :func:`load_rules` or recorded responses."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineError(f"symbol rules file {path} cannot be read: {exc.strerror}") from None
    try:
        if text.lstrip().startswith("{"):
            return _from_cache(json.loads(text, parse_float=Decimal))
        table = parse_recorded(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"symbol rules file {path} is not readable: {exc}") from None
    if not table:
        raise PipelineError(f"symbol rules file {path} holds no symbol details")
    return table


def fetch_rules(base_url: str, symbols: Iterable[str] | None = None, *,
                timeout_s: float = DEFAULT_TIMEOUT_S,
                session: requests.Session | None = None) -> RulesTable:
    """Ask Gemini (or the venue) now: the symbols it lists, then the details of those
    wanted (all listed when ``symbols`` is None). A wanted symbol Gemini does not list
    is left out: orders for it are then refused ``InvalidSymbol``."""
    http = session or requests.Session()
    try:
        base = base_url.rstrip("/")
        listed = _get(http, f"{base}/v1/symbols", timeout_s)
        if not isinstance(listed, list) or not listed:
            raise ValueError(f"{base}/v1/symbols answered {listed!r}, not a list of symbols")
        names = [str(name).lower() for name in listed]
        asked = names if symbols is None else [s.lower() for s in symbols]
        missing = sorted(name.upper() for name in asked if name not in names)
        if missing:
            log.warning("%s does not list %s: orders for them will be refused InvalidSymbol",
                        base, ", ".join(missing))
        table: RulesTable = {}
        for name in (name for name in asked if name in names):
            rule = SymbolRules.from_details(_get(http, f"{base}/v1/symbols/details/{name}",
                                                 timeout_s))
            table[rule.symbol] = rule
        return table
    finally:
        if session is None:
            http.close()


def load_rules(base_url: str, run_dir: str | Path, symbols: Iterable[str] | None = None, *,
               today: dt.date | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               session: requests.Session | None = None) -> RulesTable:
    """The rules for ``symbols`` (all Gemini lists when None): today's cache, else
    fetched (and cached), else the newest cache with a warning, else
    :class:`RulesUnavailable` (see the module doc)."""
    wanted = None if symbols is None else sorted({s.upper() for s in symbols})
    today = today or dt.datetime.now(dt.timezone.utc).date()
    folder = Path(run_dir) / CACHE_DIR
    slug = _slug(base_url)
    cached = folder / f"symbols-{slug}-{today.isoformat()}.json"
    if cached.exists():
        try:
            data = json.loads(cached.read_text(), parse_float=Decimal)
            table = _from_cache(data)
            if data.get("url") == base_url and _covers(data, table, wanted):
                return table
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("symbol rules cache %s is unreadable (%s): fetching again", cached, exc)
    try:
        table = fetch_rules(base_url, wanted, timeout_s=timeout_s, session=session)
    except (requests.RequestException, ValueError) as exc:
        return _fallback(folder, slug, base_url, exc)
    _write_cache(cached, base_url, today, wanted, table)
    return table


def _get(http: requests.Session, url: str, timeout_s: float) -> Any:
    response = http.get(url, timeout=timeout_s)
    if response.status_code != 200:
        raise ValueError(f"GET {url}: HTTP {response.status_code} {response.text[:200]}")
    return json.loads(response.text, parse_float=Decimal)


def _slug(base_url: str) -> str:
    parts = urlsplit(base_url)
    return re.sub(r"[^A-Za-z0-9.]+", "_", parts.netloc or base_url).strip("_")


def _covers(data: dict, table: RulesTable, wanted: list[str] | None) -> bool:
    """Whether a cache answers this question: it asked for everything, or for at least
    these symbols (a symbol it asked for and Gemini did not list stays unlisted)."""
    asked = data.get("asked")
    if asked is None:
        return True
    return wanted is not None and set(wanted) <= set(asked)


def _from_cache(data: dict) -> RulesTable:
    rules = (SymbolRules.from_details(item) for item in data["symbols"])
    return {rule.symbol: rule for rule in rules}


def _write_cache(path: Path, base_url: str, today: dt.date, wanted: list[str] | None,
                 table: RulesTable) -> None:
    """Written whole to a temporary file, then renamed: a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"url": base_url, "date": today.isoformat(), "fetched_ms": time.time_ns() // 10**6,
            "asked": wanted, "symbols": [table[s].to_details() for s in sorted(table)]}
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def _fallback(folder: Path, slug: str, base_url: str, exc: Exception) -> RulesTable:
    caches = sorted(folder.glob(f"symbols-{slug}-????-??-??.json"))
    for path in reversed(caches):  # newest date first (ISO dates sort)
        try:
            table = _from_cache(json.loads(path.read_text(), parse_float=Decimal))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        log.warning("Gemini's symbol rules cannot be fetched from %s (%s): using the cache "
                    "%s", base_url, exc, path.name)
        return table
    raise RulesUnavailable(f"Gemini's symbol rules cannot be fetched from {base_url} ({exc}) "
                           f"and there is no cache in {folder}: orders cannot be checked")


def startup_rules(mode: str, url: str, run_dir: str | Path, symbols: Iterable[str] | None,
                  rules_url: str | None = None, rules_file: str | Path | None = None,
                  off: bool = False) -> RulesTable | None:
    """The rules execution checks every order against, loaded once at start-up; None:
    none (``off``), which only paper allows.

    * sandbox / live: :func:`load_rules` at the mode's own URL (``rules_url`` overrides),
      so orders are checked against the very table the exchange they go to applies; with
      no answer and no cache, ``rules_file`` if given, else the group refuses to start.
    * paper: ``rules_url`` through :func:`load_rules` (cache included) when given, else
      or when that fails ``rules_file`` (e.g. the recorded responses beside the capture
      being replayed); with neither configured, no symbol rules (ids and options are
      still checked): paper never reaches for the internet unless told to, and a replay
      of 2021 data is not checked against today's table by accident.
    """
    if off:
        if mode != "paper":
            raise PipelineError(f"{mode} mode always checks Gemini's symbol rules")
        log.warning("symbol rules off: orders are not checked against price/amount steps")
        return None
    source = rules_url or (url if mode != "paper" else None)
    if source is not None:
        try:
            table = load_rules(source, run_dir, symbols)
            log.info("symbol rules: %d symbol(s) from %s", len(table), source)
            return table
        except RulesUnavailable:
            if rules_file is None:
                raise
            log.warning("symbol rules: %s unreachable with no cache, using %s", source,
                        rules_file)
    if rules_file is not None:
        table = read_rules_file(rules_file)
        log.info("symbol rules: %d symbol(s) from %s", len(table), rules_file)
        return table
    log.warning("symbol rules: none configured (--rules-url / --rules-file): only "
                "client_order_ids and options are checked")
    return None
