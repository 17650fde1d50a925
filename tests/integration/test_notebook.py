"""examples/research.ipynb executed end to end with nbclient on the project's interpreter, over a
namespace holding the real hourly bars and capture, archived by the archive group: no cell errors,
the backtest equals a direct one from Kafka, the sweep has its grid, the plots are drawn: the tests
that need Kafka (those that do not: tests/unit/test_notebook.py)."""

from __future__ import annotations

import json
import sys

import pytest

from consumers.archive import group_config  # noqa: E402
from pipeline.backtest.config import BacktestConfig  # noqa: E402
from pipeline.backtest.run import run_backtest  # noqa: E402
from pipeline.core.cluster import Cluster  # noqa: E402
from pipeline.kafka.catalog import ensure_topics  # noqa: E402
from pipeline.runtime.runner import GroupRunner  # noqa: E402
from pipeline.strategy import FULL_EQUITY  # noqa: E402
from tests.integration.test_archive import CAPTURE, publish_capture  # noqa: E402
from tests.unit.test_notebook import NOTEBOOK, nbformat, outputs  # noqa: F401 - shared with the unit tests

nbclient = pytest.importorskip("nbclient",
                               reason="nbclient is in the test extra: pip install -e '.[test]'")


SMACROSS = {"fast": 10, "slow": 20, "amount": None, "fraction": FULL_EQUITY}


def with_parameters(nb, **values):
    """Papermill's way: a cell tagged ``injected-parameters`` right after ``parameters``."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(at + 1, cell)
    return nb


def test_the_research_notebook_runs_over_the_archive(kafka, registry, namespace, shared_data,
                                                     tmp_path):
    from producers.csv_bars import load_csv_bars

    ensure_topics(kafka, namespace, ["md.l2", "md.trades", "bars", "dlq"])
    loaded = load_csv_bars(shared_data / "BTCUSD_GEMINI_1h.csv", kafka, registry.url,
                           namespace).published
    counts = publish_capture(kafka, registry.url, namespace, shared_data / CAPTURE)
    assert loaded == 32_842 and counts == {"md.l2": 655, "md.trades": 516}
    root = tmp_path / "archive"
    GroupRunner(group_config(kafka, registry.url, str(namespace), root=root, roll_seconds=3600),
                kafka).run(idle_timeout_s=3)  # a stop flushes what waits

    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), NAMESPACE=str(namespace),
                         ARCHIVE_ROOT=str(root), KAFKA=kafka, REGISTRY=registry.url)
    # kernel "python3" runs "python", which jupyter_client replaces by sys.executable:
    # this interpreter (the venv's), the one that imports pipeline.
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert not outputs(nb, "error")
    summary = next(c for c in nb.cells if "summary" in c.metadata.get("tags", []))
    printed = json.loads("".join(o.text for o in summary.outputs if o.output_type == "stream"))
    direct = run_backtest(BacktestConfig("pipeline.strategy:SmaCross", namespace, SMACROSS,
                                         cash="1000000", commission="0.002"),
                          Cluster(kafka, registry.url), progress=False)
    assert len(direct.engine.trades) > 500
    assert printed == {"bars": 32_842, "trades": 516,
                       "backtest_trades": len(direct.engine.trades), "sweep_rows": 6,
                       "python": sys.executable}
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert f"Kafka agrees: {len(direct.engine.trades)} trades" in text
    images = [o for o in outputs(nb, "display_data") if "image/png" in o.data]
    assert len(images) == 3  # the closes, the equity curve, the sweep's heatmap


