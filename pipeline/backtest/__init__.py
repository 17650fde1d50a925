"""The in-process backtest: engine, reports, ``BacktestConfig``, ``run_backtest``/``sweep``."""
