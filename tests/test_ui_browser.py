"""The status page in a real browser: Debian's Chromium, headless, driven
by Selenium through chromedriver, against a real ``gpuvisor serve`` on a
loopback TCP port with a token file and an admin token file.

What only a browser shows: that the page runs under its own
Content-Security-Policy without a console error, that the token cookie
admits its polls and its POSTs, and that what the daemon does (a switch
from the command line, a switch that fails, an operator's click) reaches
the page within its polling. Every wait is a ``WebDriverWait`` on what the
page shows, never a timed assertion.

The browser lives for the module (it takes a second or two to start) and
is always quit, and its processes are checked gone, at the module's end;
each case unloads the worker it started, so the conftest's check that no
process is left holds for the daemon's workers too. The screenshot goes to
a temporary folder unless ``GPUVISOR_UI_SCREENSHOT`` names a file (the one
in docs/img/ui.png was made that way), so the suite never writes into the
repository."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import T, repo_pythonpath, wait_until
from tests.helpers.config import DIAG
from tests.helpers.daemon import GPUVISOR, free_port, serving
from tests.test_http import http_config

pytestmark = pytest.mark.daemon

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (`make test` installs them with apt-get as root)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")

from selenium.webdriver.common.by import By  # noqa: E402 - after the skip: absent without the dev extra
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"
PLAIN, ADMIN = "a-plain-token-for-the-browser", "an-admin-token-for-the-browser"
BROKEN = "tests.helpers.loaders:raises"  # a loader that raises: its switch fails
ARGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    for name, token in (("tokens", PLAIN), ("admins", ADMIN)):
        (folder / name).write_text(f"{token}\n")
        (folder / name).chmod(0o600)
    text = http_config(
        {"a": DIAG, "b": DIAG, "broken": BROKEN},
        {"m": {"mode": "a", "completions": "echo"}},
        http={"listen": [f"127.0.0.1:{PORT}"], "token_file": str(folder / "tokens"),
              "admin_token_file": str(folder / "admins"), "access_log": False},
        supervisor={"default_mode": "a", "warm_standby": False},
    )  # fmt: skip
    with serving(text, "a") as d:
        yield d


def _browser_processes() -> list[psutil.Process]:
    """Chromium's and chromedriver's processes among this test process's descendants."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "chrom" in p.name():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for arg in ARGS:
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        wait_until(lambda: not _browser_processes(), T, "chromium and chromedriver to be gone after quit")


