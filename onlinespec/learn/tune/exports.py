"""Exported feedback: the Redis stream to a file and back, and the file's records.

The file is a msgpack stream: a header map, then one record payload (the codec's bytes) per
entry. Nothing is unpickled; every payload is decoded by the strict codec, and bad ones are
skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from onlinespec.feedback import keys
from onlinespec.feedback.codec import CodecError, decode

__all__ = ["FORMAT", "export_stream", "import_stream", "read_file"]

FORMAT = "onlinespec-feedback"


def export_stream(redis, target: str, path: str | Path, count: int | None = None) -> int:
    n = 0
    with open(path, "wb") as f:
        f.write(msgpack.packb({"format": FORMAT, "version": 1, "target": target}))
        last = "-"
        while count is None or n < count:
            batch = redis.xrange(keys.feedback_stream(target), min=last, count=500)
            batch = [(i, fl) for i, fl in batch if last == "-" or i.decode() != last]
            if not batch:
                break
            for entry_id, fields in batch:
                if b"r" in fields and (count is None or n < count):
                    f.write(msgpack.packb(fields[b"r"], use_bin_type=True))
                    n += 1
            last = batch[-1][0].decode()
    return n


def _payloads(path: str | Path):
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_bin_len=64 << 20)
        header = next(unpacker, None)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not an exported feedback file")
        for item in unpacker:
            yield item


def import_stream(redis, target: str, path: str | Path) -> int:
    pipe, n = redis.pipeline(transaction=False), 0
    for payload in _payloads(path):
        if isinstance(payload, bytes):
            pipe.xadd(keys.feedback_stream(target), {"r": payload})
            n += 1
    pipe.execute()
    return n


def read_file(path: str | Path):
    """(records, skipped): decoded records in their logged order."""
    records, skipped = [], 0
    for payload in _payloads(path):
        try:
            records.append(decode(payload))
        except (CodecError, TypeError):
            skipped += 1
    return records, skipped
