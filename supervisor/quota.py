"""Who holds how much of the queue: jobs and bytes, in all and per client.

One shared count (``max_queue``) let one client fill the queue for all: a
client that queued 3,000 jobs made another client's single job fail with
``QueueFull``, and nothing bounded the bytes a queue of large payloads
held. So each job is counted against its client too, and a client over its
share is refused while the others are still admitted; the queue is bounded
in bytes as in jobs. A client is whatever the door that took the job
calls it: a ZeroMQ connection, an HTTP token or connection. This process's
own calls (``submit()`` without a client) are the operator's program: they
count against the whole queue only.

A job takes its share when it is submitted, in the caller's thread, and
gives it back exactly once when it ends (the Future's ``hold_slot``), so
a job over a bound never reaches the queue (its Future fails with
``QueueFull`` at once) and the counts are exact whatever way a job ends. One lock guards a few additions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from protocol import QueueFull, RequestTooLarge


@dataclass(frozen=True)
class Limits:
    jobs: int  # max_queue
    bytes: int  # max_queue_bytes
    client_jobs: int  # max_queue_per_client
    client_bytes: int  # max_queue_bytes_per_client


class QueueQuota:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._jobs = 0
        self._bytes = 0
        self._by_client: dict[str, list[int]] = {}  # client -> [jobs, bytes]

    def take(self, client: str | None, nbytes: int) -> Callable[[], None]:
        """Count a job of ``nbytes`` against ``client`` and the queue; the
        returned callable gives it back (call it once). ``QueueFull`` when a
        bound is reached now, ``RequestTooLarge`` when the job could never
        fit."""
        lim = self.limits
        if nbytes > (lim.client_bytes if client is not None else lim.bytes):
            bound = "max_queue_bytes_per_client" if client is not None else "max_queue_bytes"
            limit = lim.client_bytes if client is not None else lim.bytes
            raise RequestTooLarge(
                f"a job of {nbytes:,} bytes is over {bound} ({limit:,}): it can never be queued; send less at a time"
            )
        with self._lock:
            held = self._by_client.get(client, [0, 0]) if client is not None else [0, 0]
            if client is not None and held[0] >= lim.client_jobs:
                jobs = f"{held[0]:,} job{'s' if held[0] > 1 else ''}"
                raise QueueFull(
                    f"this client already has {jobs} queued or running (max_queue_per_client); "
                    "other clients are still served"
                )
            if client is not None and held[1] + nbytes > lim.client_bytes:
                over = f"max_queue_bytes_per_client ({lim.client_bytes:,})"
                raise QueueFull(f"this client's queued jobs hold {held[1]:,} bytes; {nbytes:,} more is over {over}")
            if self._jobs >= lim.jobs:
                raise QueueFull(f"{lim.jobs} jobs are already queued or running (max_queue)")
            if self._bytes + nbytes > lim.bytes:
                over = f"max_queue_bytes ({lim.bytes:,})"
                raise QueueFull(f"the queue holds {self._bytes:,} bytes; {nbytes:,} more is over {over}")
            self._jobs += 1
            self._bytes += nbytes
            if client is not None:
                held = self._by_client.setdefault(client, [0, 0])
                held[0] += 1
                held[1] += nbytes

        def release() -> None:
            with self._lock:
                self._jobs -= 1
                self._bytes -= nbytes
                if client is not None:
                    mine = self._by_client[client]
                    mine[0] -= 1
                    mine[1] -= nbytes
                    if not mine[0]:
                        del self._by_client[client]

        return release

    def held(self) -> dict[str, int]:
        """For the status: jobs and bytes held now, and by how many clients."""
        with self._lock:
            return {"jobs": self._jobs, "bytes": self._bytes, "clients": len(self._by_client)}
