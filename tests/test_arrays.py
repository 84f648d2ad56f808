"""Arrays on the wire: raw frames after the header, bit-exact, never pickled.

The first half checks the codec alone (what a foreign peer must produce and
what we refuse); the second sends arrays through a real worker and back.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from protocol import ARRAY_EXT, Job, ProtocolError, Result, decode_from_worker, decode_to_worker, encode, encode_job
from supervisor import JobFailed
from tests.helpers import T
from tests.helpers.config import config_text

DTYPES = ["<f4", "<f8", "<f2", ">f4", "<i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1", "<c8", "<c16"]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)]


def _array(dtype: str, shape: tuple, seed: int = 0) -> np.ndarray:
    """Random bits of every kind, NaNs and infinities included: equality of
    the bytes is the test, not equality of the values."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape, dtype=np.int64)) * dt.itemsize, dtype=np.uint8)
    if dt.kind == "b":
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.unit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_dtype_and_shape_round_trips_bit_exactly(dtype, shape):
    arr = _array(dtype, shape)
    frames = encode_job(1, "echo", {"a": arr, "nested": [arr, {"again": arr}]})
    assert len(frames) == 4  # the header, then one frame per array
    job = decode_to_worker(frames)
    for got in (job.payload["a"], job.payload["nested"][0], job.payload["nested"][1]["again"]):
        assert _same(got, arr)


@pytest.mark.unit
def test_non_contiguous_views_arrive_as_their_values_in_c_order():
    base = _array("<f8", (6, 8), seed=3)
    for view in (base[::2, 1::3], base.T, base[:, ::-1], np.asfortranarray(base)):
        got = decode_to_worker(encode_job(1, "echo", view)).payload
        assert np.array_equal(got, view) and got.flags.c_contiguous and _same(got, view)


@pytest.mark.unit
def test_a_large_array_is_sent_from_its_own_memory_not_copied():
    arr = np.arange(1 << 20, dtype=np.float32)
    frames = encode_job(1, "echo", arr)
    buffer = frames[1]
    assert isinstance(buffer, memoryview) and np.shares_memory(np.frombuffer(buffer, np.float32), arr)


@pytest.mark.unit
def test_the_header_describes_each_array_with_frame_dtype_and_shape():
    """The layout docs/protocol.md promises a foreign peer, byte for byte."""
    arr = np.arange(6, dtype="<i4").reshape(2, 3)
    header, data = encode_job(9, "echo", {"x": arr})
    refs = []
    msgpack.unpackb(header, ext_hook=lambda code, raw: refs.append((code, msgpack.unpackb(raw))) or None)
    assert refs == [(ARRAY_EXT, [1, "<i4", [2, 3]])]
    assert bytes(data) == arr.tobytes()


@pytest.mark.unit
def test_a_peer_may_send_arrays_as_plain_bytes_frames():
    header = msgpack.packb(
        {"v": 1, "k": "result", "job": 3, "value": msgpack.ExtType(ARRAY_EXT, msgpack.packb([1, "<u2", [2]]))}
    )
    msg = decode_from_worker([header, b"\x01\x00\x02\x01"])
    assert isinstance(msg, Result) and msg.value.tolist() == [1, 258]


def _ref(index, dtype, shape):
    return msgpack.ExtType(ARRAY_EXT, msgpack.packb([index, dtype, shape]))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "extra", "match"),
    [
        (_ref(2, "<f4", [1]), [b"\0" * 4], "reference to frame 2"),
        (_ref(0, "<f4", [1]), [b"\0" * 4], "reference to frame 0"),
        ([_ref(1, "<f4", [1]), _ref(1, "<f4", [1])], [b"\0" * 4], "referenced twice"),
        (_ref(1, "<f4", [2]), [b"\0" * 4], "has 4 bytes; dtype <f4 shape \\[2\\] needs 8"),
        (_ref(1, "|O", [1]), [b"\0" * 8], "not a plain numeric"),
        (_ref(1, "|V4", [1]), [b"\0" * 4], "not a plain numeric"),
        (_ref(1, "<M8[s]", [1]), [b"\0" * 8], "not a plain numeric"),
        (_ref(1, "not a dtype", [1]), [b"\0" * 4], "not a plain numeric"),
        (_ref(1, "<f4", [-1]), [b""], "shape"),
        (_ref(1, "<f4", "4"), [b"\0" * 16], "shape"),
        (msgpack.ExtType(ARRAY_EXT, b"\xc1"), [b""], "malformed array reference"),
        (msgpack.ExtType(ARRAY_EXT, msgpack.packb([1, "<f4"])), [b""], "malformed array reference"),
        (1, [b"\0" * 4], "frames \\[1\\] after the header are not referenced"),
        (msgpack.ExtType(2, b""), [], "ext type 2 is not part of the protocol"),
    ],
)
def test_bad_array_references_are_protocol_errors(value, extra, match):
    header = msgpack.packb({"v": 1, "k": "result", "job": 1, "value": value})
    with pytest.raises(ProtocolError, match=match):
        decode_from_worker([header, *extra])


