"""The metric names a Grafana dashboard queries, and those a Prometheus exposition has.

:func:`dashboard_metric_names` reads every panel target's PromQL ``expr`` (rows' nested
panels too), the annotations' and the template variables' queries, and returns the series
names they select. A small tokenizer does it: it drops strings, label matchers (but reads a
``__name__="..."`` or a quoted name inside braces), ranges and subqueries, durations,
numbers, Grafana variables, keywords, the label lists of ``by``/``without``/``on``/
``ignoring``/``group_left``/``group_right``, and functions and aggregations. What cannot
be checked is an error, not a guess: a name before ``(`` that PromQL does not know, a name
made with a variable, a name by regex. What is left are the names of series as queried,
e.g. ``foo_bucket`` of a histogram ``foo``: :func:`exposition_metric_names` gives a
histogram's or summary's family its ``_bucket``/``_sum``/``_count`` series, so the two
sets compare as they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from pipeline.ops.settings import REPO_ROOT

DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "pipeline.json"
FUNCTIONS = frozenset("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
deg delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count
histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
holt_winters hour idelta increase info irate label_join label_replace last_over_time ln log10
log2 mad_over_time max_over_time min_over_time minute month pi predict_linear
present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
timestamp ts_of_first_over_time ts_of_last_over_time ts_of_max_over_time ts_of_min_over_time
vector year start end
""".split())
AGGREGATIONS = frozenset("""
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
""".split())
LABEL_LIST_KEYWORDS = frozenset("by without on ignoring group_left group_right".split())
KEYWORDS = frozenset("and or unless bool offset atan2 inf nan".split())

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)[A-Za-z0-9_]*")
_MATCHER_TOKEN = re.compile(r"!=|=~|!~|=|,|[A-Za-z_][A-Za-z0-9_]*")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z0-9_]+|\[\[[^\]]*\]\]")


def _string_end(text: str, i: int) -> int:
    """The index after the string literal starting at ``text[i]``."""
    quote, i = text[i], i + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" and quote != "`" else 1
    if i >= len(text):
        raise ValueError(f"unterminated string in {text!r}")
    return i + 1


def _close(text: str, i: int, open_: str, close: str) -> int:
    """The index after the ``close`` matching the ``open_`` at ``text[i]`` (strings skipped)."""
    depth = 0
    while i < len(text):
        char = text[i]
        if char in "\"'`":
            i = _string_end(text, i)
            continue
        depth += (char == open_) - (char == close)
        i += 1
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {open_}{close} in {text!r}")


def _names_in_matchers(body: str) -> set[str]:
    """Metric names inside ``{...}``: ``__name__="x"`` or a bare quoted ``"x"`` (UTF-8
    names), never a label's value."""
    names: set[str] = set()
    tokens: list[str] = []
    i, previous = 0, "{"
    while i < len(body):
        if body[i].isspace():
            i += 1
        elif body[i] in "\"'`":
            end = _string_end(body, i)
            tokens.append(body[i:end])
            i = end
        elif m := _MATCHER_TOKEN.match(body, i):
            tokens.append(m.group())
            i = m.end()
        else:
            raise ValueError(f"cannot read the label matchers {{{body}}}")
    for index, token in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else ","
        if token[0] in "\"'`" and previous in ("{", ",") and following == ",":
            names.add(token[1:-1])
        elif token == "__name__" and following != "=":
            raise ValueError(f"a metric name by regex ({{{body}}}) cannot be checked")
        elif previous == "=" and index >= 2 and tokens[index - 2] == "__name__":
            names.add(token[1:-1])
        previous = token
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (Grafana variables allowed)."""
    names: set[str] = set()
    text, i = expr, 0
    while i < len(text):
        char = text[i]
        if char.isspace() or char in "()+-*/%^,<>=!@":
            i += 1
        elif char in "\"'`":
            i = _string_end(text, i)
        elif char == "{":
            end = _close(text, i, "{", "}")
            names |= _names_in_matchers(text[i + 1:end - 1])
            i = end
        elif char == "[" and not text.startswith("[[", i):
            i = _close(text, i, "[", "]")  # a range or a subquery's range and step
        elif m := _VARIABLE.match(text, i):
            i = m.end()
            if i < len(text) and re.match(r"[A-Za-z0-9_:]", text[i]):
                raise ValueError(f"a metric name made with a variable cannot be checked: {expr!r}")
        elif m := _NUMBER.match(text, i):
            i = m.end()
        elif m := _IDENT.match(text, i):
            word, i = m.group(), m.end()
            if text.startswith(("$", "[["), i):
                raise ValueError(f"a metric name made with a variable cannot be checked: {expr!r}")
            rest = text[i:].lstrip()
            if word in LABEL_LIST_KEYWORDS:
                if rest.startswith("("):
                    i = _close(text, len(text) - len(rest), "(", ")")
            elif word.lower() in KEYWORDS:
                pass
            elif rest.startswith("("):
                if word not in FUNCTIONS | AGGREGATIONS:
                    raise ValueError(f"unknown PromQL function {word}() in {expr!r}")
            elif word in AGGREGATIONS and re.match(r"(by|without)\b", rest):
                pass
            else:
                names.add(word)
        else:
            raise ValueError(f"cannot read {text[i:]!r} in {expr!r}")
    return names


def variable_metric_names(query: str) -> set[str]:
    """The names a Prometheus template variable's query selects: ``label_values(selector,
    label)``, ``query_result(expr)``, a plain expression; ``label_values(label)`` and
    ``label_names()`` select none."""
    query = query.strip()
    if m := re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S):
        return promql_metric_names(m.group(1))
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|label_names\(\s*\)", query):
        return set()
    if m := re.fullmatch(r"query_result\((.*)\)", query, re.S):
        return promql_metric_names(m.group(1))
    if query.startswith("metrics("):
        raise ValueError(f"metric names by regex ({query}) cannot be checked")
    return promql_metric_names(query)


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(``expr`` or ``variable``, query text) of every target, annotation and variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield "expr", target["expr"]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            yield "expr", annotation["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query: Any = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            if query:
                yield "variable", query


def dashboard_metric_names(path: Path | str) -> set[str]:
    """Every metric name the dashboard at ``path`` queries."""
    dashboard = json.loads(Path(path).read_text())
    names: set[str] = set()
    for kind, text in queries(dashboard):
        names |= promql_metric_names(text) if kind == "expr" else variable_metric_names(text)
    return names


def exposition_metric_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition declares or has samples of (a family
    without samples counts: which samples there are depends on the moment)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            names.add(name)
            if kind.strip() in ("histogram", "gaugehistogram"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind.strip() == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def missing_metrics(dashboard_path: Path | str, exposition_text: str) -> set[str]:
    """The metric names the dashboard queries that the exposition does not have."""
    return dashboard_metric_names(dashboard_path) - exposition_metric_names(exposition_text)
