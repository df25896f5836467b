"""Whether the compiled kernels loaded, for the tests that need them: one rule for every
test file (the kernels may be missing legitimately, e.g. ``SPARSEKIT_NO_KERNELS=1``)."""

from __future__ import annotations

import warnings

import pytest

from sparsekit.engine import kernels


def kernels_ok() -> bool:
    """True when the compiled kernels are available (asked quietly: the reason a build
    failed is a warning of the library, not of each test file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.available()


needs_kernels = pytest.mark.skipif(not kernels_ok(), reason="compiled kernels unavailable")
