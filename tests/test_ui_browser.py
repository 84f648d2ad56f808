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
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.helpers import T, repo_pythonpath, wait_until
from tests.helpers.config import DIAG, secret_file
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
MARKUP = "<img id=injected src=x>"  # in an error the page shows: text, or an element if it were parsed
ARGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    secret_file(folder / "tokens", PLAIN)
    secret_file(folder / "admins", ADMIN)
    trap = folder / MARKUP  # its loader refuses to load while it exists, and names it in its error
    trap.write_text("")
    markup = {"loader": "tests.helpers.loaders:fails_while_file_exists", "args": {"path": str(trap)}}
    text = http_config(
        {"a": DIAG, "b": DIAG, "broken": BROKEN, "markup": markup},
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
    shows(driver, lambda d: read(d, "#updated", "data-at"), "the first picture")


def shows(driver, predicate, what: str):
    return WebDriverWait(driver, T, poll_frequency=0.1).until(predicate, f"the page to show {what}")


# The page redraws once a second, so an element found now may be replaced
# before the next call reads it: what a case reads, it reads in one script.
_READ = """
const [selector, attr] = arguments;
const e = document.querySelector(selector);
return e === null ? null : attr === null ? e.textContent : e.getAttribute(attr);
"""
_SWITCH = """
const e = document.querySelector(arguments[0]);
if (e === null) return null;
const error = e.querySelector(".switch-error");
return {
  text: e.textContent,
  error: error && error.textContent,
  segments: [...e.querySelectorAll(".bar .seg")].map((s) => [s.dataset.phase, s.getBoundingClientRect().width]),
};
"""


def read(driver, selector: str, attr: str | None = None) -> str | None:
    """The text (or ``attr``) of the first element ``selector`` finds, or None."""
    return driver.execute_script(_READ, selector, attr)


def field(driver, device: str, name: str) -> str | None:
    return read(driver, f'.device[data-device="{device}"] [data-field="{name}"] dd')


def newest_switch(driver, **attrs: str) -> dict | None:
    """The newest switch in the timeline with these data attributes: its
    text, error and segments (phase, width in pixels); or None."""
    selector = "#switches .switch" + "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
    return driver.execute_script(_SWITCH, selector)


def test_the_page_loads_without_a_console_error_and_shows_the_device(daemon, browser):
    open_page(browser, PLAIN)
    shows(browser, lambda d: field(d, "cpu", "mode") == "a", "the cpu card in mode a")
    assert read(browser, "#state") == "running" and read(browser, "#state", "data-state") == "running"
    assert read(browser, "#banner", "hidden") is not None
    assert field(browser, "cpu", "worker_state") in ("ready", "idle")
    assert read(browser, '.memory[data-device="cpu"] svg', "role") == "img"
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_a_switch_from_the_command_line_reaches_the_page_with_its_phases(daemon, browser, unload_after):
    open_page(browser, PLAIN)
    done = gpuvisor(daemon, "switch", "b")
    assert done.returncode == 0, done.stderr
    shows(browser, lambda d: field(d, "cpu", "mode") == "b", "mode b on cpu")
    switch = shows(browser, lambda d: newest_switch(d, mode="b", outcome="ready"), "the switch to b in the timeline")
    phases = dict(switch["segments"])
    assert {"spawn", "load"} <= set(phases), switch
    assert all(width >= 1 for width in phases.values()), switch
    assert "from a" in switch["text"] and switch["error"] is None


def test_a_failed_switch_shows_as_failed_and_among_the_errors(daemon, browser):
    open_page(browser, PLAIN)
    done = gpuvisor(daemon, "switch", "broken")
    assert done.returncode != 0 and "this loader fails on purpose" in done.stderr
    failed = shows(browser, lambda d: newest_switch(d, mode="broken", outcome="failed"), "the failed switch")
    assert "this loader fails on purpose" in failed["error"]
    assert [phase for phase, _ in failed["segments"]][-1:] == ["failed"], failed
    error = shows(browser, lambda d: read(d, '#errors .error[data-mode="broken"]'), "the failure among the errors")
    assert "switch to 'broken' failed" in error


def test_only_an_operator_gets_the_buttons_and_a_click_switches(daemon, browser, unload_after):
    open_page(browser, PLAIN)
    assert browser.find_elements(By.CSS_SELECTOR, "[data-action], .actions, select") == []
    open_page(browser, ADMIN)
    # The controls are kept across redraws (a chosen mode stays chosen), so these references hold.
    box = shows(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '.actions[data-device="cpu"]'), "the buttons")[0]
    assert {b.get_attribute("data-action") for b in box.find_elements(By.TAG_NAME, "button")} == {
        "switch", "restart", "unload"}  # fmt: skip
    select = box.find_element(By.TAG_NAME, "select")
    choice = Select(select)
    assert [o.get_attribute("value") for o in choice.options] == ["a", "b", "broken", "markup"]
    choice.select_by_value("b")
    assert click(browser, box, "switch", "ok").startswith("b: loaded")
    shows(browser, lambda d: field(d, "cpu", "mode") == "b", "mode b after the click")
    with daemon.client() as c:
        assert c.status()["mode"] == "b"
    assert click(browser, box, "unload", "ok").startswith("unloaded b (pid ")
    shows(browser, lambda d: field(d, "cpu", "worker_state") == "none", "no worker after the unload")
    # A mode a reload removed after the page drew its list: the daemon's refusal is shown as it said it.
    browser.execute_script("arguments[0].add(new Option('gone', 'gone', true, true))", select)
    assert "gone" in click(browser, box, "switch", "error"), "the error body's message"


