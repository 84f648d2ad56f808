"""The error hierarchy, and how an error crosses the wire as plain data.

Every class has a stable ``code``: the worker sends ``{"code", "message", ...}``
and the supervisor rebuilds the same class, so a caller can write
``except UnknownTask`` whether the error was raised locally or in the worker.
Nothing here is pickled: an error travels as a msgpack map of strings.

Each docstring says whose fault the error is and whether retrying can help,
because that is what a caller needs to decide what to do next.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GpuvisorError(Exception):
    """Base of every error gpuvisor raises on purpose."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", /, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready form: strings and plain values only."""
        return {"code": self.code, "message": self.message, **self.details}


class ProtocolError(GpuvisorError):
    """Bytes that do not follow the protocol: malformed msgpack, a missing or
    mistyped field, an unknown kind, a message over the size limit, a version
    we do not speak. The sender's fault; resending the same bytes cannot help."""

    code = "protocol_error"


class UnknownMode(GpuvisorError):
    """The mode is not in the configuration. The caller's fault."""

    code = "unknown_mode"


class WrongDevice(GpuvisorError, ValueError):
    """The device named is not one the supervisor drives, or the mode's
    ``devices`` leave it out. The caller's fault; retrying cannot help
    until the configuration changes. A ``ValueError`` too: a wrong value."""

    code = "wrong_device"


class NoModeLoaded(GpuvisorError):
    """A job named no mode and no mode is loaded (nothing was switched to yet,
    or the last switch failed). Pass ``mode=`` or call ``switch_mode()``."""

    code = "no_mode_loaded"


class UnknownTask(GpuvisorError):
    """The loaded mode has no handler for this task. The caller's fault."""

    code = "unknown_task"


class ModeLoadError(GpuvisorError):
    """The mode's loader raised, or its worker died or never got ready while
    loading. ``traceback`` holds the worker's traceback when there is one.
    Usually deterministic (a bad path, a missing package): retrying the same
    switch will fail the same way until the cause is fixed."""

    code = "mode_load_error"

    @property
    def traceback(self) -> str:
        return str(self.details.get("traceback", ""))


class JobFailed(GpuvisorError):
    """The task handler raised. ``remote_type`` is the exception's type name in
    the worker and ``traceback`` its traceback text. The worker goes on
    serving; whether a retry helps depends on the handler."""

    code = "job_failed"

    @property
    def remote_type(self) -> str:
        return str(self.details.get("remote_type", ""))

    @property
    def traceback(self) -> str:
        return str(self.details.get("traceback", ""))


class OutOfMemory(JobFailed):
    """The handler ran out of memory: ``torch.cuda.OutOfMemoryError`` (VRAM)
    or ``MemoryError`` (host). ``memory`` holds torch's figures at the time
    (allocated, reserved, peak bytes) when CUDA was in use. With
    ``recycle_on_oom`` (the default) the worker is replaced afterwards, since
    the allocator's fragments outlive the failed job. A smaller batch may
    succeed; the same one will fail again."""

    code = "out_of_memory"

    @property
    def memory(self) -> dict:
        value = self.details.get("memory")
        return value if isinstance(value, dict) else {}


class JobTimeout(GpuvisorError):
    """The job ran past its ``timeout``; the worker was killed to stop it (a
    stuck kernel cannot be interrupted any other way). Retrying helps only if
    the job can finish in time."""

    code = "job_timeout"


class WorkerCrashed(GpuvisorError):
    """The worker process died or hung while this job was in flight. The
    message names the exit code or signal. Not the job's fault as far as the
    supervisor can tell; an idempotent job may be retried."""

    code = "worker_crashed"


class JobCancelled(GpuvisorError):
    """The job was cancelled before it produced a result, by a non-draining
    shutdown or by a shutdown whose drain ran out of time."""

    code = "job_cancelled"


class SupervisorFailed(GpuvisorError):
    """No mode can serve: each one failed to load or crashed its worker
    more than ``max_restarts`` times in ``restart_window`` seconds, so the
    supervisor stopped respawning them rather than loop. A job of one such
    mode gets the narrower ``ModeBroken``. ``status()["failed_reason"]``
    says why. Retrying helps once a broken mode is tried again by itself
    (``broken_retry_s``) or an operator calls ``switch_mode()`` or
    ``restart()``."""

    code = "supervisor_failed"


