"""The one exception a command raises for a mistake in its command line or its inputs."""

from __future__ import annotations


class UsageError(Exception):
    """A user mistake (bad argument, unusable input or output path, malformed file).

    ``sparsekit.cli.main.main`` prints it as one line and exits with status 2. Commands
    raise it where a failure is the user's to fix, never for a bug in sparsekit itself.
    """
