"""No caller can hurt another through the HTTP door: every request is
bounded at the door (its connection, head, body, inputs, stop strings,
tokens, answer size and time) and refused up front; browsers and names that
are not ours are refused; and what an error says leaves the details home.

Everything goes through a real ``gpuvisor serve`` with the gates mode of
test_http (no torch): curl, the openai SDK, httpx, and raw sockets where a
client must misbehave. Nothing here asserts that something is fast: a
timeout only stops a hang."""

from __future__ import annotations

import contextlib
import ctypes
import grp
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import numpy as np
import openai
import psutil
import pytest

from supervisor.config import parse
from supervisor.config_http import HttpSettings
from supervisor.service.http.clients import CONNECTION_KEY, TOKEN_KEY, client_of, fingerprint
from tests.helpers import ROOT, T, wait_until
from tests.helpers.config import DIAG
from tests.helpers.daemon import RunningDaemon, free_port
from tests.test_http import GATE_MODELS, assert_error, curl, gates, http_config, http_socket, sdk

PORT = free_port()
ALLOWED = "http://ui.example:3000"
MODELS = {
    **GATE_MODELS,
    "say": {"mode": "gates", "completions": "say", "chat": "say", "max_tokens": 50},
    "say-default": {"mode": "gates", "completions": "say", "chat": "say"},
    "vectors": {"mode": "gates", "embeddings": "vectors"},
    "wide": {"mode": "gates", "embeddings": "wide"},
    "refuse": {"mode": "gates", "completions": "refuse"},
    "explode": {"mode": "gates", "completions": "explode"},
    "broken": {"mode": "gates", "completions": "broken"},
    "forbidden": {"mode": "gates", "completions": "forbidden"},
    "too-large": {"mode": "gates", "completions": "too_large"},
}
DOOR = {"listen": ["unix:http.sock", f"127.0.0.1:{PORT}"], "allow_unauthenticated_tcp": True,
        "max_header_bytes": 8192, "header_timeout": 2, "body_timeout": 2, "send_timeout": 2,
        "allowed_origins": [ALLOWED]}  # fmt: skip


def limits_config(folder: Path, http: dict | None = None, models: dict | None = None, daemon: dict | None = None,
                  **supervisor) -> str:  # fmt: skip
    return http_config({"gates": gates(folder)}, models or MODELS, http={**DOOR, **(http or {})},
                       supervisor={"loader_path": [str(folder / "modes")], "default_mode": "gates",
                                   "warm_standby": False, "max_queue": 16, **supervisor}, daemon=daemon)  # fmt: skip


def started(d: RunningDaemon) -> RunningDaemon:
    with d.client() as c:
        wait_until(lambda: c.status()["mode"] == "gates", T, "the gates mode to load")
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("limits")


@pytest.fixture(scope="module")
def served(folder):
    d = RunningDaemon(config_text=limits_config(folder))
    try:
        yield started(d)
    finally:
        d.close()


@pytest.fixture(scope="module")
def unix(served) -> str:
    return http_socket(served)


@contextlib.contextmanager
def door_sdk(**kwargs) -> Iterator[openai.OpenAI]:
    client = sdk(**kwargs)
    try:
        yield client
    finally:
        client.close()


# ---------------------------------------------------------------- raw sockets: a client that misbehaves


def connect(port: int = PORT) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=T)


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off ``s``: status, headers (lower-case names), body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(f"the connection closed after {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    size = int(headers.get("content-length", "0"))
    while len(rest) < size:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:size]


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closes ``s`` (EOF or a reset) before the hang guard runs out."""
    s.settimeout(T)
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request(method: str, path: str, body: bytes = b"", host: str = "localhost", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body  # fmt: skip


# ---------------------------------------------------------------- the connection


@pytest.mark.daemon
def test_a_head_over_max_header_bytes_is_a_431_and_not_read_whole(served):
    with connect() as s:
        with contextlib.suppress(OSError):  # the server may close before it has all of it
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n")
        status, headers, content = read_response(s)
    assert status == 431 and headers["connection"] == "close"
    assert_error(json.loads(content), 431, "request_too_large", "max_header_bytes (8192)")


def answers(s: socket.socket) -> list[tuple[int, bytes]]:
    """Every response on ``s`` until the server closes it: (status, body) each."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        size = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
        out.append((int(lines[0].split()[1]), data[:size]))
        data = data[size:]
    return out


def head_of(size: int, path: str = "/health", extra: str = "") -> bytes:
    """A GET whose head (its line, headers and the blank line) is ``size`` bytes."""
    start = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}X-Pad: ".encode()
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


