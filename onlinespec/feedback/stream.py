"""Feedback records through Redis Streams: a non-blocking writer and a consumer-group reader.

Writer (serving side): :meth:`FeedbackWriter.submit` never waits for Redis. A background thread
encodes records into a bounded buffer and writes batches with one script (``XADD ... MAXLEN ~
N``, each record at most once). When Redis is slow or away the buffer holds the records and the
write is retried with backoff; only records pushed out of a full buffer are lost, each counted.
No error ends the thread (a connection torn down mid-reply surfaces from redis-py as
``ValueError``, not only as ``ConnectionError``), and it never touches other threads' connections.

Reader (worker side): one consumer group per drafter. Entries are acknowledged only after the
version that learned from them is durably published; entries left pending by a dead consumer
are reclaimed with ``XAUTOCLAIM``; payloads that fail validation go to a dead-letter stream
with the reason and are acknowledged, so they are kept aside and never block the group. Full
validation (schema, lengths, ids inside the target's vocabulary, at least one generated
position) happens before learning; an entry that every round fails on is put aside after
``max_deliveries``. Each entry is put aside once, whichever group met it first.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import redis

from onlinespec.feedback import keys
from onlinespec.feedback.codec import CapturedFeatures, CodecError, decode, encode, encode_features
from onlinespec.feedback.record import FeedbackRecord

__all__ = ["WriterStats", "FeedbackWriter", "Delivery", "FeedbackReader", "recent_records"]

log = logging.getLogger(__name__)


@dataclass
class WriterStats:
    submitted: int = 0
    written: int = 0
    dropped_full: int = 0  # the in-process queue was full (the writer thread fell behind)
    dropped_unreachable: int = 0  # lost to Redis being away: the retry buffer overflowed, or at close
    dropped_unencodable: int = 0  # the record could not be encoded (a bug upstream: logged)
    duplicates: int = 0  # records of a retried batch that an attempt whose reply was lost had written
    failed_writes: int = 0  # write attempts that failed and were retried
    encode_seconds: float = 0.0
    features_written: int = 0  # captured requests whose target features were written beside their record
    features_bytes: int = 0  # their size (each kept ``features_ttl`` seconds)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_unreachable + self.dropped_unencodable


# One batch of records, each added only if its marker is new: a write whose reply was lost is
# retried without adding anything twice. KEYS[1] the stream, KEYS[2..] one marker per record;
# ARGV[1] MAXLEN, ARGV[2] marker expiry (s), ARGV[3..] the payloads in the order of the markers.
_ADD_ONCE = """
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'r', ARGV[i + 1])
    added = added + 1
  end
