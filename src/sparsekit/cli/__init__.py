"""The ``sparsekit`` command line: one module per command."""
