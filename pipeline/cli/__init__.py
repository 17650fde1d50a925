"""The ``pipeline`` command: one module per command group, presentation only."""
