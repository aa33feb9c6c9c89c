"""The bridge's log pacing: at most one line per second per kind, nothing lost from the count."""

from __future__ import annotations

import pytest

from firmware_bridge.ratelimit import LOG_EVERY_S, LogLimiter, more


def test_one_line_per_period_per_kind_and_the_held_count():
    lim = LogLimiter()
    assert lim.allow("dropped", 100.0) == (True, 0)
    assert [lim.allow("dropped", 100.0 + i / 100) for i in range(1, 36)] == [(False, 0)] * 35
    assert lim.held("dropped") == 35
    assert lim.allow("refused", 100.5) == (True, 0)              # another kind is paced apart
    assert lim.allow("dropped", 100.0 + LOG_EVERY_S) == (True, 35)  # says how many it held
    assert lim.held("dropped") == 0
    assert lim.allow("dropped", 100.0 + 1.5 * LOG_EVERY_S) == (False, 0)
    assert lim.allow("dropped", 100.0 + 5 * LOG_EVERY_S) == (True, 1)


def test_more_suffix():
    assert more(0) == ""
    assert more(12) == " (+12 more not logged)"


def test_period_must_be_positive():
    with pytest.raises(ValueError, match="period"):
        LogLimiter(0)