@pytest.mark.daemon
def test_a_head_over_max_header_bytes_is_a_431_however_it_arrives(served):
    """h11 bounds only a head still incomplete: one that arrived whole in
    one read was parsed, whatever its size (65,000 bytes were served)."""
    many = b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + b"Xy: a\r\n" * 5000 + b"\r\n"  # 35 KB of small headers
    for head in (head_of(8193), head_of(60_000), head_of(200_000), many):
        with connect() as s:
            s.sendall(head)  # all of it: the answer comes once it is in
            status, headers, content = read_response(s)
            assert status == 431 and headers["connection"] == "close", len(head)
            assert_error(json.loads(content), 431, "request_too_large", "max_header_bytes (8192)")
    with connect() as s:
        s.sendall(head_of(8192, extra="Connection: close\r\n"))
        assert [status for status, _ in answers(s)] == [200], "a head of max_header_bytes exactly is served"


@pytest.mark.daemon
def test_pipelined_requests_are_each_held_to_max_header_bytes_not_their_sum(served):
    with connect() as s:
        s.sendall(head_of(5000) + head_of(5000, extra="Connection: close\r\n"))  # 10,000 bytes in one write
        assert [status for status, _ in answers(s)] == [200, 200]
    with connect() as s:
        s.sendall(head_of(5000) + head_of(9000))
        assert [status for status, _ in answers(s)] == [200, 431]


@pytest.mark.daemon
def test_a_flood_of_bad_requests_is_one_log_line_in_ten_seconds(served):
    """uvicorn logs a warning for every request h11 cannot read, and two for
    every upgrade it does not serve: a flood filled the log."""
    mark = len(served.output())
    for n in range(30):
        with connect() as s:
            s.sendall(b"NONSENSE\r\n\r\n" if n % 2 else request("GET", "/health", extra="Connection: upgrade\r\n"
                                                                   "Upgrade: websocket\r\n"))  # fmt: skip
            assert read_response(s)[0] == (400 if n % 2 else 200)
    said = served.output()[mark:]
    for line in ("Invalid HTTP request received.", "Unsupported upgrade request.", "No supported WebSocket library"):
        assert said.count(line) <= 1, said
    assert "Invalid HTTP request received." in served.output(), "the first of them is logged"


def trickle_until_closed(s: socket.socket) -> bool:
    """Send a header one byte at a time, 5 a second, until the server closes
    the connection (True) or the hang guard runs out (False)."""
    s.sendall(b"X-Slow: ")
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        try:
            s.sendall(b"a")
        except OSError:
            return True
        if select.select([s], [], [], 0.2)[0]:
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(65536) == b"", "the server answered a head that never ended"
            return True
    return False


@pytest.mark.daemon
def test_a_head_sent_slowly_is_cut_off_by_header_timeout_at_first_and_after_a_response(served):
    with connect() as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        assert trickle_until_closed(s), "a slowloris head held its connection open"
    with connect() as s:
        s.sendall(request("GET", "/health"))
        assert read_response(s)[0] == 200
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        assert trickle_until_closed(s), "the keep-alive connection's next head was never timed"
    with connect() as s:
        s.sendall(request("GET", "/health"))
        assert read_response(s)[0] == 200
        assert closed_by_server(s), "an idle keep-alive connection stayed open"


@pytest.mark.daemon
def test_a_body_sent_slowly_is_a_408_after_body_timeout(served):
    with connect() as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"model"'
        )  # and the other 92 bytes never come
        status, headers, content = read_response(s)
        assert status == 408 and headers["connection"] == "close"
        assert_error(json.loads(content), 408, "request_timeout", "body_timeout (2 s)")
        assert closed_by_server(s)


def daemons_end(pid: int, client: socket.socket) -> bool:
    """Whether the daemon ``pid`` holds the other end of ``client``'s TCP connection."""
    local = client.getsockname()
    return any(c.raddr and tuple(c.raddr) == local for c in psutil.Process(pid).net_connections("tcp"))


def embeddings_request(inputs: int, extra: str = "") -> bytes:
    body = json.dumps({"model": "vectors", "input": [f"text {i}" for i in range(inputs)]}).encode()
    return request("POST", "/v1/embeddings", body, extra=extra)


@pytest.mark.daemon
def test_a_client_that_reads_none_of_its_answer_is_cut_off_after_send_timeout(served):
    """The answer (2048 vectors: 9 MB of JSON) waits in the daemon's buffer
    for a reader; one that reads none of it for send_timeout is let go."""
    mark = len(served.output())
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", PORT))
        s.sendall(embeddings_request(2048))
        wait_until(lambda: daemons_end(served.proc.pid, s), T, "the daemon to take the connection")
        wait_until(lambda: not daemons_end(served.proc.pid, s), T, "the daemon to let the non-reader go")
    assert "a client read none of its answer for send_timeout (2 s): closing its connection" in served.output()[mark:]
    assert curl(f"http://127.0.0.1:{PORT}/health")[0] == 200