@pytest.fixture(autouse=True)
def no_leftover_children(browser):
    """The conftest's check that a case reaps what it started, less the
    browser's processes: the browser is the module's, Chromium starts and
    ends renderers as it pleases, and ``browser`` checks they are all gone
    once it quits."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def left() -> list[psutil.Process]:
        theirs = {p.pid for p in _browser_processes()}
        return [p for p in me.children(recursive=True) if p.pid not in before and p.pid not in theirs]

    wait_until(lambda: not left(), 10.0, "the case's child processes to be reaped")


@pytest.fixture
def unload_after(daemon):
    """Unload the worker a case started, so none is left at its end."""
    yield
    with daemon.client() as c:
        c.unload().result(T)
        wait_until(lambda: all(d["worker_pid"] is None for d in c.status()["devices"]), T, "the worker to be gone")


def gpuvisor(daemon, *args: str) -> subprocess.CompletedProcess:
    """The console script, as an operator runs it beside the page."""
    argv = [GPUVISOR, "--endpoint", daemon.endpoint, *args]
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=T)


def open_page(driver, token: str) -> None:
    """A fresh visit: no cookie, then the link an operator is given, then the first picture drawn."""
    driver.delete_all_cookies()
    driver.get(f"{BASE}/ui?token={token}")
    assert driver.current_url == f"{BASE}/ui", "the token left the address"
    shows(driver, lambda d: d.find_element(By.ID, "updated").get_attribute("data-at"), "the first picture")


def shows(driver, predicate, what: str):
    return WebDriverWait(driver, T, poll_frequency=0.1).until(predicate, f"the page to show {what}")


def field(driver, device: str, name: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'.device[data-device="{device}"] [data-field="{name}"] dd').text


def first_switch(driver, **attrs: str):
    """The newest switch in the timeline with these data attributes, or None."""
    selector = ".switch" + "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
    found = driver.find_elements(By.CSS_SELECTOR, f"#switches {selector}")
    return found[0] if found else None


def test_the_page_loads_without_a_console_error_and_shows_the_device(daemon, browser):
    open_page(browser, PLAIN)
    shows(browser, lambda d: field(d, "cpu", "mode") == "a", "the cpu card in mode a")
    assert browser.find_element(By.ID, "state").text == "running"
    assert browser.find_element(By.ID, "banner").is_displayed() is False
    assert field(browser, "cpu", "worker_state") in ("ready", "idle")
    assert browser.find_elements(By.CSS_SELECTOR, '.memory[data-device="cpu"] svg')
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_a_switch_from_the_command_line_reaches_the_page_with_its_phases(daemon, browser, unload_after):
    open_page(browser, PLAIN)
    done = gpuvisor(daemon, "switch", "b")
    assert done.returncode == 0, done.stderr
    shows(browser, lambda d: field(d, "cpu", "mode") == "b", "mode b on cpu")
    switch = shows(browser, lambda d: first_switch(d, mode="b", outcome="ready"), "the switch to b in the timeline")
    phases = [s.get_attribute("data-phase") for s in switch.find_elements(By.CSS_SELECTOR, ".bar .seg")]
    assert {"spawn", "load"} <= set(phases), phases
    assert all(s.size["width"] >= 1 for s in switch.find_elements(By.CSS_SELECTOR, ".bar .seg"))
    assert "from a" in switch.text


def test_a_failed_switch_shows_as_failed_and_among_the_errors(daemon, browser):
    open_page(browser, PLAIN)
    done = gpuvisor(daemon, "switch", "broken")
    assert done.returncode != 0 and "this loader fails on purpose" in done.stderr
    failed = shows(browser, lambda d: first_switch(d, mode="broken", outcome="failed"), "the failed switch")
    assert "this loader fails on purpose" in failed.find_element(By.CSS_SELECTOR, ".switch-error").text
    assert failed.find_elements(By.CSS_SELECTOR, '.seg[data-phase="failed"]')
    error = shows(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#errors .error[data-mode="broken"]'),
                  "the failure among the errors")  # fmt: skip
    assert "switch to 'broken' failed" in error[0].text


def test_only_an_operator_gets_the_buttons_and_a_click_switches(daemon, browser, unload_after):
    open_page(browser, PLAIN)
    assert browser.find_elements(By.CSS_SELECTOR, "[data-action], .actions, select") == []
    open_page(browser, ADMIN)
    actions = shows(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '.actions[data-device="cpu"]'), "the buttons")
    box = actions[0]
    assert {b.get_attribute("data-action") for b in box.find_elements(By.TAG_NAME, "button")} == {
        "switch", "restart", "unload"}  # fmt: skip
    choice = Select(box.find_element(By.TAG_NAME, "select"))
    assert [o.get_attribute("value") for o in choice.options] == ["a", "b", "broken"]
    choice.select_by_value("b")
    box.find_element(By.CSS_SELECTOR, '[data-action="switch"]').click()
    shows(browser, lambda d: field(d, "cpu", "mode") == "b", "mode b after the click")
    answer = shows(browser, lambda d: box.find_element(By.CLASS_NAME, "answer").get_attribute("data-state") == "ok"
                   and box.find_element(By.CLASS_NAME, "answer").text, "the switch's answer")  # fmt: skip
    assert answer.startswith("b: loaded"), answer
    with daemon.client() as c:
        assert c.status()["mode"] == "b"


def test_a_screenshot_of_a_page_with_something_to_show(daemon, browser, unload_after, tmp_path):
    """Work in flight and waiting, the worker's memory drawn, beside the
    switches and the failure of the cases before:
    ``GPUVISOR_UI_SCREENSHOT=docs/img/ui.png`` keeps it."""
    target = Path(os.environ.get("GPUVISOR_UI_SCREENSHOT") or tmp_path / "ui.png")
    open_page(browser, ADMIN)
    with daemon.client() as c:
        for i in range(5):
            c.submit("echo", i, mode="a").result(T)
        shows(browser, lambda d: "L" in (line(d) or ""), "a line of the worker's memory")  # two samples, 2 s apart
        running = c.submit("sleep", {"seconds": 2}, mode="a")
        waiting = [c.submit("echo", i, mode="b") for i in range(3)]
        shows(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#queue tr[data-mode="b"]'), "the jobs for b waiting")
        shows(browser, lambda d: field(d, "cpu", "in_flight") == "1", "the job in flight")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target)), target
        running.result(T)
        for job in waiting:
            job.result(T)
    assert target.stat().st_size > 10_000


def line(driver) -> str | None:
    """The path of the cpu worker's RSS in its chart, or None."""
    found = driver.find_elements(By.CSS_SELECTOR, '.memory[data-device="cpu"] path[data-kind="rss"]')
    return found[0].get_attribute("d") if found else None
