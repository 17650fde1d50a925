"""``python -m pipeline.cli``: the ``pipeline`` command."""

from pipeline.cli.main import main

main()