@pytest.mark.daemon
def test_a_client_that_reads_slowly_gets_its_whole_answer_however_long_it_takes(served, unix):
    """200 vectors (870 KB of JSON) read 16 KB every 50 ms: longer than
    send_timeout, but never a send_timeout without reading."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(unix)
        s.settimeout(T)
        s.sendall(embeddings_request(200, "Connection: close\r\n"))
        data = b""
        while chunk := s.recv(16384):
            data += chunk
            time.sleep(0.05)
    head, _, content = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(json.loads(content)["data"]) == 200


@pytest.mark.daemon
def test_connections_past_max_connections_are_closed_at_once(daemon, tmp_path):
    port = free_port()
    d = started(daemon(config_text=limits_config(tmp_path, {"listen": [f"127.0.0.1:{port}"], "max_connections": 3})))
    held = []
    try:
        for n in range(3):  # three requests that wait in the worker and the queue: three connections in use
            s = connect(port)
            s.sendall(request("POST", "/v1/completions", json.dumps({"model": "held", "prompt": f"h{n}"}).encode()))
            held.append(s)
        with d.client() as c:
            wait_until(lambda: c.status()["queued"] + c.status()["in_flight"] == 3, T, "three jobs in the daemon")
        with connect(port) as fourth:
            with contextlib.suppress(OSError):
                fourth.sendall(request("GET", "/health"))
            assert closed_by_server(fourth), "a fourth connection was kept"
        for n in range(3):
            (tmp_path / f"release-h{n}").touch()
        for n, s in enumerate(held):
            status, _, content = read_response(s)
            assert status == 200 and json.loads(content)["choices"][0]["text"] == f"h{n}"
            s.close()
        held = []
        wait_until(lambda: curl(f"http://127.0.0.1:{port}/health")[0] == 200, T, "a new connection to be served")
    finally:
        for s in held:
            s.close()


HALF = b"GET /health HTTP/1.1\r\nHost: localhost\r\n"  # a head that has not ended: it holds its connection


def served_or_refused(s: socket.socket) -> int | None:
    """A GET /health on ``s``: its status, or None when the server closes
    the connection without a word (a cap refused it)."""
    try:
        s.sendall(request("GET", "/health"))
        return read_response(s)[0]
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return None


def as_user(uid: int, gid: int, path: str, holds: int) -> tuple[int | None, socket.socket]:
    """In a child process running as ``uid`` (in the group ``gid`` only):
    open ``holds`` connections to the unix socket ``path`` whose heads never
    end, then GET /health on one more. Returns that answer's status (None:
    refused) and a socket that ends the child, its connections closing,
    once it is closed."""
    result, control = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: nothing but sockets, then _exit
        status = 1
        try:
            result.close()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            held = []
            for _ in range(holds):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(T)
                s.connect(path)
                s.sendall(HALF)
                held.append(s)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(T)
                s.connect(path)
                answer = served_or_refused(s)
            control.sendall(json.dumps(answer).encode() + b"\n")
            control.recv(1)  # until the test closes its end
            status = 0
        finally:
            os._exit(status)
    control.close()
    reaped = threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True)
    reaped.start()
    try:
        result.settimeout(T)
        line = b""
        while not line.endswith(b"\n"):
            chunk = result.recv(64)
            assert chunk, "the child ended without an answer"
            line += chunk
    except BaseException:
        result.close()  # the child ends
        raise
    return json.loads(line), result


@pytest.mark.daemon
def test_each_unix_user_is_held_to_a_share_of_the_connections_and_tcp_leaves_the_unix_socket_some(daemon, tmp_path):
    """Connections are counted before a byte of a head, so one peer could
    hold them all, tokens or none. On the unix socket each uid gets its
    share (root and the daemon's own uid are not held to it); TCP knows
    nobody, but may not take the unix socket's eighth."""
    if os.getuid() != 0:
        pytest.skip("connecting as other users needs root")
    port = free_port()
    text = limits_config(tmp_path, {"listen": ["unix:http.sock", f"127.0.0.1:{port}"], "max_connections": 8,
                                    "max_connections_per_user": 2, "header_timeout": 60},
                         daemon={"socket_group": grp.getgrgid(65534).gr_name})  # fmt: skip
    d = started(daemon(config_text=text))
    unix = http_socket(d)
    os.chmod(d.dir, 0o711)  # the test's own folder: let the other users through to the socket's
    held: list[socket.socket] = []
    try:
        for _ in range(7):  # TCP: all but an eighth of 8
            held.append(connect(port))
            held[-1].sendall(HALF)
        with connect(port) as eighth:
            assert served_or_refused(eighth) is None, "TCP took the unix socket's share"
        assert curl("http://gpuvisor/health", unix=unix)[0] == 200
        for s in held:
            s.close()
        held = []
        wait_until(lambda: not [c for c in psutil.Process(d.proc.pid).net_connections("tcp") if c.raddr], T,
                   "the daemon to let the TCP connections go")  # fmt: skip
        third, nobody = as_user(65534, 65534, unix, holds=2)
        held.append(nobody)
        assert third is None, "a third connection of one user was served"
        other, daemon_user = as_user(1, 65534, unix, holds=0)
        held.append(daemon_user)
        assert other == 200, "another user was refused for the first one's connections"
        for _ in range(3):  # root: over the share, not held to it
            s = socket.socket(socket.AF_UNIX)
            held.append(s)
            s.connect(unix)
            s.sendall(HALF)
        assert curl("http://gpuvisor/health", unix=unix)[0] == 200
    finally:
        for s in held:
            s.close()
    assert "uid 65534 holds 2 connections (max_connections_per_user): closing new ones at once" in d.output()
    assert "TCP holds 7 connections" in d.output()


SYS_PIDFD_GETFD = 438  # the same number on x86_64 and arm64


def accepted_socket(pid: int, client: socket.socket) -> socket.socket:
    """The daemon's end of ``client``'s connection, as a socket of this process (pidfd_getfd)."""
    local = client.getsockname()
    conn = wait_until(lambda: next((c for c in psutil.Process(pid).net_connections("tcp")
                                    if c.raddr and tuple(c.raddr) == local), None), T, "the daemon to accept")  # fmt: skip
    pidfd = os.pidfd_open(pid)
    try:
        fd = ctypes.CDLL(None, use_errno=True).syscall(SYS_PIDFD_GETFD, pidfd, conn.fd, 0)
    finally:
        os.close(pidfd)
    if fd < 0:
        pytest.skip(f"pidfd_getfd is not allowed here: {os.strerror(ctypes.get_errno())}")
    return socket.socket(fileno=fd)


@pytest.mark.daemon
def test_an_accepted_tcp_connection_has_tcp_nodelay(served):
    with connect() as s:
        s.sendall(request("GET", "/health"))
        assert read_response(s)[0] == 200
        with accepted_socket(served.proc.pid, s) as theirs:
            assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# ---------------------------------------------------------------- browsers and names that are not ours


@pytest.mark.daemon
def test_a_browser_page_of_another_site_is_refused_whatever_it_sends(served):
    url = f"http://127.0.0.1:{PORT}/v1/completions"
    body = json.dumps({"model": "say", "prompt": "x"})
    for headers in (("-H", "Content-Type: text/plain", "-H", "Origin: http://evil.example"),
                    ("-H", "Content-Type: application/json", "-H", "Origin: http://evil.example"),
                    ("-H", "Content-Type: application/json", "-H", "Origin: null"),
                    ("-H", "Content-Type: application/json", "-H", "Sec-Fetch-Site: cross-site")):  # fmt: skip
        status, answer = curl(url, args=(*headers, "--data-raw", body))
        assert status == 403, (headers, answer)
        assert_error(answer, 403, "forbidden", "another")
    status, answer = curl(f"http://127.0.0.1:{PORT}/v1/models", args=("-H", "Origin: http://evil.example"))
    assert status == 403


@pytest.mark.daemon
def test_a_post_whose_body_is_not_said_to_be_json_is_a_415(served, unix):
    body = json.dumps({"model": "say", "prompt": "x"})
    for args in (("-d", body), ("-H", "Content-Type: text/plain", "--data-raw", body), ("-X", "POST")):
        status, answer = curl("http://gpuvisor/v1/completions", unix=unix, args=args)
        assert status == 415, (args, answer)
        assert_error(answer, 415, "unsupported_media_type", "Content-Type: application/json")
    ok = curl("http://gpuvisor/v1/completions", unix=unix,
              args=("-H", "Content-Type: application/json; charset=utf-8", "--data-raw", body))  # fmt: skip
    assert ok[0] == 200, ok


@pytest.mark.daemon
def test_tcp_without_tokens_serves_loopback_host_names_only(served, unix):
    url = f"http://127.0.0.1:{PORT}/v1/models"
    for host in ("attacker.example", f"attacker.example:{PORT}", f"192.0.2.1:{PORT}", "localhost.attacker.example"):
        status, answer = curl(url, args=("-H", f"Host: {host}"))
        assert status == 403, (host, answer)
        assert_error(answer, 403, "forbidden", "localhost, 127.0.0.1 and [::1]")
    for host in ("localhost", f"localhost:{PORT}", f"LOCALHOST:{PORT}", f"127.0.0.1:{PORT}", f"[::1]:{PORT}", "[::1]"):
        assert curl(url, args=("-H", f"Host: {host}"))[0] == 200, host
    assert curl("http://gpuvisor/v1/models", unix=unix, args=("-H", "Host: attacker.example"))[0] == 200, "unix: any"
    with door_sdk(base=f"http://localhost:{PORT}") as client:
        assert {m.id for m in client.models.list()} == set(MODELS)


@pytest.mark.daemon
def test_the_listeners_own_origin_and_an_allowed_one_are_served_with_cors_for_the_allowed(served):
    url = f"http://127.0.0.1:{PORT}/v1/completions"
    body = json.dumps({"model": "say", "prompt": "x"})
    own = ("-H", f"Origin: http://127.0.0.1:{PORT}", "-H", "Sec-Fetch-Site: same-origin", "--json", body)
    assert curl(url, args=own)[0] == 200
    with httpx2.Client(timeout=T) as http:
        preflight = http.options(url, headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "content-type"})  # fmt: skip
        assert preflight.status_code == 204, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ALLOWED
        assert "content-type" in preflight.headers["access-control-allow-headers"]
        answer = http.post(url, content=body, headers={"Origin": ALLOWED, "Content-Type": "application/json",
                                                       "Sec-Fetch-Site": "cross-site"})  # fmt: skip
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED
        refused = http.options(
            url, headers={"Origin": "http://ui.example:3001", "Access-Control-Request-Method": "POST"}
        )
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