def click(driver, box, action: str, outcome: str) -> str:
    """Click an operator's button; the answer the page shows once it came."""
    answer = box.find_element(By.CLASS_NAME, "answer")
    box.find_element(By.CSS_SELECTOR, f'[data-action="{action}"]').click()
    return shows(driver, lambda d: answer.get_attribute("data-state") == outcome and answer.text, f"{action}'s answer")


def test_a_browser_whose_cookie_is_gone_is_told_how_to_come_back(daemon, browser):
    open_page(browser, PLAIN)
    browser.delete_all_cookies()  # as when the token is taken out of the token file: the polls get a 401
    banner = shows(browser, lambda d: read(d, "#banner", "hidden") is None and read(d, "#banner"), "the banner")
    assert "/ui?token=TOKEN" in banner
    assert read(browser, "body", "class") == "stale"


def test_a_screenshot_of_a_page_with_something_to_show(daemon, browser, unload_after, tmp_path):
    """Work in flight and waiting, the worker's memory drawn, beside the
    switches and the failure of the cases before:
    ``GPUVISOR_UI_SCREENSHOT=docs/img/ui.png`` keeps it."""
    kept = os.environ.get("GPUVISOR_UI_SCREENSHOT")
    target = Path(kept or tmp_path / "ui.png")
    samples = 8 if kept else 2  # a sample every 2 s: the picture for the docs waits for a longer line
    open_page(browser, ADMIN)
    rss = '.memory[data-device="cpu"] path[data-kind="rss"]'
    with daemon.client() as c:
        for i in range(5):
            c.submit("echo", i, mode="a").result(T)
        shows(browser, lambda d: (read(d, rss, "d") or "").count("L") >= samples - 1, "a line of the worker's memory")
        running = c.submit("sleep", {"seconds": 2}, mode="a")
        waiting = [c.submit("echo", i, mode="b") for i in range(3)]
        shows(browser, lambda d: read(d, '#queue tr[data-mode="b"]'), "the jobs for b waiting")
        shows(browser, lambda d: field(d, "cpu", "in_flight") == "1", "the job in flight")
        target.parent.mkdir(parents=True, exist_ok=True)
        size = browser.get_window_size()
        browser.set_window_size(1280, 1200)  # the timeline's first few and the errors too
        try:
            assert browser.save_screenshot(str(target)), target
        finally:
            browser.set_window_size(size["width"], size["height"])
        running.result(T)
        for job in waiting:
            job.result(T)
    assert target.stat().st_size > 10_000


def test_what_the_daemon_says_is_shown_as_text_never_run_as_markup(daemon, browser):
    """An error can carry anything a loader or a path holds; the page
    writes it as text. (Last: its error is no sight for the screenshot.)"""
    open_page(browser, PLAIN)
    assert gpuvisor(daemon, "switch", "markup").returncode != 0
    failed = shows(browser, lambda d: newest_switch(d, mode="markup", outcome="failed"), "the failed switch")
    assert f"{MARKUP} exists" in failed["error"]
    assert MARKUP in shows(browser, lambda d: read(d, '#errors .error[data-mode="markup"]'), "the error listed")
    assert browser.execute_script("return document.getElementById('injected')") is None
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []


def test_a_draining_daemon_shows_as_draining_then_as_gone(daemon, browser):
    """Last: it stops the module's daemon, as systemd does (SIGTERM: finish
    the queue, then exit)."""
    open_page(browser, PLAIN)
    with daemon.client() as c:
        job = c.submit("sleep", {"seconds": 3}, mode="a")
        shows(browser, lambda d: field(d, "cpu", "in_flight") == "1", "the job in flight")
        daemon.proc.send_signal(signal.SIGTERM)
        shows(browser, lambda d: read(d, "#state", "data-state") == "draining", "the daemon draining")
        assert "draining" in read(browser, "#banner")
        assert job.result(T) == {"slept": 3}, "the drain let the job finish"
    assert daemon.wait() == 0
    banner = shows(browser, lambda d: "does not answer" in (read(d, "#banner") or "") and read(d, "#banner"), "gone")
    assert "Trying again" in banner and read(browser, "body", "class") == "stale"
