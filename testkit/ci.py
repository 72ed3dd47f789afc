"""What a missing prerequisite does: skip locally, fail under CI (CI=true), so CI never passes by skipping."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, why: str) -> None:
    if not condition:
        if IN_CI:
            pytest.fail(f"prerequisite missing under CI: {why}")
        pytest.skip(why)
