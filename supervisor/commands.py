"""Where two helpers used to live, until the daemon and the client import
them from their new homes (``supervisor.mailbox``, ``supervisor.futures``)."""

from supervisor.futures import settle
from supervisor.mailbox import empty_pipe as drain_wakeups

__all__ = ["drain_wakeups", "settle"]
