"""The operator's HTTP routes (``/v1/admin/...``) through a real ``gpuvisor
serve`` whose door wants a token on every address: open to a token of
``admin_token_file`` anywhere, and on the unix socket to the daemon's own
user (this test's); refused to a plain token on TCP, and to no token at all.
The access log is off here: no request line is written, while what an
operator did still is."""

from __future__ import annotations

import pytest

from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, secret_file
from tests.helpers.daemon import free_port, serving
from tests.test_http import assert_error, curl, http_config, http_socket

pytestmark = pytest.mark.daemon

PORT = free_port()
PLAIN, ADMIN = "a-plain-token-for-jobs-only", "an-admin-token-for-operators"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("admin")
    secret_file(folder / "tokens", PLAIN)
    secret_file(folder / "admins", ADMIN)
    text = http_config(
        {"diag": DIAG, "other": DIAG, "broken": {"loader": DIAG, "args": {"layers": 1}}},  # diag takes no arguments
        {"echo": {"mode": "diag", "completions": "echo"}},
        http={"listen": ["unix:http.sock", f"127.0.0.1:{PORT}"], "token_file": str(folder / "tokens"),
              "admin_token_file": str(folder / "admins"), "access_log": False},
        supervisor={"default_mode": "diag", "warm_standby": False},
    )  # fmt: skip
    with serving(text, "diag") as d:
        yield d


TCP = f"http://127.0.0.1:{PORT}"


def test_only_an_admin_token_opens_the_admin_routes_on_tcp(served):
    for token, status, code in ((None, 401, "invalid_api_key"), (PLAIN, 403, "forbidden")):
        for path, body in (("status", None), ("switch", {"mode": "other"}), ("unload", {}), ("reload", {})):
            got, answer = curl(f"{TCP}/v1/admin/{path}", body, token=token)
            assert got == status, (path, token, answer)
            assert_error(answer, status, code)
    got, answer = curl(f"{TCP}/v1/admin/status", token=ADMIN)
    assert got == 200 and answer["mode"] == "diag" and answer["state"] == "running"
    assert curl(f"{TCP}/v1/models", token=ADMIN)[0] == 200, "an admin token is a token for the other routes too"


def test_the_daemons_own_user_is_an_operator_on_the_unix_socket(served):
    unix = http_socket(served)
    assert curl("http://gpuvisor/v1/admin/status", unix=unix)[0] == 401, "the door still wants a token"
    got, answer = curl("http://gpuvisor/v1/admin/status", unix=unix, token=PLAIN)
    assert got == 200 and answer["mode"] == "diag"


def test_switch_restart_and_unload_answer_what_the_supervisor_did(served):
    for path, body, status, code, words in (
        ("switch", {"mode": "no-such-mode"}, 404, "unknown_mode", "no-such-mode"),
        ("switch", {"mode": "diag", "device": "cuda:7"}, 400, None, "unknown device 'cuda:7'"),
        ("switch", {}, 400, None, "mode: Field required"),
        ("restart", {"mode": "diag", "force": True}, 400, None, "force: Extra inputs are not permitted"),
        ("unload", {"device": 3}, 400, None, "device"),
    ):
        got, answer = curl(f"{TCP}/v1/admin/{path}", body, token=ADMIN)
        assert got == status, (path, body, answer)
        assert_error(answer, status, code, words)
    got, switched = curl(f"{TCP}/v1/admin/switch", {"mode": "other"}, token=ADMIN)
    assert got == 200 and switched["mode"] == "other" and switched["status"] == "loaded"
    got, again = curl(f"{TCP}/v1/admin/switch", {"mode": "other"}, token=ADMIN)
    assert again == {"mode": "other", "status": "already_loaded", "pid": switched["pid"]}
    got, restarted = curl(f"{TCP}/v1/admin/restart", {}, token=ADMIN)
    assert got == 200 and restarted["status"] == "restarted" and restarted["pid"] != switched["pid"]
    # Last: the worker this case started is gone at its end, as every case's processes must be.
    got, unloaded = curl(f"{TCP}/v1/admin/unload", {}, token=ADMIN)
    assert got == 200 and unloaded["unloaded"] == [{"device": "cpu", "mode": "other", "pid": restarted["pid"]}]
    with served.client() as c:
        wait_until(lambda: c.status()["worker_pid"] is None, T, "the unloaded worker to be gone")


def test_reload_answers_what_changed(served):
    assert served.config is not None
    with open(served.config, "a") as f:
        f.write('[modes.added]\nloader = "worker.modes.diag:load"\n')
    got, report = curl(f"{TCP}/v1/admin/reload", {}, token=ADMIN)
    assert got == 200 and report["reloaded"] is True and report["added"] == ["added"], report
    assert report["error"] is None and report["removed"] == []


def test_operators_acts_are_logged_without_the_token_and_requests_are_not_when_the_access_log_is_off(served):
    assert curl(f"{TCP}/v1/admin/switch", {"mode": "not-a-mode"}, token=ADMIN)[0] == 404
    line = wait_until(lambda: next((x for x in served.output().splitlines() if "not-a-mode" in x), None), T,
                      "the operator's line")  # fmt: skip
    assert line.endswith("HTTP admin switch (admin 1): to not-a-mode"), line
    output = served.output()
    assert ADMIN not in output and PLAIN not in output
    assert "HTTP GET" not in output and "HTTP POST" not in output


def test_a_switch_that_fails_tells_the_operator_why(served):
    got, answer = curl(f"{TCP}/v1/admin/switch", {"mode": "broken"}, token=ADMIN)
    assert got >= 500, answer
    assert answer["error"]["code"] == "mode_load_error", answer
    assert "diag takes no arguments" in answer["error"]["message"] and "error id" not in answer["error"]["message"]
    wait_until(lambda: "HTTP admin order failed" in served.output(), T, "the failure in the daemon's log")
    assert "Traceback" not in served.output()
    got, unloaded = curl(f"{TCP}/v1/admin/unload", {}, token=ADMIN)  # whatever the case started, gone at its end
    assert got == 200, unloaded
