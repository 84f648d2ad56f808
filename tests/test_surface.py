"""One API, two faces: ``Supervisor`` and ``Client`` keep the sync face,
``AsyncSupervisor`` and ``AsyncClient`` the async one, method for method,
with the same signatures; the same mistake is the same error, arriving the
same way, on every face (a real daemon behind the clients). And a client
process loads nothing of the engine."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from protocol import QueueFull, ShuttingDown, UnknownMode, WrongDevice
from supervisor import AsyncSupervisor, Supervisor
from supervisor.client import AsyncClient, Client
from supervisor.surface import AsyncSupervisorAPI, SupervisorAPI
from tests.helpers import T, run_python
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import serving


def _methods(protocol: type) -> list[str]:
    return [name for name, member in vars(protocol).items() if callable(member) and not name.startswith("_")]


def _shape(fn) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults: what a caller writes. Annotations
    are the Protocol's business and may be narrower in a class."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.unit
@pytest.mark.parametrize(
    "protocol, classes",
    [(SupervisorAPI, (Supervisor, Client)), (AsyncSupervisorAPI, (AsyncSupervisor, AsyncClient))],
    ids=["sync", "async"],
)
def test_each_face_is_kept_method_for_method(protocol, classes):
    names = _methods(protocol)
    assert {"submit", "switch_mode", "restart", "status", "modes", "shutdown"} <= set(names)
    for cls in classes:
        for name in names:
            declared, kept = getattr(protocol, name), getattr(cls, name, None)
            assert kept is not None, f"{cls.__name__} lacks {name}()"
            assert _shape(kept) == _shape(declared), f"{cls.__name__}.{name}{inspect.signature(kept)}"
            assert inspect.iscoroutinefunction(kept) == inspect.iscoroutinefunction(declared), (cls, name)


@pytest.mark.unit
def test_the_sync_and_async_faces_take_the_same_arguments():
    for name in _methods(SupervisorAPI):
        assert _shape(getattr(SupervisorAPI, name)) == _shape(getattr(AsyncSupervisorAPI, name)), name


@pytest.mark.process
def test_importing_the_client_loads_nothing_of_the_engine():
    code = "import sys, supervisor.client; print(sorted(m for m in sys.modules if m.startswith('supervisor')))"
    out = run_python(code)
    loaded = eval(out.stdout)  # noqa: S307 - our own subprocess printing a list of names
    assert not [m for m in loaded if m.startswith(("supervisor.engine", "supervisor.api", "supervisor.service"))]
    code = "import sys, supervisor.client; print(sorted(m.split('.')[0] for m in sys.modules))"
    out = run_python(code)
    assert not {"torch", "numpy", "psutil", "pynvml", "worker"} & set(eval(out.stdout))  # noqa: S307


@pytest.mark.process
def test_import_supervisor_is_light_until_a_name_is_used():
    code = (
        "import sys, supervisor; before = {m for m in sys.modules if m.startswith('supervisor')}; "
        "supervisor.Supervisor; after = {m for m in sys.modules if m.startswith('supervisor')}; "
        "print(sorted(before), 'supervisor.engine.loop' in after)"
    )
    out = run_python(code)
    assert out.stdout.strip() == "['supervisor'] True"


# ---------------------------------------------------------------- one rule for how errors arrive

CONFIG = config_text({"diag": DIAG}, supervisor={"max_queue": 2, "max_queue_per_client": 2, "warm_standby": False})

FACES = ["Supervisor", "AsyncSupervisor", "Client", "AsyncClient"]

ARGUMENT_MISTAKES = [  # what the arguments show by themselves: raised by the call, on every face
    ("submit", (42,), {}, TypeError, "task must be a non-empty str"),
    ("submit", ("echo",), {"timeout": -1}, ValueError, "timeout must be a finite number >= 0"),
    ("submit", ("echo", {"x": object()}), {}, TypeError, "not msgpack-encodable"),
    ("submit", ("count",), {"stream": True, "retries": 1}, ValueError, "cannot be retried"),
    ("switch_mode", (None,), {}, TypeError, "mode must be a str, got NoneType"),
    ("restart", (3,), {}, TypeError, "mode must be a str or None, got int"),
    ("switch_mode", ("diag",), {"device": 3}, TypeError, "device must be a str or None, got int"),
    ("unload", (3,), {}, TypeError, "device must be a str or None, got int"),
    ("shutdown", (), {"timeout": -1}, ValueError, "timeout must be a finite number > 0"),
]

REFUSALS = [  # the configuration's answer, which a client learns from the daemon: through the Future, on every face
    ("submit", ("echo",), {"mode": "nope"}, UnknownMode, "unknown mode 'nope'"),
    ("switch_mode", ("nope",), {}, UnknownMode, "unknown mode 'nope'"),
    ("restart", ("nope",), {}, UnknownMode, "unknown mode 'nope'"),
    ("switch_mode", ("diag",), {"device": "cuda:7"}, WrongDevice, "unknown device 'cuda:7'"),
    ("restart", (), {"device": "cuda:7"}, WrongDevice, "unknown device 'cuda:7'"),
    ("unload", ("cuda:7",), {}, WrongDevice, "unknown device 'cuda:7'"),
]


@pytest.fixture(scope="module")
def daemon():
    with serving(CONFIG) as d:
        yield d


@pytest.fixture(params=FACES)
def face(request, tmp_path, daemon):
    """One face, over a supervisor of its own in this process or over the
    module's daemon (whose workers it unloads after the test, so that none
    outlives it). The daemon is started first for every face: a module's
    process, not a test's."""
    name = request.param
    if name in ("Supervisor", "AsyncSupervisor"):
        path = tmp_path / "gpuvisor.toml"
        path.write_text(CONFIG)
        sup = Supervisor(path)
        if name == "Supervisor":
            yield sup
            sup.shutdown(drain=False)
        else:
            yield AsyncSupervisor(path)
        return
    endpoint = daemon.endpoint
    client = Client(endpoint, timeout=T)
    try:
        if name == "Client":
            yield client
        else:
            async_client = AsyncClient(endpoint, timeout=T)
            yield async_client
            asyncio.run(async_client.close())
        client.unload().result(T)
    finally:
        client.close()


