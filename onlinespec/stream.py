"""Feedback records through Redis Streams: a non-blocking writer and a consumer-group reader.

Writer (serving side): :meth:`FeedbackWriter.submit` never waits for Redis. A background thread
batches records and pipelines ``XADD ... MAXLEN ~ N``. When Redis is unreachable the batch is
dropped and counted, and the thread reconnects with backoff by itself. No error ends the
thread: a record that cannot be encoded is dropped and counted, and any other failure of a
write (a connection torn down mid-reply surfaces from redis-py as ``ValueError``, not only as
``ConnectionError``) is handled like an unreachable Redis.

Reader (worker side): one consumer group per drafter. Entries are acknowledged only after the
version that learned from them is durably published; entries left pending by a dead consumer
are reclaimed with ``XAUTOCLAIM``; payloads that fail validation go to a dead-letter stream
with the reason and are acknowledged, so they are kept aside and never block the group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import redis

from onlinespec import keys
from onlinespec.codec import CodecError, decode, encode
from onlinespec.feedback import FeedbackRecord

__all__ = ["WriterStats", "FeedbackWriter", "Delivery", "FeedbackReader", "recent_records"]

log = logging.getLogger(__name__)


@dataclass
class WriterStats:
    submitted: int = 0
    written: int = 0
    dropped_full: int = 0  # the in-process queue was full (Redis too slow)
    dropped_unreachable: int = 0  # Redis could not be reached (or the write failed)
    dropped_unencodable: int = 0  # the record could not be encoded (a bug upstream: logged)
    reconnects: int = 0
    encode_seconds: float = 0.0

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_unreachable + self.dropped_unencodable


class FeedbackWriter:
    def __init__(
        self,
        redis_client: redis.Redis,
        target: str,
        maxlen: int = 100_000,
        batch: int = 64,
        flush_seconds: float = 0.05,
        queue_size: int = 10_000,
    ):
        self.redis = redis_client
        self.stream = keys.feedback_stream(target)
        self.maxlen, self.batch, self.flush_seconds = maxlen, batch, flush_seconds
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stats = WriterStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, record: FeedbackRecord) -> bool:
        """Queue a record for writing; False (and counted) if the queue is full. Never blocks."""
        self.stats.submitted += 1
        try:
            self.queue.put_nowait(record)
            return True
        except queue.Full:
            self.stats.dropped_full += 1
            return False

    def _take_batch(self) -> list[FeedbackRecord]:
        try:
            items = [self.queue.get(timeout=self.flush_seconds)]
        except queue.Empty:
            return []
        while len(items) < self.batch:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _run(self) -> None:
        backoff = 0.1
        while not (self._stop.is_set() and self.queue.empty()):
            items = self._take_batch()
            if not items:
                continue
            t0 = time.perf_counter()
            payloads = self._encode(items)
            self.stats.encode_seconds += time.perf_counter() - t0
            if not payloads:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for payload in payloads:
                    pipe.xadd(self.stream, {"r": payload}, maxlen=self.maxlen, approximate=True)
                pipe.execute()
                self.stats.written += len(payloads)
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any failed write
                self.stats.dropped_unreachable += len(payloads)
                self.stats.reconnects += 1
                log.warning("feedback writer: write failed (%s: %s); dropped %d records",
                            type(exc).__name__, exc, len(payloads))
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 5.0)
                try:
                    self.redis.connection_pool.disconnect()  # the next command reconnects
                except Exception:  # noqa: BLE001 - best effort
                    pass

    def _encode(self, items: list[FeedbackRecord]) -> list[bytes]:
        payloads = []
        for r in items:
            try:
                payloads.append(encode(r))
            except Exception:  # noqa: BLE001 - one bad record must not stop the others
                self.stats.dropped_unencodable += 1
                log.exception("feedback writer: could not encode record %s; dropped",
                              getattr(r, "request_id", "?"))
        return payloads

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far has been written or dropped."""
        deadline = time.time() + timeout
        while not self.queue.empty() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(self.flush_seconds * 2)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


