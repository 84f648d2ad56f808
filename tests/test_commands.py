"""The mailbox between API threads and the loop: nothing posted is lost,
even while it closes."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from supervisor.engine.commands import QueuedSwitch
from supervisor.futures import settle
from supervisor.mailbox import Mailbox
from tests.helpers import T


def _race_posters_against_close(posters: int = 4) -> tuple[int, int, list[BaseException]]:
    """Posters put until the box refuses; the box is closed while they are
    mid-flight (a put's write to the wake-up pipe is where the GIL lets go)."""
    box = Mailbox()
    accepted: list[int] = []
    errors: list[BaseException] = []

    def poster(n: int) -> None:
        i = 0
        while True:
            i += 1
            try:
                if not box.put(QueuedSwitch(f"{n}-{i}", None)):
                    return
                accepted.append(1)
            except BaseException as exc:  # noqa: BLE001 - any error is the failure
                errors.append(exc)
                return

    threads = [threading.Thread(target=poster, args=(n,)) for n in range(posters)]
    for t in threads:
        t.start()
    delivered = 0
    while len(accepted) < 200:
        delivered += len(box.take_all())
    delivered += len(box.close())
    for t in threads:
        t.join(T)
    return delivered, len(accepted), errors


@pytest.mark.process  # threads raced 100 times: seconds, not the unit layer's milliseconds
def test_closing_while_threads_post_loses_nothing_and_raises_nothing():
    for _ in range(100):
        delivered, accepted, errors = _race_posters_against_close()
        assert errors == []
        assert delivered == accepted


@pytest.mark.unit
def test_settle_gives_one_outcome_and_respects_cancellation():
    f: Future = Future()
    settle(f, result=1)
    settle(f, error=RuntimeError("second"))
    assert f.result() == 1
    cancelled: Future = Future()
    assert cancelled.cancel()
    settle(cancelled, result=2)
    assert cancelled.cancelled()
