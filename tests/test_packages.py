"""Another distribution's package where ``supervisor``, ``worker`` or
``protocol`` should be: supervisord's PyPI distribution is called
``supervisor``. The ``gpuvisor`` command and the worker say which
distribution it is and what to do, instead of a bare ImportError.

For real: supervisord's own wheel (from the package index; those tests are
skipped, saying why, where it cannot be had) first on the path, and
installed over a real install of this checkout, whose console script then
runs. A package of the same name that no distribution installed, and a
foreign ``protocol`` for the worker, need no index."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, T

pytestmark = pytest.mark.process

SUPERVISORD = "supervisor==4.3.0"


def _setuptools_here() -> bool:
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= 77  # pyproject.toml's build requirement
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False


# Build with this environment's setuptools where it is new enough, else let pip fetch one.
BUILD_HERE = ("--no-build-isolation", "--no-index") if _setuptools_here() else ()


def run(argv: list[str], pythonpath: list[Path | str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=T)


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=2 * T)  # fmt: skip


@pytest.fixture(scope="module")
def supervisord_wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    got = pip("download", "--no-deps", "--timeout", "15", "--retries", "1", "-d", str(folder), SUPERVISORD)
    wheels = list(folder.glob("supervisor-*.whl"))
    if got.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {SUPERVISORD} from the package index: {got.stderr.strip()[-300:]}")
    return wheels[0]


def source_copy(tmp_path: Path) -> Path:
    """What the distributions are built from, copied: a build writes its
    build/ and egg-info folders beside the sources, never into the checkout."""
    source = tmp_path / "source"
    for name in ("gpuvisor", "protocol", "supervisor", "worker", "contrib/ray"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    return source


def wheel_of(folder: Path, out: Path) -> tuple[set[str], str]:
    """The files of the wheel pip builds from ``folder``, and its METADATA."""
    built = pip("wheel", "--no-deps", *BUILD_HERE, "-w", str(out), str(folder))
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        return names, z.read(metadata).decode()


def test_the_wheels_carry_the_license_and_the_urls_and_only_the_ray_one_has_gpuvisor_ray(tmp_path):
    """gpuvisor's own wheel installs no Ray code (it would fail to import
    without Ray); gpuvisor-ray, built from contrib/ray, carries it and needs
    Ray Serve and gpuvisor."""
    source = source_copy(tmp_path)
    names, metadata = wheel_of(source, tmp_path / "core")
    assert not [name for name in names if name.startswith("gpuvisor_ray")], sorted(names)
    assert {"supervisor/default.toml", "worker/modes/generate.py", "gpuvisor-0.1.0.dist-info/licenses/LICENSE"} <= names
    lines = metadata.splitlines()
    assert "License-Expression: MIT" in lines and "License-File: LICENSE" in lines
    for url in ("Homepage, https://github.com/gpuvisor/gpuvisor",
                "Documentation, https://github.com/gpuvisor/gpuvisor/tree/main/docs",
                "Source, https://github.com/gpuvisor/gpuvisor", "Issues, https://github.com/gpuvisor/gpuvisor/issues"):  # fmt: skip
        assert f"Project-URL: {url}" in lines, metadata[:2000]
    assert "Description-Content-Type: text/markdown" in lines and "# gpuvisor" in metadata
    assert not [line for line in lines if "ray" in line.lower() and line.startswith(("Requires-Dist", "Provides"))]

    names, metadata = wheel_of(source / "contrib" / "ray", tmp_path / "ray")
    assert {
        "gpuvisor_ray/__init__.py",
        "gpuvisor_ray/py.typed",
        "gpuvisor_ray-0.1.0.dist-info/licenses/LICENSE",
    } <= names
    assert not [name for name in names if name.startswith(("supervisor/", "worker/"))]
    lines = metadata.splitlines()
    assert "Name: gpuvisor-ray" in lines and "Requires-Dist: gpuvisor" in lines
    assert "Requires-Dist: ray[serve]>=2.9" in lines and "License-Expression: MIT" in lines


def test_a_sound_checkout_starts(tmp_path):
    done = run([sys.executable, "-m", "gpuvisor", "--version"], [ROOT], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("gpuvisor "), done.stderr


def test_supervisord_first_on_the_path_is_named_with_the_fix(tmp_path, supervisord_wheel):
    site = tmp_path / "site"
    installed = pip("install", "--no-deps", "--no-index", "--target", str(site), str(supervisord_wheel))
    assert installed.returncode == 0, installed.stderr
    done = run([sys.executable, "-m", "gpuvisor", "status"], [site, ROOT], tmp_path)
    assert done.returncode == 6, done.stderr
    assert "Traceback" not in done.stderr
    assert f"the package 'supervisor' that Python imports, {site / 'supervisor'}, is not gpuvisor's" in done.stderr
    assert "the distribution 'supervisor' 4.3.0 installs a package named 'supervisor' too" in done.stderr
    assert "install gpuvisor in a virtual environment of its own" in done.stderr


def test_supervisord_installed_over_a_real_install_of_gpuvisor_is_named_with_the_fix(tmp_path, supervisord_wheel):
    """pip writes supervisord's files into the same site-packages, over our
    supervisor/__init__.py: the console script still imports, but what it
    imports is no longer ours. The install is this checkout, built and
    installed (not editable) under a prefix of its own."""
    source = source_copy(tmp_path)
    prefix = tmp_path / "prefix"
    # -I: without it, pip installing under a prefix uninstalls the gpuvisor of the environment it runs in.
    built = pip("install", "--no-deps", "-I", *BUILD_HERE, "--prefix", str(prefix), str(source))
    assert built.returncode == 0, built.stderr
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    console_script = [str(prefix / "bin" / "gpuvisor")]
    sound = run([*console_script, "--version"], [site], tmp_path)
    assert sound.returncode == 0 and sound.stdout.startswith("gpuvisor "), sound.stderr
    over = pip("install", "--no-deps", "-I", "--no-index", "--prefix", str(prefix), str(supervisord_wheel))
    assert over.returncode == 0, over.stderr
    done = run([*console_script, "status"], [site], tmp_path)
    assert done.returncode == 6, done.stderr
    assert "Traceback" not in done.stderr
    assert f"gpuvisor's package 'supervisor' in {site / 'supervisor'} had its __init__.py written over" in done.stderr
    assert "the distribution 'supervisor' 4.3.0" in done.stderr and "virtual environment of its own" in done.stderr


@pytest.fixture(autouse=True)
def this_environment_keeps_its_gpuvisor():
    """The installs above go under a prefix or a target of their own: the
    environment that runs the tests must still have its gpuvisor after."""
    before = _installed_here()
    yield
    assert _installed_here() == before, "a test's pip command changed the gpuvisor of the environment running it"


def _installed_here() -> str | None:
    try:
        return str(importlib.metadata.distribution("gpuvisor").locate_file(""))
    except importlib.metadata.PackageNotFoundError:
        return None


def test_a_folder_of_the_same_name_that_no_distribution_installed(tmp_path):
    stray = tmp_path / "stray"
    (stray / "supervisor").mkdir(parents=True)
    (stray / "supervisor" / "__init__.py").write_text("# someone else's\n")
    done = run([sys.executable, "-m", "gpuvisor", "status"], [stray, ROOT], tmp_path)
    assert done.returncode == 6 and "Traceback" not in done.stderr, done.stderr
    assert f"the package 'supervisor' that Python imports, {stray / 'supervisor'}, is not gpuvisor's" in done.stderr
    assert "it belongs to no installed distribution" in done.stderr


def test_the_worker_says_so_too_before_it_connects(tmp_path):
    stray = tmp_path / "stray"
    (stray / "protocol").mkdir(parents=True)
    (stray / "protocol" / "__init__.py").write_text("")
    argv = [sys.executable, "-P", "-m", "worker", "--endpoint", "ipc:///nonexistent/w.sock", "--gen", "1",
            "--parent-pid", str(os.getpid())]  # fmt: skip
    done = run(argv, [stray, ROOT], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(
        f"gpuvisor worker: cannot start: the package 'protocol' that Python imports, {stray / 'protocol'}, "
        "is not gpuvisor's"
    )
