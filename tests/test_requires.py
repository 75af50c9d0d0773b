"""requires(): a missing tool skips a module here, and fails it in CI."""

import pytest

from requires import requires


def test_a_missing_tool_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    mark = requires(False, "needs chromium")
    assert mark.name == "skipif" and mark.args == (True,) and mark.kwargs["reason"] == "needs chromium"
    assert requires(True, "needs chromium").args == (False,)


def test_a_missing_tool_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs chromium; CI=true"):
        requires(False, "needs chromium")
    assert requires(True, "needs chromium").args == (False,)
