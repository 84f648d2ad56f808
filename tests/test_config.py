"""Configuration: the built-in default, and mistakes that name file, line and key."""

from __future__ import annotations

import pytest

from supervisor import ConfigError, Supervisor, UnknownMode, load_config
from supervisor.config import parse

pytestmark = pytest.mark.unit


def assert_config_error(path, line: int, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, (word, message)


def test_the_built_in_default_has_diag_and_embed():
    config = load_config(None)
    assert set(config.modes) >= {"diag", "embed"}
    assert config.modes["diag"].loader == "worker.modes.diag:load"
    assert config.modes["embed"].args == {"device": "auto"}
    assert config.heartbeat_timeout > config.heartbeat_interval


def test_a_file_is_read(write_config):
    path = write_config(
        """
[supervisor]
job_timeout = 30
default_mode = "tiny"

[modes.tiny]
loader = "worker.modes.diag:load"
"""
    )
    config = load_config(path)
    assert config.job_timeout == 30.0 and config.default_mode == "tiny"
    assert list(config.modes) == ["tiny"] and config.source == str(path)


@pytest.mark.parametrize(
    "text, line, words",
    [
        (
            '[supervisor]\nheartbeat_timeout = "soon"\n[modes.a]\nloader = "m:f"\n',
            2,
            ["[supervisor] key 'heartbeat_timeout'", "expected a number of seconds > 0", "'soon'"],
        ),
        ('[supervisor]\nstop_timeout = -1\n[modes.a]\nloader = "m:f"\n', 2, ["key 'stop_timeout'", "-1"]),
        (
            '[supervisor]\nhartbeat = 1\n[modes.a]\nloader = "m:f"\n',
            2,
            ["key 'hartbeat'", "unknown key", "heartbeat_timeout"],
        ),
        (
            '[modes.a]\nloader = "m:f"\n\n[modes.b]\nloader = "no colon here"\n',
            5,
            ["[modes.b] key 'loader'", "'package.module:function'", "'no colon here'"],
        ),
        ("[modes.a]\nloader = 42\n", 2, ["[modes.a] key 'loader'", "42"]),
        ("[modes.a]\n# no loader\nargs = {}\n", 1, ["[modes.a] key 'loader'", "None"]),
        ('[modes.a]\nloader = "m:f"\nargs = "x"\n', 3, ["[modes.a] key 'args'", "table of keyword arguments"]),
        ('[modes.a]\nloader = "m:f"\nlaoder = "m:g"\n', 3, ["[modes.a] key 'laoder'", "unknown key"]),
        ('[modes."bad name!"]\nloader = "m:f"\n', 1, ["mode name"]),
        (
            '[supervisor]\ndefault_mode = "b"\n[modes.a]\nloader = "m:f"\n',
            2,
            ["key 'default_mode'", "'b' is not a mode", "['a']"],
        ),
        ('[surpervisor]\n[modes.a]\nloader = "m:f"\n', 1, ["[surpervisor]", "unknown table"]),
        (
            '[supervisor]\nheartbeat_interval = 5\nheartbeat_timeout = 5\n[modes.a]\nloader = "m:f"\n',
            3,
            ["heartbeat_timeout", "longer than heartbeat_interval"],
        ),
    ],
)
def test_a_mistake_names_the_file_line_and_key(write_config, text, line, words):
    assert_config_error(write_config(text), line, words)


def test_syntax_errors_and_missing_modes_and_unreadable_files(write_config, tmp_path):
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2"):
        load_config(write_config('[modes.a]\nloader = "unterminated\n'))
    with pytest.raises(ConfigError, match="no modes"):
        load_config(write_config("[supervisor]\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    assert issubclass(ConfigError, ValueError)


def test_the_supervisor_refuses_a_bad_config_and_an_unknown_initial_mode(write_config):
    with pytest.raises(ConfigError):
        Supervisor(write_config("[modes.a]\nloader = 1\n"))
    with pytest.raises(UnknownMode, match="unknown mode 'nope'.*diag, embed"):
        Supervisor(mode="nope")


def test_parse_keeps_args_as_given():
    config = parse('[modes.e]\nloader = "pkg.mod:load"\n[modes.e.args]\ndevice = "cpu"\nbatch_size = 8\n')
    assert config.modes["e"].args == {"device": "cpu", "batch_size": 8}


@pytest.mark.parametrize(
    "text, line, words",
    [
        # U+2028 is legal in a TOML comment and must not shift the line count
        ('# note\u2028more\n[modes.a]\nloader = "m:f"\n[modes.b]\nloader = 1\n', 5, ["[modes.b] key 'loader'"]),
        # a multi-line array's body is not a table header
        ('[modes.a]\nloader = "m:f"\nargs = { xs = [\n  [1, 2],\n] }\nlaoder = 1\n', 6, ["key 'laoder'"]),
        ('[supervisor]\nxs = [\n  [1, 2],\n]\n[modes.a]\nloader = "m:f"\n', 2, ["key 'xs'"]),
        # a multi-line string's body is not a key
        (
            '[modes.a]\nloader = "m:f"\n[modes.a.args]\nnote = """\n[modes.b]\nloader = 5\n"""\n[modes.b]\nloader = 9\n',
            9,
            ["[modes.b] key 'loader'"],
        ),
        # the fix is in heartbeat_interval when heartbeat_timeout is not in the file
        ('[supervisor]\nheartbeat_interval = 30\n[modes.a]\nloader = "m:f"\n', 2, ["heartbeat_interval", "longer"]),
        # args travel as msgpack: a TOML date cannot
        ('[modes.a]\nloader = "m:f"\nargs = { since = 2024-01-01 }\n', 3, ["key 'args'", "cannot be sent to a worker"]),
    ],
)
def test_the_line_is_right_around_multiline_values_and_unicode_separators(write_config, text, line, words):
    assert_config_error(write_config(text), line, words)


def test_the_daemon_table(write_config):
    config = load_config(
        write_config(
            '[daemon]\nendpoint = "tcp://127.0.0.1:5555"\nallow_unauthenticated_tcp = true\n[modes.a]\nloader = "m:f"\n'
        )
    )
    assert config.daemon.endpoint == "tcp://127.0.0.1:5555" and config.daemon.allow_unauthenticated_tcp is True
    assert load_config(None).daemon.allow_unauthenticated_tcp is False, "plain TCP is refused unless the file says so"


@pytest.mark.parametrize(
    "text, line, words",
    [
        ('[daemon]\nallow_unauthenticated_tcp = "yes"\n', 2, ["[daemon] key 'allow_unauthenticated_tcp'", "true or false", "'yes'"]),
        ("[daemon]\nallow_unauthenticated_tcp = 1\n", 2, ["key 'allow_unauthenticated_tcp'", "true or false"]),
        ('[daemon]\nallow_tcp = true\n', 2, ["[daemon] key 'allow_tcp'", "unknown key", "allow_unauthenticated_tcp"]),
        ('[daemon]\nendpoint = "gpuvisor.sock"\n', 2, ["key 'endpoint'", "a ZeroMQ endpoint"]),
        ('[daemon]\ncurve_secret_key = "/k"\n', 1, ["key 'curve_clients_dir'", "needs both"]),
    ],
)  # fmt: skip
def test_a_daemon_mistake_names_the_file_line_and_key(write_config, text, line, words):
    assert_config_error(write_config(text + '[modes.a]\nloader = "m:f"\n'), line, words)


HTTP_MODES = '[modes.embed]\nloader = "m:f"\n[modes.gen]\nloader = "m:g"\n'


def test_the_http_table(write_config, tmp_path):
    config = load_config(
        write_config(
            '[http]\nlisten = ["unix:/run/g/http.sock", "127.0.0.1:8080", "[::1]:8081", "192.0.2.7:80"]\n'
            'token_file = "tokens"\nmax_body_bytes = 4096\n'
            '[http.models."all-minilm-l6-v2"]\nmode = "embed"\nembeddings = "embed"\n'
            '[http.models.tiny]\nmode = "gen"\nchat = "chat"\ncompletions = "generate"\ntimeout = 30\n' + HTTP_MODES
        )
    )
    http = config.http
    assert http is not None and http.listen == ("unix:/run/g/http.sock", "127.0.0.1:8080", "[::1]:8081", "192.0.2.7:80")
    assert http.token_file == str(tmp_path / "tokens"), "a relative token_file starts from the file's folder"
    assert http.max_body_bytes == 4096
    minilm, tiny = http.models["all-minilm-l6-v2"], http.models["tiny"]
    assert (minilm.mode, minilm.embeddings, minilm.chat, minilm.completions, minilm.timeout) == (
        "embed", "embed", None, None, None)  # fmt: skip
    assert (tiny.mode, tiny.chat, tiny.completions, tiny.timeout) == ("gen", "chat", "generate", 30.0)


def test_http_is_on_with_its_table_at_the_default_socket_and_off_without_it(write_config):
    assert load_config(write_config(HTTP_MODES)).http is None
    on = load_config(write_config('[http.models.e]\nmode = "embed"\nembeddings = "embed"\n' + HTTP_MODES)).http
    assert on is not None and on.listen == ("unix:http.sock",) and on.token_file == ""
    off = load_config(write_config("[http]\nlisten = []\n" + HTTP_MODES)).http
    assert off is not None and off.listen == ()
    built_in = load_config(None).http
    assert built_in is not None and built_in.listen == ("unix:http.sock",), "only the private unix socket"
    assert built_in.models["all-minilm-l6-v2"].embeddings == "embed"


@pytest.mark.parametrize(
    "text, line, words",
    [
        ('[http]\nlisten = "127.0.0.1:80"\n', 2, ["[http] key 'listen'", "expected a list"]),
        ('[http]\nlisten = ["127.0.0.1"]\n', 2, ["key 'listen'", "'127.0.0.1'", "HOST:PORT"]),
        ('[http]\nlisten = ["127.0.0.1:0"]\n', 2, ["key 'listen'", "port from 1 to 65535"]),
        ('[http]\nlisten = ["example.com:80"]\n', 2, ["key 'listen'", "IP address or localhost"]),
        ('[http]\nlisten = ["unix:"]\n', 2, ["key 'listen'", "file path"]),
        ('[http]\nlisten = ["unix:@abstract"]\n', 2, ["key 'listen'", "file path"]),
        ('[http]\nlisten = ["0.0.0.0:8080"]\n', 2, ["key 'listen'", "'0.0.0.0:8080' is not a loopback address", "token_file"]),
        ('[http]\nlisten = ["[fd00::2]:8080"]\n', 2, ["key 'listen'", "not a loopback address"]),
        ('[http]\ntoken_file = 3\n', 2, ["key 'token_file'", "bearer tokens"]),
        ('[http]\nmax_body_bytes = 10\n', 2, ["key 'max_body_bytes'", "from 1024"]),
        ('[http]\nport = 80\n', 2, ["[http] key 'port'", "unknown key", "listen"]),
        ('[http.models.e]\nmode = "nope"\nembeddings = "embed"\n', 2, ["[http.models.e] key 'mode'", "'nope'", "['embed', 'gen']"]),
        ('[http.models.e]\nmode = "embed"\n', 1, ["[http.models.e]", "names no task"]),
        ('[http.models.e]\nmode = "embed"\nembedings = "embed"\n', 3, ["key 'embedings'", "unknown key"]),
        ('[http.models.e]\nmode = "embed"\nchat = 5\n', 3, ["[http.models.e] key 'chat'", "/v1/chat"]),
        ('[http.models.e]\nmode = "embed"\nchat = "chat"\ntimeout = -1\n', 4, ["key 'timeout'", ">= 0"]),
        ('[http.models."a b"]\nmode = "embed"\nchat = "chat"\n', 1, ["model name"]),
        ('[http]\nmodels = 3\n', 2, ["key 'models'", "[http.models.NAME]"]),
    ],
)  # fmt: skip
def test_an_http_mistake_names_the_file_line_and_key(write_config, text, line, words):
    assert_config_error(write_config(text + HTTP_MODES), line, words)


def test_a_non_loopback_address_with_a_token_file_is_accepted(write_config):
    http = load_config(write_config('[http]\nlisten = ["0.0.0.0:8080"]\ntoken_file = "/etc/t"\n' + HTTP_MODES)).http
    assert http is not None and http.listen == ("0.0.0.0:8080",) and http.token_file == "/etc/t"
