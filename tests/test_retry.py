"""The quick retry of a busy kernel (:func:`retry_busy`): which errors it retries, how often."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pushfw.worker.errors import (
    QUICK_RETRIES,
    BackendError,
    PermanentBackendError,
    TransientBackendError,
    retry_busy,
)


def refusing(*errors: BackendError) -> tuple[list[int], Callable[[], None]]:
    """An attempt that raises ``errors`` in turn, then succeeds; the list counts the calls."""
    calls: list[int] = []

    def attempt() -> None:
        calls.append(len(calls))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]

    return calls, attempt


def test_a_busy_kernel_is_tried_again_until_it_commits() -> None:
    calls, attempt = refusing(*[TransientBackendError("busy")] * (QUICK_RETRIES - 1))
    retry_busy(attempt)
    assert len(calls) == QUICK_RETRIES


def test_still_busy_after_the_last_try_is_the_callers_to_handle() -> None:
    last = TransientBackendError("still busy")
    calls, attempt = refusing(*[TransientBackendError("busy")] * (QUICK_RETRIES - 1), last)
    with pytest.raises(TransientBackendError) as info:
        retry_busy(attempt)
    assert info.value is last
    assert len(calls) == QUICK_RETRIES


@pytest.mark.parametrize("error", [BackendError("refused"), PermanentBackendError("set full")])
def test_a_refusal_is_not_retried(error: BackendError) -> None:
    """Redelivery (and the dead letter) handle a refusal: the quick retry gives it back."""
    calls, attempt = refusing(error)
    with pytest.raises(BackendError) as info:
        retry_busy(attempt)
    assert info.value is error
    assert calls == [0]
