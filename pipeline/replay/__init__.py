"""Reading ranges of topics back: range planning, the backtest source, topology replay."""
