"""One API, two faces: ``Supervisor`` and ``Client`` keep the sync face,
``AsyncSupervisor`` and ``AsyncClient`` the async one, method for method,
with the same signatures. And a client process loads nothing of the
engine."""

from __future__ import annotations

import inspect

import pytest

from supervisor import AsyncSupervisor, Supervisor
from supervisor.client import AsyncClient, Client
from supervisor.surface import AsyncSupervisorAPI, SupervisorAPI
from tests.helpers import run_python


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
