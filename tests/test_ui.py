"""The status page's routes (``/ui``, its two files, ``/v1/glance``)
through a real ``gpuvisor serve``, as a browser meets them but without one:
the token that comes once in the address and stays as a cookie no script
and no other site can use, the page's files under a policy that runs
nothing but them, and nothing else served from their folder. The browser
itself drives the page in ``test_ui_browser.py``; here each header is read
exactly as it came, so a request goes out as written (``http.client``
neither follows a redirect nor tidies a path)."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, secret_file
from tests.helpers.daemon import free_port, serving
from tests.test_http import curl, http_config, http_socket

pytestmark = pytest.mark.daemon

PORT = free_port()
PLAIN, ADMIN = "a-plain-token-for-the-page", "an-admin-token-for-the-page"
UI = Path(__file__).resolve().parents[1] / "supervisor" / "service" / "http" / "page"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    secret_file(folder / "tokens", PLAIN)
    secret_file(folder / "admins", ADMIN)
    text = http_config(
        {"diag": DIAG, "other": DIAG},
        {"echo": {"mode": "diag", "completions": "echo"}},
        http={"listen": [f"127.0.0.1:{PORT}"], "token_file": str(folder / "tokens"),
              "admin_token_file": str(folder / "admins")},
        supervisor={"default_mode": "diag", "warm_standby": False},
    )  # fmt: skip
    with serving(text, "diag") as d:
        yield d


class Answer:
    def __init__(self, response: http.client.HTTPResponse):
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    def json(self) -> Any:
        return json.loads(self.body)


def request(path: str, *, method: str = "GET", cookie: str | None = None, body: Any = None,
            headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
    """One request to the TCP listener, sent as written: the path
    untouched, no redirect followed, the cookie only where given."""
    sent = dict(headers or {})
    if cookie is not None:
        sent["Cookie"] = f"gpuvisor_token={cookie}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=T)
    try:
        conn.request(method, path, body=data, headers=sent)
        return Answer(conn.getresponse())
    finally:
        conn.close()


def test_without_a_good_token_the_page_is_a_401(served):
    for path in ("/ui", "/ui?token=not-a-token-of-this-daemon", "/ui?token=", "/ui/app.js", "/v1/glance"):
        got = request(path)
        assert got.status == 401, (path, got.body)
        assert got.json()["error"]["code"] == "invalid_api_key"
        assert "set-cookie" not in got.headers, path
    assert request("/ui/style.css", cookie="not-a-token-of-this-daemon").status == 401


def test_a_good_token_in_the_address_becomes_a_cookie_no_script_or_other_site_sees(served):
    for token in (PLAIN, ADMIN):
        got = request(f"/ui?token={token}")
        assert got.status == 303, got.body
        assert got.headers["location"] == "/ui", "the address bar (and history) lose the token"
        assert got.headers["cache-control"] == "no-store"
        name, _, rest = got.headers["set-cookie"].partition("=")
        value, *flags = [part.strip() for part in rest.split(";")]
        assert (name, value) == ("gpuvisor_token", token)
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(flags), flags


@pytest.mark.parametrize(
    "path, media",
    [("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")],
)
def test_with_the_cookie_the_page_and_its_files_come_under_a_strict_policy(served, path, media):
    got = request(path, cookie=PLAIN)
    assert got.status == 200
    assert got.headers["content-type"] == f"{media}; charset=utf-8"
    policy = {
        part.strip().partition(" ")[0]: part.strip() for part in got.headers["content-security-policy"].split(";")
    }
    assert policy["default-src"] == "default-src 'none'"
    assert policy["script-src"] == "script-src 'self'" and policy["style-src"] == "style-src 'self'"
    assert policy["connect-src"] == "connect-src 'self'" and policy["frame-ancestors"] == "frame-ancestors 'none'"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.body == (UI / ("index.html" if path == "/ui" else path.rsplit("/", 1)[1])).read_bytes()


def test_the_page_holds_no_inline_script_or_style_and_builds_no_markup_from_data():
    """What the policy would refuse in a browser, refused here first: a
    ``<script>`` without ``src``, a ``<style>`` block, a ``style``
    attribute, an inline handler. And the script never parses markup (a
    mode's name is the operator's to choose and goes in as text)."""
    page = (UI / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts == ['<script src="/ui/app.js" defer>'], scripts
    assert "<style" not in page and not re.search(r"\sstyle=", page) and not re.search(r"\son[a-z]+=", page)
    assert re.findall(r'(?:href|src)="([^"]+)"', page) == ["data:,", "/ui/style.css", "/ui/app.js"]
    script = (UI / "app.js").read_text()
    for markup in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert markup not in script, markup
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", ""), "nothing fetched from elsewhere"


@pytest.mark.parametrize(
    "path", ["/ui/../x", "/ui/..%2fui.py", "/ui/%2e%2e/ui.py", "/ui/ui.py", "/ui/index.htm", "/ui/app.js.map"]
)
def test_nothing_but_the_pages_files_is_served_from_its_folder(served, path):
    got = request(path, cookie=PLAIN)
    assert got.status == 404, (path, got.body)
    assert b"add_routes" not in got.body


def test_glance_says_whether_the_caller_is_an_operator(served):
    plain, admin = request("/v1/glance", cookie=PLAIN), request("/v1/glance", cookie=ADMIN)
    assert plain.status == admin.status == 200
    assert plain.headers["cache-control"] == "no-store"
    assert plain.json()["operator"] is False and admin.json()["operator"] is True
    shown = plain.json()
    assert shown["state"] == "running" and shown["modes"] == ["diag", "other"]
    assert [d["name"] for d in shown["devices"]] == ["cpu"] and shown["devices"][0]["mode"] == "diag"
    bearer = request("/v1/glance", headers={"Authorization": f"Bearer {ADMIN}"})
    assert bearer.json()["operator"] is True, "the cookie stands for the bearer header, and no more"


def test_another_sites_page_cannot_use_the_cookie_but_the_pages_own_can(served):
    order = {"mode": "diag"}
    evil = request("/v1/admin/switch", method="POST", cookie=ADMIN, body=order,
                   headers={"Origin": "http://evil.example"})  # fmt: skip
    assert evil.status == 403 and "evil.example" in evil.json()["error"]["message"]
    blind = request("/v1/admin/switch", method="POST", cookie=ADMIN, body=order,
                    headers={"Sec-Fetch-Site": "cross-site"})  # fmt: skip
    assert blind.status == 403
    form = request("/v1/admin/switch", method="POST", cookie=ADMIN, body=order,
                   headers={"Content-Type": "text/plain"})  # fmt: skip
    assert form.status == 415, "a form another page posts cannot say JSON"
    own = {"Origin": f"http://127.0.0.1:{PORT}", "Sec-Fetch-Site": "same-origin"}
    plain = request("/v1/admin/switch", method="POST", cookie=PLAIN, body=order, headers=own)
    assert plain.status == 403 and plain.json()["error"]["code"] == "forbidden"
    admin = request("/v1/admin/switch", method="POST", cookie=ADMIN, body=order, headers=own)
    assert admin.status == 200 and admin.json()["status"] == "already_loaded", admin.body


def test_the_access_log_shows_the_page_opened_but_never_the_token(served):
    assert request(f"/ui?token={PLAIN}").status == 303
    line = wait_until(lambda: next((x for x in served.output().splitlines() if "HTTP GET /ui 303" in x), None), T,
                      "the access log's line for /ui?token=")  # fmt: skip
    assert "?" not in line and "token=" not in line, line
    output = served.output()
    assert PLAIN not in output and ADMIN not in output


def test_on_a_unix_socket_without_tokens_the_page_is_open_and_its_user_an_operator():
    """The socket's mode and the peer's uid keep strangers out there, so no
    token is asked; the daemon's own user is an operator."""
    text = http_config({"diag": DIAG}, {}, supervisor={"warm_standby": False})
    with serving(text) as d:
        unix = http_socket(d)
        status, page = curl("http://gpuvisor/ui", unix=unix)
        assert status == 200 and '<script src="/ui/app.js" defer>' in page
        assert curl("http://gpuvisor/ui/style.css", unix=unix)[0] == 200
        status, shown = curl("http://gpuvisor/v1/glance", unix=unix)
        assert status == 200 and shown["operator"] is True and shown["state"] == "running"
