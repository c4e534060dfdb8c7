"""``python -m pipeline.cli``: the ``floodgate`` command without its console script."""

from pipeline.cli import main

main()
