"""Fixtures of the secure-aggregation tests."""

from __future__ import annotations

import pytest
from secagg_harness import Federation


@pytest.fixture
def federation() -> Federation:
    """Four sites, each contributing ``encoder.image`` and ``fusion``."""
    return Federation()
