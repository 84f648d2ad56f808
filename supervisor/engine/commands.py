"""What API threads hand to the loop. A command carries the caller's
Future, and the loop gives that Future its one outcome."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from supervisor.events import Subscription
from supervisor.futures import JobFuture


@dataclass(eq=False)
class QueuedJob:
    id: int
    task: str
    frames: list  # the JOB message, encoded by the submitting thread
    mode: str | None
    timeout: float | None  # None: the config's job_timeout; 0: none at all
    future: JobFuture
    retries: int = 0  # the caller's word that the job is idempotent: runs again after a crash
    deadline: float | None = None  # when it must be done; set when it starts running
    started: bool = False  # the worker has begun it (the head, or one of the head's batch)
    queued_at: float = 0.0  # when it was queued: its age decides a mode's turn (the starvation bound)
    on_chunk: Callable[[Any], None] | None = None  # a streamed job's sink, called on the loop thread
    chunks: int = 0  # CHUNKs received so far; the next must carry seq chunks + 1
    stream_broken: bool = False  # a chunk could not be read: the stream has ended with an error
    stopped: bool = False  # a stream its caller cancelled while it ran: its Future is cancelled, its chunks dropped
    cancel_sent: bool = False  # the worker was told (CANCEL) to stop it
    ran_in: str | None = None  # the mode of the worker it was handed to (its metrics' label)
    # A client's own timeout, under the operator's: past it the job fails for its caller (JobTimeout) and
    # the worker goes on with it (its answer dropped), up to ``timeout``. None: ``timeout`` alone.
    give_up: float | None = None
    give_up_at: float | None = None  # when, once it runs
    given_up: bool = False
    packed: bool = False  # its answers stay the msgpack the worker sent (a door forwards them to its client)

    def deadlines(self) -> list[float]:
        """When something must happen to it while it runs: its caller gives
        up on it, its worker is killed."""
        when = [] if self.given_up or self.give_up_at is None else [self.give_up_at]
        return when if self.deadline is None else [*when, self.deadline]


@dataclass(eq=False)
class QueuedSwitch:
    mode: str | None  # None only with ``restart``: restart the mode in force
    future: Future | None  # None: implicit, for jobs that need its mode
    restart: bool = False  # restart(): a fresh worker even if the mode is loaded
    device: str | None = None  # the device it applies to; None: the engine decides (and records it here)


@dataclass(eq=False)
class Shutdown:
    drain: bool
    timeout: float | None  # bounds the drain; what has not run by then is cancelled
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class Reload:
    """Swap the configuration (SIGHUP). The loaded worker is left alone; a
    mode's new entry applies the next time that mode is loaded."""

    config: Any
    future: Future = field(default_factory=Future)  # once the spares it stopped are reaped
    swapped: threading.Event = field(default_factory=threading.Event)  # the loop reads the new one from now on


@dataclass(eq=False)
class CancelJob:
    """A caller gave up on the job whose Future is ``target``: a queued one
    never runs; a stream that runs is stopped at its next chunk.
    ``future``, when given, gets True if either happened."""

    target: JobFuture
    future: Future | None = None


@dataclass(eq=False)
class Unload:
    """An operator frees ``device``: its worker is stopped once the jobs in
    flight are done. The mode stays in force, so the next job that needs it
    loads it again (as after ``idle_unload_s``). The Future's result is
    ``{"device", "mode", "pid"}``, once the worker is gone, or None when
    nothing was loaded there (or a switch was under way)."""

    device: str
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class Follow:
    """A follower of the supervisor's events: its queue gets what is under
    way now, then every event until it is closed (by its reader, or when the
    supervisor stops)."""

    subscription: Subscription
    future: None = None


Command = QueuedJob | QueuedSwitch | Shutdown | Reload | CancelJob | Unload | Follow