@pytest.mark.unit
def test_arrays_that_cannot_travel_fail_at_encoding_with_a_reason():
    with pytest.raises(TypeError, match="dtype object"):
        encode_job(1, "echo", np.array([object()]))
    with pytest.raises(TypeError, match="dtype <U"):
        encode_job(1, "echo", np.array(["text"]))
    with pytest.raises(ProtocolError, match="array in frame 1 of 4000 bytes is over the 1000-byte frame limit"):
        encode(Job(1, "echo", np.zeros(1000, np.float32)), limit=1000)


# ----------------------------------------------------------- through a worker


@pytest.mark.process
def test_arrays_round_trip_through_a_real_worker_bit_exactly(sup):
    cases = zip(DTYPES, SHAPES * 3, strict=False)
    payload = {f"{dtype}{shape}": _array(dtype, shape, seed=i) for i, (dtype, shape) in enumerate(cases)}
    payload["view"] = _array("<f8", (8, 8), seed=99)[1::2, ::-3]
    payload["big"] = _array("<f4", (1024, 1024), seed=7)  # 4 MiB: over ZeroMQ's copy threshold
    back = sup.submit("echo", payload, mode="diag").result(T)
    assert back.keys() == payload.keys()
    for key, arr in payload.items():
        assert _same(back[key], arr), key  # tobytes() is C order whatever the input's layout


@pytest.mark.process
def test_received_arrays_are_writable_and_own_nothing_shared_with_the_sender(sup):
    arr = np.arange(100_000, dtype=np.float64)
    back = sup.submit("echo", arr, mode="diag").result(T)
    back[0] = -1.0  # a view of the received frame, writable like any array
    assert arr[0] == 0.0


@pytest.mark.process
def test_a_torch_tensor_from_a_handler_arrives_as_an_array(supervisor_from, tmp_path):
    sup = supervisor_from(config_text({"t": "tests.helpers.loaders:tensors"}))
    got = sup.submit("make", {"n": 5}, mode="t").result(T)
    assert got["float"].dtype == np.float32 and got["float"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert got["long_T"].shape == (3, 2) and got["long_T"].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert got["grad"].tolist() == [1.0, 1.0]
    with pytest.raises(JobFailed, match="torch.bfloat16 tensor cannot be sent as an array"):
        sup.submit("bfloat16", None, mode="t").result(T)


@pytest.mark.unit
def test_what_the_decoder_refuses_the_encoder_refuses_at_submit():
    """Otherwise a payload submit() accepted would be dropped by the worker."""
    with pytest.raises(TypeError, match="at most 1024 arrays"):
        encode_job(1, "echo", [np.zeros(1)] * 1025)
    assert len(encode_job(1, "echo", [np.zeros(1)] * 1024)) == 1025
    with pytest.raises(TypeError, match="33 dimensions"):
        encode_job(1, "echo", np.zeros((1,) * 33))


@pytest.mark.process
def test_small_arrays_arrive_aligned_for_code_that_needs_it(sup):
    """libzmq packs small messages at any offset in a shared buffer; an
    array over it must still be aligned (numba, SIMD and C code assume so)."""
    payload = [np.arange(n, dtype=dt) for n in (1, 3, 7, 100) for dt in ("<f8", "<i4", "<c16", "<u2")]
    back = sup.submit("echo", payload, mode="diag").result(T)
    assert all(a.flags.aligned and np.array_equal(a, b) for a, b in zip(back, payload, strict=True))
