"""examples/research.ipynb executed end to end with nbclient on the project's interpreter,
over a namespace holding the real hourly bars and capture, archived by the archive group:
no cell errors, the backtest equals a direct one from Kafka, the sweep has its grid, the
plots are drawn.

The tests that need Kafka: tests/integration/test_notebook.py."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat",
                               reason="nbformat is in the test extra: pip install -e '.[test]'")


NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "research.ipynb"


def outputs(nb, output_type: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type == output_type]


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