# ---------------------------------------------------------------- what one request may ask for


def calls(folder: Path, width: int) -> int:
    path = folder / f"calls-{width}"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.daemon
def test_embeddings_over_max_inputs_or_max_input_chars_are_413_before_anything_is_queued(served, unix, folder):
    before = calls(folder, 384)
    for n in (2049, 30_000, 50_000):
        status, answer = curl("http://gpuvisor/v1/embeddings", {"model": "vectors", "input": ["x"] * n}, unix=unix)
        assert status == 413, n
        assert_error(answer, 413, "request_too_large", "at most 2048 (max_inputs)")
        assert answer["error"]["param"] == "input"
    status, answer = curl(
        "http://gpuvisor/v1/embeddings", {"model": "vectors", "input": ["y" * 600_000] * 2}, unix=unix
    )
    assert status == 413
    assert_error(answer, 413, "request_too_large", "1200000 characters; at most 1000000 (max_input_chars)")
    with door_sdk(unix=unix) as client, pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model="vectors", input=["z"] * 30_000)
    assert refused.value.status_code == 413
    assert calls(folder, 384) == before, "a refused request reached the worker"
    assert curl("http://gpuvisor/v1/embeddings", {"model": "vectors", "input": ["x"] * 2048}, unix=unix)[0] == 200