end
return added
"""


def _own_client(client: redis.Redis, socket_timeout: float) -> redis.Redis:
    """A client on its own connections to the same server: the writer's failures and timeouts
    never touch connections other threads use (the server's /ready, the swap watcher)."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": socket_timeout}
    kwargs.setdefault("socket_connect_timeout", min(socket_timeout, 2.0))
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


class FeedbackWriter:
    """Writes records to the feedback stream off the serving path.

    :meth:`submit` never waits. The thread encodes records into a bounded buffer (``max_buffer``
    records, ``max_buffer_bytes``) and writes them in batches; a failed write keeps the batch and
    retries with backoff (0.1 s doubling to 5 s), so a slow or restarting Redis costs nothing.
    Only when Redis stays away long enough for the buffer to fill are the oldest records dropped,
    each one counted. Every record is added at most once (a marker per request id, set in the
    same script as the XADD), so retrying a write whose reply was lost adds no duplicate.

    A record may come with the target's features of its request (:meth:`submit`'s ``features``:
    a captured share of requests, for feature drafters' learners): they go to a key of their own
    beside it, kept ``features_ttl`` seconds, so the stream stays as lean as without them and
    what they take in Redis is bounded by the capture rate times the expiry.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        target: str,
        maxlen: int = 100_000,
        batch: int = 64,
        flush_seconds: float = 0.05,
        queue_size: int = 10_000,
        max_buffer: int = 10_000,
        max_buffer_bytes: int = 256 << 20,
        socket_timeout: float = 10.0,
        features_ttl: int = 300,
    ):
        self.redis = _own_client(redis_client, socket_timeout)
        self.features_ttl = features_ttl
        self.target = target
        self.stream = keys.feedback_stream(target)
        self.maxlen, self.batch, self.flush_seconds = maxlen, batch, flush_seconds
        self.max_buffer, self.max_buffer_bytes = max_buffer, max_buffer_bytes
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.buffer: deque[tuple[str, bytes, bytes | None]] = deque()  # (request id, payload, features), oldest first
        self.buffer_bytes = 0
        self.stats = WriterStats()
        self._add_once = self.redis.register_script(_ADD_ONCE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feedback-writer", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Records not yet written: queued for encoding and buffered for writing."""
        return self.queue.qsize() + len(self.buffer)

    def submit(self, record: FeedbackRecord, features: CapturedFeatures | None = None) -> bool:
        """Queue a record (and its request's captured features) for writing; False (and counted)
        if the queue is full. Never blocks."""
        self.stats.submitted += 1
        try:
            self.queue.put_nowait((record, features))
            return True
        except queue.Full:
            self.stats.dropped_full += 1
            return False

    def _take(self, wait: float) -> None:
        """Move queued records into the buffer, encoded; drop the oldest beyond its bounds."""
        try:
            items = [self.queue.get(timeout=wait)] if wait > 0 else [self.queue.get_nowait()]
        except queue.Empty:
            return
        while len(items) < self.batch:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        t0 = time.perf_counter()
        for r, features in items:
            try:
                payload = encode(r)
                blob = encode_features(features) if features is not None else None
            except Exception:  # noqa: BLE001 - one bad record must not stop the others
                self.stats.dropped_unencodable += 1
                log.exception("feedback writer: could not encode record %s; dropped", getattr(r, "request_id", "?"))
                continue
            self.buffer.append((r.request_id, payload, blob))
            self.buffer_bytes += len(payload) + len(blob or b"")
        self.stats.encode_seconds += time.perf_counter() - t0
        while self.buffer and (len(self.buffer) > self.max_buffer or self.buffer_bytes > self.max_buffer_bytes):
            _, old, blob = self.buffer.popleft()
            self.buffer_bytes -= len(old) + len(blob or b"")
            self.stats.dropped_unreachable += 1

    def _write(self) -> None:
        chunk = list(itertools.islice(self.buffer, self.batch))
        captured = [(rid, blob) for rid, _, blob in chunk if blob is not None]
        if captured:  # before the records: a learner that reads a record finds its features
            pipe = self.redis.pipeline(transaction=False)
            for rid, blob in captured:
                pipe.set(keys.features_key(self.target, rid), blob, ex=self.features_ttl)
            pipe.execute()
        markers = [keys.written_key(self.target, rid) for rid, _, _ in chunk]
        added = int(self._add_once(keys=[self.stream, *markers],
                                   args=[self.maxlen, 3600, *(p for _, p, _ in chunk)]))
        for _ in chunk:
            _, payload, blob = self.buffer.popleft()
            self.buffer_bytes -= len(payload) + len(blob or b"")
        self.stats.features_written += len(captured)
        self.stats.features_bytes += sum(len(blob) for _, blob in captured)
        # a marker already set: an earlier attempt wrote the record and only its reply was lost
        self.stats.written += len(chunk)
        self.stats.duplicates += len(chunk) - added

    def _run(self) -> None:
        backoff, retry_at = 0.1, 0.0
        while not (self._stop.is_set() and self.queue.empty() and (not self.buffer or retry_at)):
            self._take(self.flush_seconds if not self.buffer else 0.0)
            if not self.buffer:
                continue
            if time.monotonic() < retry_at:
                self._stop.wait(min(self.flush_seconds, retry_at - time.monotonic()))
                continue
            try:
                self._write()
                backoff, retry_at = 0.1, 0.0
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any failed write
                self.stats.failed_writes += 1
                log.warning("feedback writer: write failed (%s: %s); %d records kept, retry in %.1fs",
                            type(exc).__name__, exc, len(self.buffer), backoff)
                retry_at = time.monotonic() + backoff
                backoff = min(backoff * 2, 5.0)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far has been written or dropped (or ``timeout``)."""
        deadline = time.time() + timeout
        while self.depth and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(self.flush_seconds * 2)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is left (for up to ``timeout``); what Redis cannot take by then is counted lost."""
        deadline = time.time() + timeout
        while self.depth and time.time() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(0.1, deadline - time.time()))
        lost = len(self.buffer) + self.queue.qsize()
        if lost:
            self.stats.dropped_unreachable += lost
            log.warning("feedback writer: %d records could not be written before shutdown", lost)
        self.redis.close()


