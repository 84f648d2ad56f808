"""Stop strings in the ``generate`` mode: the text ends before the first
one, nothing of one (not even a part) is ever streamed, and each new
character is read once per stop, never every prefix of every stop at every
token.

The matcher is pure Python over text (importing the mode module imports no
torch), so it is driven here with the texts a tokenizer would give token by
token; ``test_generate_model.py`` runs it under the real model and
tokenizer and checks the mode's bounds on the stops a job may give, which
the last test here meets through the HTTP door."""

from __future__ import annotations

import random

import pytest

from tests.test_http import MODEL_T, curl, http_config, http_socket
from worker.modes.detokenize import Detokenizer as _Detokenizer
from worker.modes.detokenize import Stops as _Stops


class Reference:
    """The matcher as it was before it was made linear (every prefix of every
    stop tried at every step, every stop searched for in all the text not yet
    shown): the behaviour the new one must keep, but for one fix. A trailing
    U+FFFD is set aside before the stops are looked for, not after: it hid
    the start of a stop that ended in a character still incomplete, which
    was then shown, and the stop missed."""

    def __init__(self, stops):
        self.stops, self.sent, self.stopped = tuple(stops), "", False

    def held(self, text):
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def step(self, text, final):
        if not final:
            text = text.rstrip("\ufffd")
        if self.stops:
            cut = min((i for i in (text.find(s, len(self.sent)) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                text, self.stopped = text[:cut], True
            elif not final:
                text = text[: len(text) - self.held(text)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


def stream(stops, pieces):
    """Feed the text a piece (a token's worth) at a time, the last one final;
    the deltas shown, and the matcher at the end."""
    detok = _Detokenizer(None, stops)
    text, deltas = "", []
    for i, piece in enumerate(pieces):
        text += piece
        deltas.append(detok.step(text, final=i == len(pieces) - 1))
        if detok.stopped:
            break
    return deltas, detok


@pytest.mark.unit
def test_a_partial_stop_at_the_end_is_held_back_then_released_when_it_breaks_off():
    deltas, detok = stream(["END"], ["ok ", "E", "N", "D?"])
    assert deltas == ["ok ", "", "", ""] and detok.stopped and detok.sent == "ok "
    deltas, detok = stream(["END"], ["ok ", "E", "N", "o", " more"])
    assert deltas == ["ok ", "", "", "ENo", " more"] and not detok.stopped


@pytest.mark.unit
def test_a_partial_stop_is_released_when_the_text_ends_there():
    deltas, detok = stream(["END"], ["ok ", "EN"])
    assert deltas == ["ok ", "EN"] and not detok.stopped


@pytest.mark.unit
def test_a_stop_spanning_tokens_is_cut_wherever_it_began():
    deltas, detok = stream(["lo w"], ["he", "llo", " ", "wo", "rld"])
    assert deltas == ["he", "l", "", ""] and detok.stopped and detok.sent == "hel"


@pytest.mark.unit
def test_the_earliest_stop_wins_whatever_the_order_they_were_given_in():
    for stops in (["cd", "bc"], ["bc", "cd"]):
        _, detok = stream(stops, ["a", "bcd"])
        assert detok.sent == "a" and detok.stopped
    _, detok = stream(["xyz", "c"], ["ab", "cxyz"])
    assert detok.sent == "ab"


@pytest.mark.unit
def test_overlapping_and_self_overlapping_stops():
    # "aab": after "aa", a third "a" keeps the last two as a possible start.
    deltas, detok = stream(["aab"], ["a", "a", "a", "a", "b"])
    assert deltas == ["", "", "a", "a", ""] and detok.sent == "aa" and detok.stopped
    # "abab": "aba" may be the start of it; so may "ab" once "abab" fails on "c".
    deltas, detok = stream(["abab"], ["ab", "a", "c"])
    assert deltas == ["", "", "abac"] and not detok.stopped
    deltas, detok = stream(["abab", "bac"], ["ab", "a", "c"])
    assert deltas == ["", "", "a"] and detok.sent == "a" and detok.stopped


@pytest.mark.unit
def test_unicode_stops_and_incomplete_characters():
    deltas, detok = stream(["é!"], ["caf", "é", "!"])
    assert deltas == ["caf", "", ""] and detok.sent == "caf"
    deltas, detok = stream(["🙂🙃"], ["hi ", "🙂", "🙂", "🙃"])
    assert deltas == ["hi ", "", "🙂", ""] and detok.sent == "hi 🙂"
    # U+FFFD at the end is a character whose bytes are still coming: held back,
    # then decoded as that character once they came.
    detok = _Detokenizer(None, ["zz"])
    assert [detok.step("a\ufffd", False), detok.step("aé", False), detok.step("aéb", True)] == ["a", "é", "b"]


@pytest.mark.unit
def test_a_stop_whose_last_character_is_still_incomplete_is_neither_shown_in_part_nor_missed():
    detok = _Detokenizer(None, ["aé"])
    assert detok.step("xa\ufffd", False) == "x"
    assert detok.step("xaé", False) == "" and detok.stopped and detok.sent == "x"


@pytest.mark.unit
def test_no_stops_streams_everything_but_a_trailing_replacement_character():
    detok = _Detokenizer(None)
    assert [detok.step("ab", False), detok.step("abc\ufffd", False), detok.step("abcé", True)] == ["ab", "c", "é"]


def held(stops, text):
    """What a matcher that read ``text`` in one piece holds back."""
    matcher = _Stops(stops)
    assert matcher.scan(text, 0) == -1
    return matcher.held()


@pytest.mark.unit
def test_held_is_the_longest_proper_prefix_of_any_stop_the_text_ends_with():
    assert held(["abcab", "x", "bcd"], "zzabca") == 4
    assert held(["abcab", "x", "bcd"], "zzbc") == 2
    assert held(["x"], "zzy") == 0  # a one-character stop has no proper prefix
    assert held(["abc"], "") == 0
    assert held([], "abc") == 0


def grow(rng, text, alphabet, keep_at_least=0):
    """The text a token later: mostly longer, sometimes with its last
    characters redone (a U+FFFD become its character, a word's end
    re-merged), but never what was already shown (``keep_at_least``)."""
    if len(text) > keep_at_least and rng.random() < 0.2:
        text = text[: rng.randint(keep_at_least, len(text) - 1)]
    return text + "".join(rng.choices(alphabet, k=rng.randint(0, 4)))


@pytest.mark.unit
def test_the_matcher_does_what_the_quadratic_one_did_on_random_streams():
    """Random texts over a small alphabet (so stops, partial stops and
    overlaps are frequent), against random stops, step by step."""
    rng = random.Random(18)
    for _ in range(4000):
        stops = ["".join(rng.choices("ab\u00e9\U0001f642", k=rng.randint(1, 6))) for _ in range(rng.randint(0, 4))]
        reference, detok = Reference(stops), _Detokenizer(None, stops)
        texts, redone = [""], False
        steps = rng.randint(1, 14)
        for step in range(steps):
            texts.append(grow(rng, texts[-1], "ab\u00e9\U0001f642\ufffd", len(detok.sent)))
            final = step == steps - 1
            assert detok.step(texts[-1], final) == reference.step(texts[-1], final), (stops, texts)
            assert detok.stopped == reference.stopped
            # Redone text after what was shown may complete a stop begun in it; a decoder
            # only ever redoes its trailing U+FFFD, which nothing shows.
            redone = redone or not texts[-1].startswith(texts[-2].rstrip("\ufffd"))
            assert redone or not any(s in detok.sent for s in stops), (stops, texts)
            if detok.stopped:
                break


@pytest.mark.unit
def test_what_is_held_after_reading_piece_by_piece_is_what_a_whole_read_holds():
    rng = random.Random(7)
    for _ in range(2000):
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 7))) for _ in range(rng.randint(1, 3))]
        matcher, text = _Stops(stops), ""
        for _ in range(rng.randint(1, 14)):
            text = grow(rng, text, "abc")
            if matcher.scan(text, 0) >= 0:
                assert any(s in text for s in stops)
                break
            assert matcher.held() == Reference(stops).held(text), (stops, text)