@dataclass(frozen=True)
class Delivery:
    """Decoded records of one read, with the stream ids to acknowledge once learned."""

    records: list[FeedbackRecord]
    ids: list[bytes]  # every id delivered, good records first
    dead: int = 0  # entries moved to the dead-letter stream in this read
    last_id: bytes | None = None

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class FeedbackReader:
    redis: redis.Redis
    target: str
    drafter: str
    consumer: str
    min_idle_ms: int = 60_000  # pending this long with a consumer: it is presumed dead
    stats: dict = field(default_factory=lambda: {"read": 0, "dead": 0, "reclaimed": 0})

    def __post_init__(self):
        self.stream = keys.feedback_stream(self.target)
        self.dead_stream = keys.dead_letter_stream(self.target)
        self.group = keys.learner_group(self.drafter)
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def pending_new(self, limit: int = 10_000) -> int:
        """Entries not yet delivered to the group (up to ``limit``)."""
        info = next((g for g in self.redis.xinfo_groups(self.stream) if g["name"] in (self.group, self.group.encode())), None)
        last = info["last-delivered-id"] if info else b"0-0"
        last = last.decode() if isinstance(last, bytes) else last
        return len(self.redis.xrange(self.stream, min=f"({last}", count=limit))

    def _entries(self, count: int) -> list[tuple[bytes, dict]]:
        # 1. our own deliveries that were never acknowledged (a job that failed before publishing)
        mine = self.redis.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
        entries = list(mine[0][1]) if mine else []
        entries = [(i, f) for i, f in entries if f]  # trimmed entries come back with no fields
        # 2. entries stuck with a consumer that stopped answering
        if len(entries) < count:
            _, claimed, deleted = self._autoclaim(count - len(entries))
            if deleted:
                self.redis.xack(self.stream, self.group, *deleted)
            self.stats["reclaimed"] += len(claimed)
            entries += [(i, f) for i, f in claimed if f]
        # 3. new entries
        if len(entries) < count:
            new = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count - len(entries))
            entries += list(new[0][1]) if new else []
        return entries

    def _autoclaim(self, count: int):
        reply = self.redis.xautoclaim(self.stream, self.group, self.consumer, self.min_idle_ms, "0-0", count=count)
        if len(reply) == 3:
            return reply
        return reply[0], reply[1], []  # Redis 6.2 has no deleted-ids element

    def read(self, count: int) -> Delivery:
        records, good_ids, dead_ids, last = [], [], [], None
        for entry_id, fields in self._entries(count):
            last = entry_id
            payload = fields.get(b"r")
            try:
                records.append(_decode_entry(fields))
                good_ids.append(entry_id)
            except CodecError as exc:
                self.redis.xadd(
                    self.dead_stream,
                    {"id": entry_id, "reason": str(exc)[:500], "drafter": self.drafter, "payload": payload or b""},
                    maxlen=10_000, approximate=True,
                )
                dead_ids.append(entry_id)
        if dead_ids:
            self.redis.xack(self.stream, self.group, *dead_ids)  # kept aside, never retried
        self.stats["read"] += len(records)
        self.stats["dead"] += len(dead_ids)
        return Delivery(records, good_ids, len(dead_ids), last)

    def ack(self, ids: list[bytes]) -> int:
        return int(self.redis.xack(self.stream, self.group, *ids)) if ids else 0


def _decode_entry(fields: dict) -> FeedbackRecord:
    """The record in a stream entry's ``r`` field; :class:`CodecError` when it is missing or invalid."""
    payload = fields.get(b"r")
    if payload is None:
        raise CodecError("entry has no 'r' field")
    return decode(payload)


def recent_records(client, target: str, max_tokens: int, batch: int = 200) -> tuple[list[FeedbackRecord], int]:
    """The newest records of the target's feedback stream, oldest first, until their generated
    tokens reach ``max_tokens``; and how many entries failed validation (skipped: the workers
    keep them aside when they read them). Read-only: no group, nothing acknowledged."""
    stream = keys.feedback_stream(target)
    records: list[FeedbackRecord] = []
    bad = tokens = 0
    upper = "+"
    while tokens < max_tokens:
        entries = client.xrevrange(stream, max=upper, min="-", count=batch)
        if not entries:
            break
        for _, fields in entries:
            try:
                record = _decode_entry(fields)
            except CodecError:
                bad += 1
                continue
            records.append(record)
            tokens += len(record.tokens) - record.prompt_len
            if tokens >= max_tokens:
                break
        upper = "(" + entries[-1][0].decode()
        if len(entries) < batch:
            break
    return records[::-1], bad
