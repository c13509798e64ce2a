"""The msgpack codec is strict; the writer never blocks and survives Redis going away."""

import time

import msgpack
import numpy as np
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from onlinespec import keys
from onlinespec.codec import CodecError, decode, encode
from onlinespec.drafters.hf import HFDrafter
from onlinespec.engine import EngineConfig, SpeculativeEngine
from onlinespec.redis_server import EmbeddedRedis, _free_port, connect
from onlinespec.sampling import SamplingParams
from onlinespec.stream import FeedbackWriter
from workers.trigger import Trigger


@pytest.fixture(scope="module")
def record(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "c", version=2),
                               config=EngineConfig(k=3, feedback_topk=8, target_id="t"))
    return engine.generate([3, 4, 5], SamplingParams(max_new_tokens=20, temperature=1.0, seed=1, ignore_eos=True)).record


def test_round_trip_is_exact(record):
    again = decode(encode(record))
    for name in ("tokens", "topk_ids", "topk_logprobs", "drafted", "accepted", "block_index", "draft_tokens"):
        a, b = getattr(record, name), getattr(again, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (again.request_id, again.drafter_version, again.prompt_len) == (record.request_id, 2, 3)


def _mutate(record, **changes):
    body = msgpack.unpackb(encode(record), raw=False)
    for k, v in changes.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    return msgpack.packb(body, use_bin_type=True)


def test_malformed_payloads_are_refused_with_a_reason(record):
    lp = record.topk_logprobs.copy()
    lp[0, 0] = np.nan
    nan_body = msgpack.unpackb(encode(record), raw=False)
    nan_body["topk_logprobs"]["data"] = lp.astype("<f2").tobytes()
    cases = {
        "not msgpack": b"\xc1garbage",
        "not a map": msgpack.packb([1, 2]),
        "schema": _mutate(record, schema=99),
        "must be int": _mutate(record, prompt_len="3"),
        "bytes": _mutate(record, tokens={"shape": [5], "data": b"\x00" * 7}),
        "shape": _mutate(record, topk_ids={"shape": [1, 2, 3], "data": b""}),
        "finite": msgpack.packb(nan_body, use_bin_type=True),
        "missing": _mutate(record, accepted=None),
    }
    for reason, payload in cases.items():
        with pytest.raises(CodecError) as info:
            decode(payload)
        assert str(info.value), reason


def test_writer_drops_and_counts_while_redis_is_down_then_recovers(record):
    server = EmbeddedRedis(port=_free_port())  # not started yet: Redis is down
    client = connect(server.url, socket_connect_timeout=0.2, socket_timeout=0.5)
    writer = FeedbackWriter(client, "t", batch=4, flush_seconds=0.01)
    try:
        t0 = time.perf_counter()
        for _ in range(10):
            assert writer.submit(record)
        assert time.perf_counter() - t0 < 0.05  # submit never waits for Redis
        deadline = time.time() + 10
        while writer.stats.dropped_unreachable < 10 and time.time() < deadline:
            time.sleep(0.05)
        assert writer.stats.dropped_unreachable == 10 and writer.stats.written == 0
        server.start()  # Redis comes (back) up on the same port
        deadline = time.time() + 15
        while writer.stats.written == 0 and time.time() < deadline:
            writer.submit(record)
            time.sleep(0.2)
        assert writer.stats.written > 0
        assert client.xlen(keys.feedback_stream("t")) == writer.stats.written
    finally:
        writer.close()
        server.stop()


def test_writer_thread_survives_any_failed_write_and_unencodable_records(record, redis_client):
    """A connection torn down mid-reply surfaces from redis-py as ValueError ("I/O operation on
    closed file"), and a record can fail to encode: neither may end the writer's thread, or all
    later feedback would be dropped in silence."""
    import dataclasses

    stream = keys.feedback_stream("t-survive")
    redis_client.delete(stream)
    writer = FeedbackWriter(redis_client, "t-survive", batch=1, flush_seconds=0.01)
    real_pipeline = redis_client.pipeline
    failures = [ValueError("I/O operation on closed file."), RuntimeError("anything else")]

    def failing_pipeline(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real_pipeline(*args, **kwargs)

    redis_client.pipeline = failing_pipeline
    try:
        broken = dataclasses.replace(record, tokens=None)  # encode() cannot serialise it
        for r in (record, record, broken, record):
            assert writer.submit(r)
        deadline = time.time() + 10
        while writer.stats.written + writer.stats.dropped < 4 and time.time() < deadline:
            time.sleep(0.05)
        assert writer._thread.is_alive()
        assert writer.stats.dropped_unreachable == 2 and writer.stats.dropped_unencodable == 1
        assert writer.stats.written == 1 and redis_client.xlen(stream) == 1
        assert decode(redis_client.xrange(stream)[0][1][b"r"]).request_id == record.request_id
    finally:
        del redis_client.pipeline
        writer.close()
        redis_client.delete(stream)


def test_writer_queue_full_drops_instead_of_blocking(record, redis_client):
    writer = FeedbackWriter(redis_client, "t", queue_size=2, flush_seconds=5.0, batch=1000)
    writer._stop.set()  # the thread exits at once: nothing drains the queue
    writer._thread.join(2)
    results = [writer.submit(record) for _ in range(5)]
    assert results == [True, True, False, False, False] and writer.stats.dropped_full == 3


def test_trigger_keeps_one_job_in_flight_per_drafter(record, redis_client):
    queue = Queue(keys.UPDATE_QUEUE, connection=redis_client, serializer=JSONSerializer)
    redis_client.sadd(keys.drafters_set("t"), "d")
    for _ in range(3):
        redis_client.xadd(keys.feedback_stream("t"), {"r": encode(record)})
    trigger = Trigger(redis_client, queue, "t", min_records=2, period=3600)
    assert trigger.check() == ["d"]
    assert trigger.check() == []  # the first job is still in flight
    assert len(queue) == 1
    job = queue.jobs[0]
    assert job.func_name == "workers.jobs.update_drafter" and tuple(job.args) == ("t", "d")
    assert job.retries_left == 3 and job.timeout == 600
    redis_client.delete(keys.inflight_key("d"))  # what the job does when it completes
    assert trigger.check() == ["d"]
    redis_client.set(keys.paused_key("d"), "1")
    redis_client.delete(keys.inflight_key("d"))
    assert trigger.check() == []  # paused drafters get no jobs