@pytest.mark.unit
def test_a_long_stop_is_read_once_not_once_per_token():
    """A 100,000-character stop against 50,000 tokens that each might be
    where it goes on: checking every prefix of it at every token would take
    days. Nothing is timed: the test's own timeout stops the old way."""
    stop = "ab" * 50_000
    detok = _Detokenizer(None, [stop])
    text = "x"
    assert detok.step(text, False) == "x"
    for _ in range(50_000 - 1):
        text += "ab"
        assert detok.step(text, False) == ""
    assert detok.step(text + "ab", False) == "" and detok.stopped and detok.sent == "x"
    detok = _Detokenizer(None, [stop])
    assert [detok.step("x" + "ab" * n, False) for n in range(1, 3000)] == ["x"] + [""] * 2998
    assert detok.step("x" + "ab" * 2999 + "c", True) == "ab" * 2999 + "c"


@pytest.mark.unit
@pytest.mark.parametrize("stop", ["a", "ab", "aaaa", "abcabd", "\U0001f642x\U0001f642"])
def test_every_prefix_of_a_stop_is_held_and_the_whole_is_cut(stop):
    for k in range(1, len(stop)):
        assert held([stop], "zz" + stop[:k]) == k
    _, detok = stream([stop], ["zz", *stop])
    assert detok.stopped and detok.sent == "zz"


@pytest.mark.daemon
@pytest.mark.slow
def test_through_the_http_door_past_the_bounds_is_a_400_and_a_mode_may_allow_more(daemon):
    """The mode's bounds as a caller of the OpenAI door meets them, with the
    door's own bounds set wider: the mode refuses, and the door answers 400
    before any text. The tiny model
    loads in each mode's worker (seconds each)."""
    tiny = {"device": "cpu"}
    modes = {
        "strict": {"loader": "worker.modes.generate:load", "args": tiny},
        "wide": {"loader": "worker.modes.generate:load", "args": {**tiny, "max_stops": 6, "max_stop_chars": 1000}},
    }
    models = {
        "strict": {"mode": "strict", "completions": "generate"},
        "wide": {"mode": "wide", "completions": "generate"},
    }
    # The door's own bounds (4 of 256 by default) opened wide: here the modes' bounds are what answers.
    d = daemon(config_text=http_config(modes, models, http={"max_stop": 8, "max_stop_chars": 2000}))
    unix = http_socket(d)

    def complete(model: str, stop: list[str]) -> tuple[int, dict]:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "stop": stop}
        return curl("http://gpuvisor/v1/completions", body, unix=unix, args=("--max-time", str(MODEL_T)))

    status, answer = complete("strict", [f"never-{i}" for i in range(5)])
    assert status == 400 and "at most 4 strings (the mode's max_stops), got 5" in answer["error"]["message"], answer
    status, answer = complete("strict", ["x" * 257])
    assert status == 400 and "at most 256 characters (the mode's max_stop_chars)" in answer["error"]["message"]
    status, answer = complete("strict", [f"never-{i}" for i in range(3)] + ["x" * 256])
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer
    status, answer = complete("wide", [f"never-{i}" for i in range(5)] + ["x" * 1000])
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length", answer
    status, answer = complete("wide", [f"never-{i}" for i in range(7)])
    assert status == 400 and "at most 6 strings" in answer["error"]["message"], answer
