"""The ``embed`` mode with the real all-MiniLM-L6-v2 model, on CPU here."""

from __future__ import annotations

import math

import pytest

from supervisor import JobFailed, Supervisor

pytestmark = pytest.mark.slow
T = 180


@pytest.fixture(scope="module")
def embed_sup():
    sup = Supervisor().start()
    result = sup.switch_mode("embed").result(T)
    assert result["status"] == "loaded" and result["load_seconds"] > 0
    yield sup
    sup.shutdown(drain=True)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embed_returns_a_float32_array_of_one_unit_vector_per_text(embed_sup):
    texts = ["hello", "hi", "a longer sentence about graphics cards and their memory"]
    vectors = embed_sup.submit("embed", {"texts": texts}).result(T)
    assert type(vectors).__name__ == "ndarray" and vectors.dtype.str == "<f4" and vectors.shape == (3, 384)
    for v in vectors:
        assert math.isclose(math.sqrt(float(dot(v, v))), 1.0, rel_tol=1e-5)


def test_a_paraphrase_scores_higher_than_an_unrelated_sentence(embed_sup):
    anchor, paraphrase, unrelated = embed_sup.submit(
        "embed",
        {
            "texts": [
                "A man is playing a guitar.",
                "Someone plays the guitar.",
                "The central bank raised interest rates.",
            ]
        },
    ).result(T)
    assert dot(anchor, paraphrase) > 0.6
    assert dot(anchor, unrelated) < 0.2
    assert dot(anchor, paraphrase) > dot(anchor, unrelated) + 0.4


def test_batches_give_the_same_vectors_as_single_texts(embed_sup):
    texts = [f"sentence number {i}" for i in range(70)]  # more than one internal batch
    together = embed_sup.submit("embed", {"texts": texts}).result(T)
    alone = embed_sup.submit("embed", {"texts": [texts[65]]}).result(T)[0]
    assert max(abs(a - b) for a, b in zip(together[65], alone, strict=True)) < 1e-4


def test_bad_payloads_are_clear_job_failures_and_the_model_stays_loaded(embed_sup):
    pid = embed_sup.status()["worker_pid"]
    for bad in ({"texts": "not a list"}, {"texts": [1, 2]}, None, {"text": ["typo"]}):
        with pytest.raises(JobFailed, match=r"payload must be \{'texts'"):
            embed_sup.submit("embed", bad).result(T)
    assert embed_sup.submit("embed", {"texts": []}).result(T).shape == (0, 384)
    assert embed_sup.status()["worker_pid"] == pid
