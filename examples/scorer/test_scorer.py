"""The example mode's tests: each runs the mode in a real worker process,
as the daemon will (gpuvisor.testing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuvisor.testing import load_mode, mode_fixture
from supervisor import JobFailed, ModeLoadError

HERE = Path(__file__).resolve().parent

scorer = mode_fixture("scorer:load", {"scale": 2.0}, loader_path=[HERE])


def test_score_weighs_the_words(scorer):
    assert scorer.call("score", {"text": "good but awful"}) == {"score": -2.0, "batch": 1}


def test_jobs_sent_together_run_as_one_batch(scorer):
    results = scorer.batch("score", [{"text": "good"}, {"text": "great"}, {"text": "meh"}])
    assert [r["score"] for r in results] == [2.0, 4.0, -1.0]
    assert {r["batch"] for r in results} == {3}


def test_words_streams_each_word_then_the_total(scorer):
    stream = scorer.stream("words", {"text": "fine day"})
    assert list(stream) == [{"word": "fine", "score": 1.0}, {"word": "day", "score": 0.0}]
    assert stream.result() == {"score": 1.0}


def test_a_bad_payload_is_the_jobs_error_and_the_worker_serves_on(scorer):
    pid = scorer.pid
    with pytest.raises(JobFailed, match="the payload must be"):
        scorer.call("score", "not a map")
    assert scorer.call("score", {"text": "good"})["score"] == 2.0
    assert scorer.pid == pid


def test_a_bad_argument_fails_the_load_naming_it():
    with pytest.raises(ModeLoadError, match="'max_words' must be a whole number"):
        load_mode("scorer:load", {"max_words": 0}, loader_path=[HERE])