class QueueFull(GpuvisorError):
    """``max_queue`` jobs are already waiting or running. Backpressure: the
    caller may retry later, or shed the load."""

    code = "queue_full"


class ModeBroken(SupervisorFailed):
    """The mode failed to load, or its worker died, too often in a short
    time (``max_restarts`` in ``restart_window``), so its breaker is open:
    its jobs fail at once instead of costing another load. Other modes serve
    on (a ``SupervisorFailed`` limited to one mode). ``retry_in`` (seconds) says when it will be tried again by itself;
    an operator's ``restart()`` or ``switch_mode()`` tries it now. Fix the
    mode (the log has each failure); retrying sooner cannot help."""

    code = "mode_broken"

    @property
    def retry_in(self) -> float:
        value = self.details.get("retry_in")
        return float(value) if isinstance(value, (int, float)) else 0.0


class Forbidden(GpuvisorError):
    """The request is an operator's (shutdown, switch, restart, reload) and
    the caller is not one: not the daemon's own user, root, a member of its
    ``admin_group``, nor an admin CURVE key. The caller's side; retrying
    cannot help."""

    code = "forbidden"


class RequestTooLarge(GpuvisorError):
    """The request can never be served as sent: more than a door allows
    (bytes, inputs, stop strings, tokens), or an answer that would be over
    the frame limit. Refused before any work. The caller's fault; send less
    or split it."""

    code = "request_too_large"


class DaemonUnavailable(GpuvisorError):
    """Nothing answered at the daemon's endpoint within the timeout: it is not
    running, is not reachable by this user, or is stuck. Start the daemon
    (``gpuvisor serve``) or check the endpoint; retrying helps once it runs."""

    code = "daemon_unavailable"


class ClientCutOff(GpuvisorError):
    """The daemon stopped serving this client's connection because the
    client did not read its replies: nothing could be sent to it for a while,
    or it kept sending far more requests than it read replies. The client's
    fault (or its host's: a stopped or starved process). Its queued jobs were
    cancelled; jobs that were running may have finished, but their outcomes
    are lost. Retrying on a new connection helps, if the client then reads
    its replies; ``Client`` opens one by itself."""

    code = "client_cut_off"


class StreamIncomplete(GpuvisorError):
    """A streamed job's chunks arrived with a gap in their ``seq`` numbers:
    some were lost between the daemon and this client, so the stream ends
    with this error rather than a success. Not the caller's fault; the job
    itself may have finished, but its outcome is not known here. Retrying
    helps if the job is idempotent."""

    code = "stream_incomplete"


class ShuttingDown(GpuvisorError):
    """The supervisor is shutting down and accepts no new work. Retrying
    against this supervisor cannot help."""

    code = "shutting_down"


_BY_CODE: dict[str, type[GpuvisorError]] = {
    cls.code: cls
    for cls in (
        GpuvisorError,
        ProtocolError,
        UnknownMode,
        WrongDevice,
        NoModeLoaded,
        UnknownTask,
        ModeLoadError,
        JobFailed,
        OutOfMemory,
        JobTimeout,
        WorkerCrashed,
        JobCancelled,
        ShuttingDown,
        SupervisorFailed,
        QueueFull,
        ModeBroken,
        Forbidden,
        RequestTooLarge,
        DaemonUnavailable,
        ClientCutOff,
        StreamIncomplete,
    )
}

ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_wire(data: Any) -> GpuvisorError:
    """Rebuild an error sent as a map; an unknown code keeps the base class
    (a newer peer may know more codes) and says which code it was."""
    if not isinstance(data, dict):
        return ProtocolError(f"error field is {type(data).__name__}, expected a map")
    code = data.get("code")
    message = data.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        return ProtocolError("error map needs string 'code' and 'message'")
    details = {k: v for k, v in data.items() if k not in ("code", "message") and isinstance(k, str)}
    cls = _BY_CODE.get(code)
    error = GpuvisorError(f"[{code}] {message}") if cls is None else cls(message)
    error.details = details  # not as **kwargs: a peer may send any key, "self" included
    return error
