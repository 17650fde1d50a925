"""The in-process backtest: engine, reports, ``run_backtest``/``sweep``."""
