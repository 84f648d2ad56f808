"""An example mode: ``score`` (batched) and ``words`` (streamed).

The "model" is a table of word weights, so the example runs anywhere, in a
blink; a real mode builds its model in ``load`` the same way (see
docs/modes.md). gpuvisor imports this file only in its worker process, so
``load`` may import torch and take the GPU: the daemon never does.
"""

from __future__ import annotations

from typing import Any

from worker.batching import batched

GOOD = {"good": 1.0, "great": 2.0, "fine": 0.5}
BAD = {"bad": -1.0, "awful": -2.0, "meh": -0.5}


def load(scale: float = 1.0, max_words: int = 1000) -> dict:
    """Runs once per worker, with the mode's ``args`` as keyword arguments;
    returns the tasks, by name. Check the arguments here: a mistake then
    fails the switch with its message, not every job later."""
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scorer: 'scale' must be a number, got {scale!r}")
    if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1:
        raise ValueError(f"scorer: 'max_words' must be a whole number >= 1, got {max_words!r}")
    weights = {**GOOD, **BAD}  # a real mode: model = AutoModel.from_pretrained(path).to(device)

    def words_of(payload: Any) -> list[str]:
        text = payload.get("text") if isinstance(payload, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"scorer: the payload must be {{'text': STRING}}, got {payload!r}")
        words = text.lower().split()
        if len(words) > max_words:
            raise ValueError(f"scorer: {len(words)} words, more than max_words ({max_words})")
        return words

    @batched(max_batch=32, max_delay_ms=5)
    def score(payloads: list) -> list:
        """Every waiting ``score`` job in one call: one forward pass on a
        GPU. Checked first, so a bad payload fails before the costly part
        (it fails every job of its batch)."""
        texts = [words_of(payload) for payload in payloads]
        return [
            {"score": scale * sum(weights.get(word, 0.0) for word in words), "batch": len(payloads)} for words in texts
        ]

    def words(payload: Any):
        """A stream: each scored word as it comes, then the total."""
        total = 0.0
        for word in words_of(payload):
            weight = scale * weights.get(word, 0.0)
            total += weight
            yield {"word": word, "score": weight}
        return {"score": total}

    return {"score": score, "words": words}
