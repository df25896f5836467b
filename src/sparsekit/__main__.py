"""``python -m sparsekit``: the ``sparsekit`` command (:mod:`sparsekit.cli.main`)."""

import sys

from sparsekit.cli.main import main

sys.exit(main())
