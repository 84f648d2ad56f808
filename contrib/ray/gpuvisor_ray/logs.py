"""gpuvisor's log lines in the replica's Serve log.

Serve keeps a log file per replica and captures the ``ray.serve`` logger
into it (that is how Serve tells user code to log); gpuvisor logs to
``gpuvisor``, which nothing in a replica listens to. Forwarding one to the
other puts a replica's switches, worker deaths and drains beside Serve's own
lines for that replica, where an operator looks first.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"


class ServeLogForwarder(logging.Handler):
    """Hands each record to the ``ray.serve`` logger's handlers, unchanged."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def forward_gpuvisor_log(level: int = logging.INFO) -> None:
    """Send the ``gpuvisor`` logger to Serve's, once per process, unless the
    program has given it handlers of its own (its own choice wins)."""
    gpuvisor = logging.getLogger("gpuvisor")
    if gpuvisor.handlers:
        return
    gpuvisor.addHandler(ServeLogForwarder())
    gpuvisor.setLevel(level)
    gpuvisor.propagate = False  # Serve's handlers have it; the root's would print it twice
