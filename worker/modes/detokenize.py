"""Text out of a growing list of token ids, a delta at a time: whole
characters only, cut before the first stop string, and never a part of a
stop string shown (``worker.modes.generate`` streams what this gives)."""

from __future__ import annotations

from typing import Any


class Stops:
    """Finds stop strings in a text that grows a token at a time, reading
    each new character once per stop: one KMP automaton per stop, built
    once, whose state after the text so far is the longest prefix of that
    stop the text ends with. A token's check so costs what the token added,
    never the stop's length times itself (slicing every prefix of every stop
    at every token cost seconds per token for a 100,000-character stop).
    When the text changed behind what was read (a decoder may rewrite its
    last characters), it is searched whole once, and each automaton restarts
    on its last ``len(stop) - 1`` characters: no longer suffix can be a
    proper prefix of the stop."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = tuple(stops)
        self._borders = [_borders(stop) for stop in self.stops]
        self._states = [0] * len(self.stops)
        self._read: str | None = ""  # the text the automata have read; None: start again

    def __bool__(self) -> bool:
        return bool(self.stops)

    def scan(self, text: str, start: int) -> int:
        """Read ``text`` (all the text so far): where the earliest stop in
        ``text[start:]`` begins, or -1. ``start`` is where the text not yet
        shown begins: an earlier stop would have been shown in part."""
        read, self._read = self._read, text
        if read is None or not text.startswith(read):
            self._states = [_suffix_in_prefix(text, stop, b) for stop, b in zip(self.stops, self._borders, strict=True)]
            return min((i for i in (text.find(stop, start) for stop in self.stops) if i >= 0), default=-1)
        found = []
        for n, (stop, borders) in enumerate(zip(self.stops, self._borders, strict=True)):
            k, whole = self._states[n], len(stop)
            for at in range(len(read), len(text)):
                char = text[at]
                if k == whole:
                    k = borders[k - 1]
                while k and char != stop[k]:
                    k = borders[k - 1]
                if char == stop[k]:
                    k += 1
                if k == whole and at + 1 - whole >= start:
                    found.append(at + 1 - whole)  # this stop's first: any later one of it begins later
                    break
            self._states[n] = k
        if found:
            self._read = None  # the automata stopped reading where their stop was
        return min(found, default=-1)

    def held(self) -> int:
        """How many characters at the end of the text read last could be
        the start of a stop (the longest proper prefix of a stop it ends
        with)."""
        automata = zip(self.stops, self._borders, self._states, strict=True)
        return max((k if k < len(stop) else b[k - 1] for stop, b, k in automata), default=0)


def _borders(stop: str) -> list[int]:
    """KMP's prefix function: ``out[i]``, the length of the longest proper
    prefix of ``stop[: i + 1]`` that is also its suffix."""
    out = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = out[k - 1]
        if stop[i] == stop[k]:
            k += 1
        out[i] = k
    return out


def _suffix_in_prefix(text: str, stop: str, borders: list[int]) -> int:
    """The longest proper prefix of ``stop`` that ``text`` ends with."""
    if len(stop) < 2:
        return 0
    k = 0
    for char in text[-(len(stop) - 1) :]:  # shorter than the stop: k never reaches a whole match
        while k and char != stop[k]:
            k = borders[k - 1]
        if char == stop[k]:
            k += 1
    return k


class Detokenizer:
    """Turns a growing list of ids into text deltas. Decoding everything so
    far and emitting the new suffix keeps multi-token characters and word
    boundaries right; text ending in U+FFFD is held back, since it is most
    likely a character whose remaining bytes are still to come. With
    ``stops``, the text ends before the first stop string (``stopped`` is
    then set), and text that could be the start of one is held back until
    it is known not to be: a reader never sees a stop string, not even a
    part of one (which is why a trailing U+FFFD goes before the stops are
    looked for: the character it stands for may be the rest of a stop)."""

    def __init__(self, tokenizer: Any, stops: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = Stops(stops)
        self.sent = ""
        self.stopped = False

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def delta(self, ids: list[int], final: bool) -> str:
        return self.step(self.text(ids), final)

    def step(self, text: str, final: bool) -> str:
        """What of ``text`` (all the text so far) may be shown now that was
        not before."""
        if not final:
            text = text.rstrip("\ufffd")
        if self.stops:
            cut = self.stops.scan(text, len(self.sent))
            if cut >= 0:
                text, self.stopped = text[:cut], True
            elif not final:
                text = text[: len(text) - self.stops.held()]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new
