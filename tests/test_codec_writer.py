"""The msgpack codec is strict; the writer never blocks and survives Redis going away."""

import time

import msgpack
import numpy as np
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from onlinespec.feedback import keys
from onlinespec.feedback.codec import CodecError, decode, encode
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.redis_server import EmbeddedRedis, _free_port, connect
from onlinespec.decode.sampling import SamplingParams
from onlinespec.feedback.stream import FeedbackWriter
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


def _records(record, n, prefix="r"):
    import dataclasses

    return [dataclasses.replace(record, request_id=f"{prefix}{i}") for i in range(n)]


def _wait(condition, seconds=15.0):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_writer_keeps_records_while_redis_is_down_and_writes_them_when_it_returns(record):
    server = EmbeddedRedis(port=_free_port())  # not started yet: Redis is down
    client = connect(server.url, socket_connect_timeout=0.2, socket_timeout=0.5)
    writer = FeedbackWriter(client, "t", batch=4, flush_seconds=0.01, max_buffer=6)
    try:
        t0 = time.perf_counter()
        for r in _records(record, 10):
            assert writer.submit(r)
        assert time.perf_counter() - t0 < 0.05  # submit never waits for Redis
        assert _wait(lambda: writer.stats.failed_writes >= 2)
        # the buffer holds the newest 6; exactly the 4 pushed out are counted as lost
        assert writer.stats.written == 0 and writer.stats.dropped_unreachable == 4 and len(writer.buffer) == 6
        assert writer.redis.connection_pool is not client.connection_pool  # never the callers' connections
        server.start()  # Redis comes (back) up on the same port
        assert _wait(lambda: writer.stats.written == 6)
        stored = [decode(f[b"r"]).request_id for _, f in client.xrange(keys.feedback_stream("t"))]
        assert stored == [f"r{i}" for i in range(4, 10)]
        assert writer.stats.dropped == 4 and writer.stats.duplicates == 0
    finally:
        writer.close()
        server.stop()


def test_writer_retries_failed_writes_without_losing_or_duplicating(record, redis_client):
    """A write can fail before Redis ran it (connection refused, torn down: redis-py raises
    ValueError for the latter) or after (the reply was lost): the batch is retried, nothing is
    lost, nothing is added twice; and an unencodable record is dropped and counted alone."""
    import dataclasses

    stream = keys.feedback_stream("t-survive")
    redis_client.delete(stream)
    writer = FeedbackWriter(redis_client, "t-survive", batch=2, flush_seconds=0.01)
    real = writer._add_once
    plan = ["before", "after", "before"]  # failures, in order; then writes succeed

    def flaky(*args, **kwargs):
        step = plan.pop(0) if plan else None
        if step == "before":
            raise ValueError("I/O operation on closed file.")
        out = real(*args, **kwargs)
        if step == "after":
            raise ConnectionError("reply lost")
        return out

    writer._add_once = flaky
    try:
        good = _records(record, 5, "s")
        broken = dataclasses.replace(record, tokens=None)  # encode() cannot serialise it
        for r in (*good[:2], broken, *good[2:]):
            assert writer.submit(r)
        assert _wait(lambda: writer.stats.written >= 5 and not writer.depth)
        assert writer._thread.is_alive() and writer.stats.failed_writes == 3
        assert writer.stats.dropped_unencodable == 1 and writer.stats.dropped_unreachable == 0
        ids = [decode(f[b"r"]).request_id for _, f in redis_client.xrange(stream)]
        assert sorted(ids) == sorted(r.request_id for r in good)  # each once, none lost
        assert writer.stats.written == 5 and writer.stats.duplicates == 2  # the batch whose reply was lost
    finally:
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
    assert job.timeout == 600 and redis_client.get(keys.inflight_key("d")).decode() == job.id
    redis_client.delete(keys.inflight_key("d"))  # what the job does when it completes
    assert trigger.check() == ["d"]
    redis_client.set(keys.paused_key("d"), "1")
    redis_client.delete(keys.inflight_key("d"))
    assert trigger.check() == []  # paused drafters get no jobs