def rss(d: RunningDaemon) -> int:
    return psutil.Process(d.proc.pid).memory_info().rss


@pytest.mark.daemon
def test_unknown_fields_are_dropped_as_the_body_is_read_not_kept_while_the_job_waits(served, unix, folder):
    """Four requests, each with an unknown field of two million empty
    objects (6 MB of JSON, some 160 MB once parsed), wait in the queue: the
    daemon keeps their prompts only. Kept, they held 26 times their size."""
    swell = b",".join([b"{}"] * 2_000_000)
    before = rss(served)
    held = []
    try:
        for n in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(T)
            s.connect(unix)
            s.sendall(request("POST", "/v1/completions", b'{"model":"held","prompt":"sw%d","z":[%s]}' % (n, swell)))
            held.append(s)
        with served.client() as c:
            wait_until(lambda: c.status()["queued"] + c.status()["in_flight"] == 4, T, "four swollen jobs waiting")
        grown = rss(served) - before
        assert grown < 200 * 2**20, f"the daemon grew by {grown / 2**20:.0f} MB holding four queued requests"
        for n in range(4):
            (folder / f"release-sw{n}").touch()
        for n, s in enumerate(held):
            status, _, content = read_response(s)
            assert status == 200 and json.loads(content)["choices"][0]["text"] == f"sw{n}"
    finally:
        for s in held:
            s.close()


@pytest.mark.daemon
def test_a_refused_field_is_refused_whatever_its_size_and_said_in_a_few_words(served, unix):
    many = {"logit_bias": {str(i): 1 for i in range(200_000)}, "tools": [{}] * 200_000, "n": 2}
    for key, value in many.items():
        status, answer = curl("http://gpuvisor/v1/completions", {"model": "say", "prompt": "x", key: value}, unix=unix)
        assert status == 400, key
        assert_error(answer, 400, "unsupported", f"{key}=")
        assert answer["error"]["param"] == key and len(answer["error"]["message"]) <= 200
    status, answer = curl("http://gpuvisor/v1/completions", {"model": "say", "prompt": "x", "user": [{}] * 200_000,
                                                             "n": 1, "tools": []}, unix=unix)  # fmt: skip
    assert status == 200, answer