@dataclass(frozen=True)
class Delivery:
    """Decoded records of one read, with the stream ids to acknowledge once learned."""

    records: list[FeedbackRecord]
    ids: list[bytes]  # every id delivered, good records first
    dead: int = 0  # entries moved to the dead-letter stream in this read
    last_id: bytes | None = None

    def __len__(self) -> int:
        return len(self.records)

    def without(self, ids: set[bytes]) -> Delivery:
        """The same delivery less the entries in ``ids`` (acknowledged elsewhere)."""
        kept = [(r, i) for r, i in zip(self.records, self.ids) if i not in ids]
        return Delivery([r for r, _ in kept], [i for _, i in kept], self.dead, self.last_id)


@dataclass
class FeedbackReader:
    redis: redis.Redis
    target: str
    drafter: str
    consumer: str
    min_idle_ms: int = 60_000  # pending this long with a consumer: it is presumed dead
    vocab_size: int | None = None  # records naming ids beyond it are put aside
    # An entry delivered this many times was never learned: every round that held it failed. It
    # is put aside (with the others of its batch, which stay readable in the dead-letter stream).
    max_deliveries: int = 5
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

    def _deliveries(self, ids: list[bytes]) -> dict[bytes, int]:
        """How many times each pending entry of the group was delivered."""
        if not ids:
            return {}
        wanted = set(ids)
        out = {}
        # every entry just read is pending with this consumer (read, re-read or claimed by it)
        for p in self.redis.xpending_range(self.stream, self.group, min="-", max="+", count=10_000,
                                           consumername=self.consumer):
            if p["message_id"] in wanted:
                out[p["message_id"]] = int(p["times_delivered"])
        return out

    def put_aside(self, entry_id: bytes, reason: str, payload: bytes | None) -> None:
        """Acknowledge an entry in this group and keep it in the dead-letter stream, once: the
        first group to put it aside writes it (id, reason, payload); the others only count it."""
        sid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if self.redis.set(keys.dead_letter_seen(self.target, sid), self.drafter, nx=True, ex=7 * 86_400):
            self.redis.xadd(self.dead_stream, {"id": sid, "reason": reason[:500], "drafter": self.drafter,
                                               "payload": payload or b""}, maxlen=10_000, approximate=True)
            self.redis.incr(keys.dead_letter_count(self.target))
        self.redis.xack(self.stream, self.group, entry_id)

    def read(self, count: int) -> Delivery:
        records, good_ids, dead_ids, last = [], [], [], None
        entries = self._entries(count)
        deliveries = self._deliveries([i for i, _ in entries])
        for entry_id, fields in entries:
            last = entry_id
            try:
                if deliveries.get(entry_id, 1) > self.max_deliveries:
                    raise CodecError(f"delivered {deliveries[entry_id]} times and never learned: "
                                     "every round that read it failed")
                record = _decode_entry(fields)
                if self.vocab_size is not None:
                    record.validate(self.vocab_size)
                records.append(record)
                good_ids.append(entry_id)
            except (CodecError, ValueError) as exc:
                self.put_aside(entry_id, str(exc), fields.get(b"r"))  # kept aside, never retried
                dead_ids.append(entry_id)
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
