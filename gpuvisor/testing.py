"""Test a mode from your own test suite, in a real worker process.

::

    from gpuvisor.testing import load_mode

    def test_score():
        with load_mode("scorer:load", args={"scale": 2}, loader_path=[HERE]) as mode:
            assert mode.call("score", {"text": "hi"}) == {"score": 4}
            assert mode.batch("score", [{"text": "a"}, {"text": "bb"}]) == [{"score": 2}, {"score": 4}]
            assert list(mode.stream("count", {"n": 3})) == [0, 1, 2]

The mode runs as it will when served: a fresh worker process started by
the real ``Supervisor``, in /, importing the loader through ``loader_path``,
every payload and result crossing the socket as msgpack. So a test sees
what a caller will see: a result that msgpack cannot carry, a handler that
imports something at call time, a ``@batched`` handler given several
payloads at once. Only the test's own process runs this module; it imports
no torch (the worker does, if the mode needs it).

The supervisor is configured for one mode and for tests: no warm standby (a
spare worker would cost a second interpreter per test), the CPU unless the
test names a device. A mode that fails to load fails ``load_mode`` with
the worker's message, which names the loader's file and line.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from protocol import pack
from supervisor import Supervisor
from supervisor.config import Config, ModeSpec
from supervisor.status import Status, SwitchResult
from supervisor.stream import JobStream

__all__ = ["LoadedMode", "load_mode", "mode_fixture"]

WAIT = 120.0
"""Seconds any one call of the kit waits before the test fails as hung: a
bound against hangs, not a measure of speed (a model may take a while to
load on a busy machine)."""


class LoadedMode:
    """A mode loaded in a real worker, and the calls a test makes to it.
    Made by ``load_mode``; a context manager that stops the worker (and
    reaps it) on exit."""

    def __init__(self, supervisor: Supervisor, name: str, wait: float):
        self._sup, self.name, self.wait = supervisor, name, wait

    def call(self, task: str, payload: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``task`` once and return its result, or raise its typed error
        (``JobFailed`` with the handler's message, ``WorkerCrashed`` ...).
        ``timeout``: the job's own limit, as ``submit()`` takes it."""
        return self.submit(task, payload, timeout=timeout).result(self.wait)

    def submit(self, task: str, payload: Any = None, *, timeout: float | None = None) -> Future:
        """``call`` without waiting: the job's Future."""
        return self._sup.submit(task, payload, mode=self.name, timeout=timeout)

    def batch(self, task: str, payloads: Sequence[Any]) -> list[Any]:
        """Each payload's result, in order; the first error raised. The jobs
        reach the supervisor's queue in one go, so a ``@batched`` handler
        gets them in one call (up to its ``max_batch``; more are split),
        as it would when that many callers send at once. How: they are
        submitted from a callback that the supervisor's own loop runs (the
        answer to a switch to the mode already loaded), so the loop cannot
        take the first before the last is queued. A task that takes one
        payload runs them one by one."""
        payloads = list(payloads)
        caller = threading.get_ident()
        for _ in range(100):  # a retry only when the switch was answered before the callback was in place
            sent: list[Future] = []
            problem: list[BaseException] = []
            done = threading.Event()

            def submit_all(
                gate: Future, sent: list = sent, problem: list = problem, done: threading.Event = done
            ) -> None:
                try:
                    if threading.get_ident() != caller and gate.exception() is None:
                        sent.extend(self.submit(task, payload) for payload in payloads)
                except BaseException as exc:  # noqa: BLE001 - handed to the test's thread, raised there
                    problem.append(exc)
                finally:
                    done.set()

            gate = self._sup.switch_mode(self.name)
            gate.add_done_callback(submit_all)
            if not done.wait(self.wait):
                raise TimeoutError(f"the batch of {len(payloads)} {task!r} jobs was not submitted in {self.wait}s")
            gate.result(0)  # the mode loaded (again, after a crash), or its load error raised here
            if problem:
                raise problem[0]
            if sent or not payloads:
                return [future.result(self.wait) for future in sent]
        raise RuntimeError("could not submit the batch from the supervisor's loop")  # never seen: 100 misses

    def stream(self, task: str, payload: Any = None, *, timeout: float | None = None) -> JobStream:
        """The chunks a generator handler yields, as an iterator; then
        ``.result()`` is its return value. Leaving a ``for`` loop early
        cancels the job, as a caller who goes away does."""
        return self._sup.submit(task, payload, mode=self.name, timeout=timeout, stream=True)

    def restart(self) -> SwitchResult:
        """A fresh worker, loading the mode again (``pid`` changes)."""
        return self._sup.restart(self.name).result(self.wait)

    @property
    def pid(self) -> int | None:
        """The worker's process id (None between a crash and the respawn)."""
        return self.status["worker_pid"]

    @property
    def status(self) -> Status:
        """The supervisor's status: the mode, the worker, the queue, the batches sent."""
        return self._sup.status()

    @property
    def tasks(self) -> list[str]:
        """The task names the loader returned."""
        return list(self._sup.modes()[self.name]["tasks"] or [])

    def close(self) -> None:
        """Stop the worker without running what is queued, and reap it."""
        self._sup.shutdown(drain=False)

    def __enter__(self) -> LoadedMode:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def load_mode(
    loader: str,
    args: Mapping[str, Any] | None = None,
    *,
    loader_path: Sequence[str | os.PathLike] = (),
    name: str | None = None,
    warmup: Mapping[str, Any] | None = None,
    device: str = "cpu",
    wait: float = WAIT,
    **settings: Any,
) -> LoadedMode:
    """Load ``loader`` (``"module:function"``, as in the config) with
    ``args`` in a fresh worker, and return the mode once it is READY; use
    it in a ``with`` block, which stops the worker at its end.

    ``loader_path``: folders the worker imports the loader from (a test
    usually passes its own folder). ``name``: the mode's name (default: the
    loader's module). ``warmup``: ``{"task", "payload"}``, run after the
    load as the config's ``warmup``. ``device``: ``"cpu"`` (default),
    ``"cuda:0"``, ``"auto"``. ``settings``: any other ``[supervisor]`` key
    (``job_timeout``, ``heartbeat_timeout`` ...). A loader that fails
    raises ``ModeLoadError`` here, naming its file and line."""
    args = dict(args or {})
    try:
        pack(args)
    except TypeError as exc:
        raise TypeError(f"load_mode: args must be what a config can hold (it travels as msgpack): {exc}") from None
    module = loader.partition(":")[0]
    name = name or module.rpartition(".")[2]
    spec = ModeSpec(name, loader, args, dict(warmup) if warmup is not None else None)
    folders = tuple(str(Path(folder).resolve()) for folder in loader_path)
    config = Config(
        modes={name: spec},
        warm_standby=False,
        device=device,
        loader_path=folders,
        source=f"<gpuvisor.testing: {loader}>",
        **settings,
    )
    sup = Supervisor(config)
    try:
        sup.switch_mode(name).result(wait)
    except BaseException:
        sup.shutdown(drain=False)
        raise
    return LoadedMode(sup, name, wait)


def mode_fixture(
    loader: str,
    args: Mapping[str, Any] | None = None,
    *,
    scope: Literal["session", "package", "module", "class", "function"] = "module",
    **options: Any,
) -> Callable[..., Any]:
    """A pytest fixture that yields ``load_mode(loader, args, **options)``,
    one worker for every test of its ``scope`` (a module's, by default: a
    model loads once)::

        scorer = mode_fixture("scorer:load", loader_path=[HERE])

        def test_score(scorer):
            assert scorer.call("score", {"text": "hi"}) == {"score": 2}
    """
    import pytest

    @pytest.fixture(scope=scope)
    def fixture() -> Iterator[LoadedMode]:
        with load_mode(loader, args, **options) as mode:
            yield mode

    return fixture