@pytest.mark.daemon
def test_chat_messages_past_max_messages_are_a_413_however_short(served, unix):
    url = "http://gpuvisor/v1/chat/completions"
    empty = {"role": "", "content": ""}
    for messages, words in (([empty] * 2049, "messages has 2049 items; at most 2048 (max_messages)"),
                            ([empty] * 300_000, "messages has 300000 items"),
                            ([{"role": "user", "content": [{"type": "text", "text": ""}] * 2049}],
                             "2049 content parts; at most 2048 (max_messages)")):  # fmt: skip
        status, answer = curl(url, {"model": "say", "messages": messages}, unix=unix)
        assert status == 413, words
        assert_error(answer, 413, "request_too_large", words)
        assert answer["error"]["param"] == "messages"
    status, answer = curl(url, {"model": "say", "messages": [{"role": "user", "content": "x"}] * 2048}, unix=unix)
    assert status == 200, answer


@pytest.mark.daemon
def test_an_embeddings_answer_over_the_frame_limit_is_a_413_from_the_worker_then_up_front(served, unix, folder):
    too_many = {"model": "wide", "input": ["x"] * 1100}  # 1100 x 16384 float32: 72 MB, over the 64 MiB frame
    status, answer = curl("http://gpuvisor/v1/embeddings", too_many, unix=unix)
    assert status == 413, "the worker could not send it: the caller's request, not a server error (no SDK retry)"
    assert_error(answer, 413, "request_too_large", "frame limit")
    assert calls(folder, 16384) == 1
    status, answer = curl("http://gpuvisor/v1/embeddings", {"model": "wide", "input": "x"}, unix=unix)
    assert status == 200 and len(answer["data"][0]["embedding"]) == 16384
    status, answer = curl("http://gpuvisor/v1/embeddings", too_many, unix=unix)
    assert status == 413
    assert_error(answer, 413, "request_too_large", "1100 vectors of 16384 values")
    assert calls(folder, 16384) == 2, "once the width is known, an answer too large is refused before any work"


def said(answer) -> dict:
    return json.loads(
        answer.choices[0].text if hasattr(answer.choices[0], "text") else answer.choices[0].message.content
    )


@pytest.mark.daemon
def test_stop_strings_past_max_stop_or_max_stop_chars_are_a_400(served, unix):
    with door_sdk(unix=unix) as client:
        for stop, words in ((["a", "b", "c", "d", "e"], "at most 4 (max_stop)"),
                            (["a" * 257], "over 256 characters (max_stop_chars)")):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model="say", prompt="x", stop=stop)
            assert_error(refused.value.response.json(), 400, None, words)
            assert refused.value.response.json()["error"]["param"] == "stop"
        most = [c * 256 for c in "abcd"]
        assert said(client.completions.create(model="say", prompt="x", stop=most))["stop"] == most


@pytest.mark.daemon
def test_max_tokens_past_the_models_ceiling_is_a_400_and_up_to_it_is_passed_on(served, unix):
    messages = [{"role": "user", "content": "x"}]
    with door_sdk(unix=unix) as client:
        for call, param in ((lambda: client.completions.create(model="say", prompt="x", max_tokens=51), "max_tokens"),
                            (lambda: client.chat.completions.create(model="say", messages=messages, max_tokens=51),
                             "max_tokens"),
                            (lambda: client.chat.completions.create(model="say", messages=messages,
                                                                    max_completion_tokens=51), "max_completion_tokens"),
                            (lambda: client.completions.create(model="say-default", prompt="x", max_tokens=4097),
                             "max_tokens")):  # fmt: skip
            with pytest.raises(openai.BadRequestError) as refused:
                call()
            assert refused.value.response.json()["error"]["param"] == param
            assert "over this model's limit" in refused.value.message
        assert said(client.completions.create(model="say", prompt="x", max_tokens=50))["max_new_tokens"] == 50
        assert (
            said(client.completions.create(model="say-default", prompt="x", max_tokens=4096))["max_new_tokens"] == 4096
        )
        assert "max_new_tokens" not in said(client.chat.completions.create(model="say", messages=messages)), \
            "a chat that asks for no count leaves it to the mode, whose own limit bounds it"  # fmt: skip


@pytest.mark.daemon
def test_prompts_and_messages_past_max_input_chars_are_a_413(served, unix):
    with door_sdk(unix=unix) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="say", prompt="p" * 1_000_001)
        assert refused.value.status_code == 413 and "max_input_chars" in refused.value.message
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="say", messages=[{"role": "user", "content": "m" * 600_000}] * 2)
        assert refused.value.status_code == 413 and refused.value.response.json()["error"]["param"] == "messages"


