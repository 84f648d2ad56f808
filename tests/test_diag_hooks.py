"""``diag``'s test hooks write where the caller says: a file (``count``'s
``record``, ``crash``'s ``once_file``) or the daemon's log (``crash``'s
``say``, ``chatter``). The worker writes as the daemon's user, and the
built-in config serves ``diag`` to every caller the socket lets in, so the
hooks are off unless the mode's ``args`` say ``test_hooks = true``: each
payload that asks for one is refused with a ``ValueError`` naming that
argument, and nothing is written."""

from __future__ import annotations

import pytest

from gpuvisor.testing import load_mode
from supervisor import JobFailed, ModeLoadError
from tests.helpers import T
from tests.helpers.config import DIAG, DIAG_HOOKS

FORGED = "gpuvisor ERROR a line forged by a caller"


@pytest.mark.daemon
def test_the_built_in_diag_refuses_every_test_hook_and_writes_nothing(daemon, tmp_path):
    d = daemon()  # the built-in config
    record, once = tmp_path / "record", tmp_path / "once"
    hooks = [
        ("count", {"n": 2, "record": str(record)}, "count's 'record'"),
        ("crash", {"how": "kill", "once_file": str(once)}, "crash's 'once_file'"),
        ("crash", {"how": "kill", "say": f"last words\n{FORGED}"}, "crash's 'say'"),
        ("chatter", {"seconds": 1}, "chatter"),
    ]
    with d.client() as c:
        pid = c.submit("pid", mode="diag").result(T)
        for task, payload, hook in hooks:
            with pytest.raises(JobFailed) as refused:
                c.submit(task, payload, mode="diag").result(T)
            assert refused.value.remote_type == "ValueError", refused.value
            assert f"diag: {hook} is a test hook" in str(refused.value), refused.value
            assert "args = { test_hooks = true }" in str(refused.value), refused.value
        assert c.submit("count", {"n": 2}, mode="diag").result(T) == {"count": 2}, "without a hook it serves"
        assert c.submit("pid", mode="diag").result(T) == pid, "no crash went through: the same worker serves"
    assert not record.exists() and not once.exists()
    assert FORGED not in d.output()


@pytest.mark.process
def test_test_hooks_true_turns_them_on_and_anything_but_a_bool_fails_the_load(tmp_path):
    record = tmp_path / "record"
    with load_mode(DIAG_HOOKS["loader"], DIAG_HOOKS["args"]) as hooked:
        assert hooked.call("count", {"n": 2, "record": str(record)}) == {"count": 2}
    assert record.read_text().split() == ["0", "1", "closed"]
    with pytest.raises(ModeLoadError, match="diag: 'test_hooks' must be true or false, got 'yes'"):
        load_mode(DIAG, {"test_hooks": "yes"})
