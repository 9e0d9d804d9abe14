"""vlmpool.testing.waiting: the one polling helper of the tests, in its plain and coroutine forms."""

from __future__ import annotations

import time

import pytest

from vlmpool.testing.waiting import wait_for, wait_until


def flaky(fail: int, value: object = "ok"):
    """fn() that raises `fail` times ("not yet"), then returns value."""
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if calls["n"] <= fail:
            raise KeyError("not there yet")
        return value
    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_returns_the_first_truthy_value_after_errors_and_falsy_values():
    assert wait_for(flaky(3, {"a": 1}), 5) == {"a": 1}
    seen = iter([None, 0, [], "x"])
    assert wait_for(lambda: next(seen), 5) == "x"


def test_timeout_names_what_and_the_last_error():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for the thing; last: KeyError"):
        wait_for(flaky(10**6), 0.2, what="the thing")
    assert time.monotonic() - t0 < 2


def test_an_assertion_in_fn_fails_at_once():
    fn = flaky(0)

    def dead():
        fn()
        raise AssertionError("the process exited")
    with pytest.raises(AssertionError, match="the process exited"):
        wait_for(dead, 30)
    assert fn.calls["n"] == 1  # type: ignore[attr-defined]


async def test_the_coroutine_form_awaits_and_has_the_same_rules():
    fn = flaky(2, 7)

    async def coro():
        return fn()
    assert await wait_until(coro, 5) == 7
    assert await wait_until(flaky(1, 8), 5) == 8  # a plain fn too
    with pytest.raises(AssertionError, match="waiting for nothing; last: None"):
        await wait_until(lambda: None, 0.1, what="nothing")

    async def dead():
        raise AssertionError("gone")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="gone"):
        await wait_until(dead, 30)
    assert time.monotonic() - t0 < 2