@pytest.mark.daemon
def test_health_answers_while_the_largest_allowed_embeddings_request_is_served(served, unix):
    """2048 inputs, the most one request may send: its answer (2048 x 384
    float32, about 9 MB of JSON) is encoded off the event loop, so /health
    answers meanwhile; every value reads back as the float32 the worker made."""
    got: list = []
    worker = threading.Thread(target=lambda: got.append(
        curl("http://gpuvisor/v1/embeddings", {"model": "vectors", "input": [f"text {i}" for i in range(2048)]},
             unix=unix)))  # fmt: skip
    probes = 0
    with httpx2.Client(transport=httpx2.HTTPTransport(uds=unix), timeout=5) as http:  # 5 s: a hang guard only
        worker.start()
        while worker.is_alive() or probes < 3:
            assert http.get("http://gpuvisor/health").status_code == 200
            probes += 1
        worker.join(T)
    status, answer = got[0]
    assert status == 200 and len(answer["data"]) == 2048
    expected = np.random.default_rng(2048).standard_normal((2048, 384)).astype(np.float32)  # what the task made
    np.testing.assert_array_equal(np.array([d["embedding"] for d in answer["data"]], dtype=np.float32), expected)


@pytest.mark.daemon
def test_an_http_model_without_a_timeout_gets_the_http_timeout(daemon, tmp_path):
    models = {"sleepy": {"mode": "gates", "completions": "sleep"}, "patient": {"mode": "gates", "completions": "hold",
                                                                             "timeout": 0}}  # fmt: skip
    d = started(daemon(config_text=limits_config(tmp_path, {"listen": ["unix:http.sock"], "timeout": 1}, models)))
    status, answer = curl("http://gpuvisor/v1/completions", {"model": "sleepy", "prompt": "x"}, unix=http_socket(d))
    assert status == 504
    assert_error(answer, 504, "job_timeout", "error id")
    (tmp_path / "release-p").touch()
    assert curl("http://gpuvisor/v1/completions", {"model": "patient", "prompt": "p"}, unix=http_socket(d))[0] == 200


# ---------------------------------------------------------------- what an error says


def error_id(message: str) -> str:
    assert "(error id " in message, message
    return message.rpartition("(error id ")[2].rstrip(")")


@pytest.mark.daemon
def test_a_task_that_raises_is_a_500_whose_message_stays_in_the_log(served, unix):
    status, answer = curl("http://gpuvisor/v1/completions", {"model": "explode", "prompt": "x"}, unix=unix)
    assert status == 500
    assert_error(answer, 500, "job_failed", "the task failed (error id ")
    assert "/srv" not in json.dumps(answer)
    at = served.output().index(f"HTTP error {error_id(answer['error']['message'])}")
    assert "cannot open /srv/private/weights.bin" in served.output()[at:]


@pytest.mark.daemon
def test_a_handler_that_refused_its_input_keeps_one_short_line(served, unix):
    status, answer = curl("http://gpuvisor/v1/completions", {"model": "refuse", "prompt": "x"}, unix=unix)
    assert status == 400
    message = answer["error"]["message"]
    assert message.startswith("ValueError: refuse: the input is no good, see")
    assert "\n" not in message and len(message) <= 200 and "/srv" not in message and "Traceback" not in message


@pytest.mark.daemon
def test_the_engines_refusals_are_403_413_and_a_503_with_retry_after(served, unix):
    with door_sdk(unix=unix) as client:
        with pytest.raises(openai.InternalServerError) as broken:
            client.completions.create(model="broken", prompt="x")
        assert broken.value.status_code == 503 and broken.value.response.headers["retry-after"] == "8"
        assert_error(broken.value.response.json(), 503, "mode_broken", "error id")
        assert "/srv" not in broken.value.message
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            client.completions.create(model="forbidden", prompt="x")
        assert_error(forbidden.value.response.json(), 403, "forbidden", "not yours")
        with pytest.raises(openai.APIStatusError) as too_large:
            client.completions.create(model="too-large", prompt="x")
        assert too_large.value.status_code == 413
        assert_error(too_large.value.response.json(), 413, "request_too_large")


# ---------------------------------------------------------------- configuration and reload


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, words",
    [
        ('listen = ["127.0.0.1:8080"]', ["key 'listen'", "no authentication", "allow_unauthenticated_tcp = true"]),
        ('listen = ["[::1]:8080"]', ["key 'listen'", "allow_unauthenticated_tcp"]),
        ("allow_unauthenticated_tcp = 1", ["key 'allow_unauthenticated_tcp'", "true or false"]),
        ('allowed_origins = "http://a"', ["key 'allowed_origins'", "a list"]),
        ('allowed_origins = ["http://ui.example/"]', ["key 'allowed_origins'", "no trailing slash"]),
        ('allowed_origins = ["ui.example"]', ["key 'allowed_origins'", "SCHEME://HOST[:PORT]"]),
        ("max_connections = 0", ["key 'max_connections'", "from 1 to 65536"]),
        ("max_connections_per_user = -1", ["key 'max_connections_per_user'", "0: a quarter of max_connections"]),
        ("max_header_bytes = 100", ["key 'max_header_bytes'", "from 1024"]),
        ("header_timeout = 0", ["key 'header_timeout'", "seconds from 0.1"]),
        ('keep_alive_timeout = "5"', ["key 'keep_alive_timeout'", "a number of seconds"]),
        ("body_timeout = -1", ["key 'body_timeout'", "from 0.1"]),
        ("send_timeout = 0", ["key 'send_timeout'", "seconds from 0.1"]),
        ("max_inputs = 2.5", ["key 'max_inputs'", "a whole number of inputs"]),
        ("max_messages = 0", ["key 'max_messages'", "messages from 1"]),
        ("max_input_chars = 0", ["key 'max_input_chars'", "characters from 1"]),
        ("max_stop = 65", ["key 'max_stop'", "from 0 to 64"]),
        ("max_stop_chars = 0", ["key 'max_stop_chars'", "from 1"]),
        ("max_tokens = true", ["key 'max_tokens'", "whole number of tokens"]),
        ("timeout = -1", ["key 'timeout'", "seconds (0: none)"]),
    ],
)
def test_each_http_limit_is_checked_with_file_line_and_key(text, words):
    source = "/etc/gpuvisor.toml"
    with pytest.raises(Exception) as refused:
        parse(f'[modes.a]\nloader = "m:f"\n[http]\n{text}\n', source)
    message = str(refused.value)
    assert message.startswith(f"{source}:4: [http]"), message
    assert all(w in message for w in words), message


