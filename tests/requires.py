"""Tests that need a tool this machine may lack: skipped with the reason, except under CI=true,
where .ci/run installs the tool, so its absence is a failure rather than a quiet skip."""

import os

import pytest


def requires(present: bool, reason: str):
    """A module's pytestmark: skip with `reason` where the tool is missing, fail collection in CI."""
    if not present and os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, where .ci/run installs it, so its absence is a failure", pytrace=False)
    return pytest.mark.skipif(not present, reason=reason)
