"""The public API is pinned: what users import is ``pipeline.__all__``, every name there
resolves to the object its module defines, and the README's Python snippets import only
from it (so a refactoring that moves a module cannot break a user who followed them)."""

from __future__ import annotations

import ast
import importlib
import re

import pipeline
from pipeline.ops.settings import REPO_ROOT

PINNED = [
    "BacktestConfig", "CancelAllIntent", "CancelIntent", "Cluster", "DeliveryFailed",
    "FULL_EQUITY", "GroupConfig", "GroupContext", "GroupRunner", "Handler", "HandlerHarness",
    "MidQuoter", "Namespace", "OrderIntent", "Output", "Partition", "PipelineError", "Record",
    "RegistryError", "ReplaceIntent", "SchemaRegistry", "Serde", "SerdeError", "SmaCross",
    "Strategy", "StrategyFailed", "archive", "load_strategy", "read_bars", "run_backtest",
    "run_until_stopped", "sweep",
]


def test_all_is_pinned_and_every_name_resolves_to_its_definition():
    assert pipeline.__all__ == sorted(PINNED) == sorted(pipeline._EXPORTS)
    for name in pipeline.__all__:
        value = getattr(pipeline, name)
        module = importlib.import_module(pipeline._EXPORTS[name])
        assert value is (module if module.__name__.endswith("." + name) else
                         getattr(module, name)), name
    for error in ("DeliveryFailed", "SerdeError", "RegistryError", "StrategyFailed"):
        assert issubclass(getattr(pipeline, error), pipeline.PipelineError), error
    assert set(pipeline.__all__) <= set(dir(pipeline))


def test_an_unknown_name_is_an_attribute_error_and_submodules_still_import():
    try:
        pipeline.NoSuchThing  # noqa: B018 - the access is the test
    except AttributeError as exc:
        assert "no attribute 'NoSuchThing'" in str(exc)
    else:
        raise AssertionError("pipeline.NoSuchThing resolved")
    from pipeline.kafka import catalog  # a submodule outside __all__ still imports

    assert catalog.Namespace is pipeline.Namespace


def test_the_readme_snippets_import_only_the_public_api():
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    imported = []
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                assert node.module == "pipeline", f"README imports from {node.module}"
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("pipeline."), alias.name
    assert imported and set(imported) <= set(pipeline.__all__), imported