@pytest.mark.unit
def test_a_models_max_tokens_is_checked_and_the_defaults_are_documented():
    with pytest.raises(Exception, match=r"f:5: \[http.models.m\] key 'max_tokens'"):
        parse('[modes.a]\nloader = "m:f"\n[http.models.m]\nmode = "a"\nmax_tokens = 0\nchat = "c"\n', "f")
    docs = {name: [line.split("|") for line in (ROOT / "docs" / name).read_text().splitlines() if line.startswith("| `")]
            for name in ("http.md", "configuration.md")}  # fmt: skip
    for key in ("max_connections", "max_connections_per_user", "max_header_bytes", "header_timeout",
                "keep_alive_timeout", "body_timeout", "send_timeout", "max_body_bytes", "max_inputs", "max_messages",
                "max_input_chars", "max_stop", "max_stop_chars", "max_tokens", "timeout", "allowed_origins",
                "allow_unauthenticated_tcp", "access_log"):  # fmt: skip
        default = getattr(HttpSettings, key)
        shown = {float: lambda v: f"{v:g}", bool: lambda v: str(v).lower(), tuple: lambda v: "[]"}.get(
            type(default), str
        )
        for name, rows in docs.items():
            assert any(row[1].strip() == f"`{key}`" and shown(default) in row[2] for row in rows), (name, key)


@pytest.mark.daemon
def test_loopback_tcp_without_tokens_or_the_opt_in_stops_the_daemon_before_it_starts(daemon):
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"listen": [f"127.0.0.1:{free_port()}"]}),
               wait_ready=False)  # fmt: skip
    assert d.wait() == 6
    assert "[http] key 'listen'" in d.output() and "allow_unauthenticated_tcp = true" in d.output()


@pytest.mark.daemon
def test_sighup_reloads_the_limits(daemon, tmp_path):
    d = started(daemon(config_text=limits_config(tmp_path, {"listen": ["unix:http.sock"]})))
    unix = http_socket(d)
    two = {"model": "say", "prompt": "x", "stop": ["a", "b"]}
    assert curl("http://gpuvisor/v1/completions", two, unix=unix)[0] == 200
    assert d.config is not None
    Path(d.config).write_text(limits_config(tmp_path, {"listen": ["unix:http.sock"], "max_stop": 1}))
    after = len(d.notes)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_note("READY=1", after=after)
    status, answer = curl("http://gpuvisor/v1/completions", two, unix=unix)
    assert status == 400 and "at most 1 (max_stop)" in answer["error"]["message"]


@pytest.mark.unit
def test_the_systemd_unit_lets_the_daemon_open_max_connections_and_its_own_files():
    unit = (ROOT / "contrib" / "systemd" / "gpuvisor.service").read_text()
    limit = next(int(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith("LimitNOFILE="))
    assert limit >= HttpSettings.max_connections + 256


# ---------------------------------------------------------------- who the client is


@pytest.mark.process
def test_client_of_is_a_tokens_fingerprint_else_the_connection():
    token = "s3cret-token-for-the-http-tests"
    with_token = client_of({"type": "http", TOKEN_KEY: fingerprint(token), "client": ("127.0.0.1", 5)})
    assert with_token == f"http:token:{fingerprint(token)}" and token not in with_token
    assert len(fingerprint(token)) == 16 and fingerprint(token) != fingerprint(token + "x")
    assert client_of({"type": "http", "client": ("127.0.0.1", 53412)}) == "http:127.0.0.1:53412"
    assert client_of({"type": "http", "client": ("::1", 53412)}) == "http:[::1]:53412"
    assert client_of({"type": "http", "client": None, CONNECTION_KEY: 7}) == "http:unix:7"
