"""Every test here runs the demo image on real agents: build it (or find it) first."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def images(built_images: dict[str, str]) -> None:
    del built_images  # the session fixture did the work
