"""The one holder of the configuration inside the engine.

The loop, each device, each breaker and the queue's starvation bound read
the configuration through the same ``Settings``, so a reload is one
assignment on the loop thread and no part keeps a copy to sync by hand.
"""

from __future__ import annotations

from typing import Any

from supervisor.config import Config


class Settings:
    def __init__(self, config: Config) -> None:
        self.config = config

    def __getattr__(self, name: str) -> Any:
        # Only for names Settings lacks: a breaker reads ``max_restarts`` as
        # it reads any config's, and always the current one.
        return getattr(self.config, name)