def _stop(face) -> None:
    if isinstance(face, AsyncSupervisor):
        asyncio.run(face.shutdown(drain=False))


def arrival(face, name: str, *args, **kwargs) -> tuple[str, BaseException]:
    """Where the error of ``face.name(*args, **kwargs)`` arrives: raised by
    the ``call``, by the ``future`` it returned, or (an async face) at the
    ``await``, and the error."""
    method = getattr(face, name)
    if inspect.iscoroutinefunction(method):
        try:
            asyncio.run(asyncio.wait_for(method(*args, **kwargs), T))
        except Exception as exc:  # noqa: BLE001 - what arrives is the test's subject
            return "await", exc
        raise AssertionError(f"{type(face).__name__}.{name}{args} succeeded")
    try:
        answer = method(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        return "call", exc
    assert answer is not None, f"{type(face).__name__}.{name}{args} succeeded"
    try:
        answer.result(T)
    except Exception as exc:  # noqa: BLE001
        return "future", exc
    raise AssertionError(f"{type(face).__name__}.{name}{args} succeeded")


@pytest.mark.daemon
@pytest.mark.parametrize("mistakes, sync_arrival", [(ARGUMENT_MISTAKES, "call"), (REFUSALS, "future")],
                         ids=["arguments", "refusals"])  # fmt: skip
def test_the_same_mistake_is_the_same_error_arriving_the_same_way_on_every_face(face, mistakes, sync_arrival):
    try:
        for name, args, kwargs, error, words in mistakes:
            where, exc = arrival(face, name, *args, **kwargs)
            said = f"{type(face).__name__}.{name}{args}{kwargs}: {where} {exc!r}"
            assert where == ("await" if isinstance(face, AsyncSupervisorAPI) else sync_arrival), said
            assert type(exc) is error and words in str(exc), said
    finally:
        _stop(face)


@pytest.mark.daemon
def test_a_full_queue_fails_the_future_on_every_face(face):
    """Two sleeps hold the two places of the queue; a third job's Future
    fails with ``QueueFull``: on every face, as a client can only learn it
    from the daemon."""
    try:
        if isinstance(face, AsyncSupervisorAPI):

            async def overfill():
                held = [asyncio.ensure_future(face.submit("sleep", {"seconds": 0.5}, mode="diag")) for _ in range(2)]
                await asyncio.sleep(0)  # each task posts its job, then waits for it
                with pytest.raises(QueueFull, match="2 jobs|already has 2 jobs"):
                    await face.submit("echo", 1, mode="diag")
                return await asyncio.gather(*held)

            assert asyncio.run(asyncio.wait_for(overfill(), T)) == [{"slept": 0.5}] * 2
            return
        held = [face.submit("sleep", {"seconds": 0.5}, mode="diag") for _ in range(2)]
        refused = face.submit("echo", 1, mode="diag")  # not raised here: the Future says it
        with pytest.raises(QueueFull, match="2 jobs|already has 2 jobs"):
            refused.result(T)
        assert [f.result(T) for f in held] == [{"slept": 0.5}] * 2
    finally:
        _stop(face)


@pytest.mark.daemon
def test_a_refused_stream_ends_with_the_refusal_on_every_face(face):
    try:
        if isinstance(face, AsyncSupervisorAPI):

            async def read():
                stream = await face.submit("count", {"n": 2}, mode="nope", stream=True)
                return [chunk async for chunk in stream]

            with pytest.raises(UnknownMode, match="unknown mode 'nope'"):
                asyncio.run(asyncio.wait_for(read(), T))
            return
        stream = face.submit("count", {"n": 2}, mode="nope", stream=True)
        with pytest.raises(UnknownMode, match="unknown mode 'nope'"):
            list(stream)
    finally:
        _stop(face)


@pytest.mark.unit
def test_following_a_supervisor_shut_down_before_it_started_ends_with_shutting_down(tmp_path):
    """In process, as through a daemon: the events stream says why it ends,
    the call that opened it does not raise."""
    path = tmp_path / "gpuvisor.toml"
    path.write_text(CONFIG)
    sup = Supervisor(path)
    sup.shutdown()
    with sup.events() as events, pytest.raises(ShuttingDown):
        next(iter(events))

    async def follow():
        async_sup = AsyncSupervisor(path)
        await async_sup.shutdown()
        async with async_sup.events() as events:
            return [event async for event in events]

    with pytest.raises(ShuttingDown):
        asyncio.run(asyncio.wait_for(follow(), T))
