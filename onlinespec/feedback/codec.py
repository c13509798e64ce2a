"""Feedback records on the wire: msgpack with numpy arrays as raw little-endian bytes.

Never pickle: records cross process and machine boundaries and are decoded from a shared store.
:func:`decode` is strict (types, lengths, dtypes, finite values) and raises :class:`CodecError`
with the reason, so a reader can put a bad entry aside instead of learning from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

from onlinespec.feedback.record import SCHEMA_VERSION, FeedbackRecord

__all__ = ["CodecError", "encode", "decode", "CapturedFeatures", "encode_features", "decode_features"]

# field -> (dtype, number of dimensions)
_ARRAYS = {
    "tokens": ("<i4", 1),
    "topk_ids": ("<i4", 2),
    "topk_logprobs": ("<f2", 2),
    "drafted": ("|b1", 1),
    "accepted": ("|b1", 1),
    "block_index": ("<i2", 1),
    "draft_tokens": ("<i4", 1),
}
_SCALARS = {
    "request_id": str,
    "target_id": str,
    "drafter_id": str,
    "drafter_version": int,
    "created": float,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "prompt_len": int,
}
MAX_TOKENS = 1 << 20  # a record longer than this is refused, not allocated


class CodecError(ValueError):
    """A payload that is not a valid feedback record; the message says why."""


def encode(record: FeedbackRecord) -> bytes:
    body = {"schema": record.schema, "tenant": record.tenant}
    if record.domain is not None:  # absent in records written before it existed
        body["domain"] = record.domain
    for name in _SCALARS:
        body[name] = getattr(record, name)
    for name, (dtype, _) in _ARRAYS.items():
        arr = np.ascontiguousarray(getattr(record, name), dtype=np.dtype(dtype))
        body[name] = {"shape": list(arr.shape), "data": arr.tobytes()}
    return msgpack.packb(body, use_bin_type=True)


@dataclass(frozen=True)
class CapturedFeatures:
    """The target's features (last hidden states) of one served request, from sequence position
    ``start``: row ``i`` is the feature after token ``start + i``. float16 ``[n, H]``."""

    start: int
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes)


def encode_features(features: CapturedFeatures) -> bytes:
    arr = np.ascontiguousarray(features.values, dtype=np.dtype("<f2"))
    return msgpack.packb({"start": int(features.start), "values": {"shape": list(arr.shape), "data": arr.tobytes()}},
                         use_bin_type=True)


def decode_features(payload: bytes, hidden: int | None = None) -> CapturedFeatures:
    """Strict, as :func:`decode`: a start, a float16 ``[n, H]`` array (``H == hidden`` when given),
    finite values; else :class:`CodecError`."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=256 << 20)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict) or not isinstance(body.get("start"), int) or body["start"] < 0:
        raise CodecError("captured features need a start >= 0")
    values = _array({"values": body.get("values")}, "values", ("<f2", 2))
    if hidden is not None and values.shape[1] != hidden:
        raise CodecError(f"captured features are {values.shape[1]} wide, the drafter reads {hidden}")
    if not np.isfinite(values).all():
        raise CodecError("captured features hold non-finite values")
    return CapturedFeatures(body["start"], values)


def _array(body: dict, name: str, spec: tuple[str, int] | None = None) -> np.ndarray:
    dtype, ndim = spec or _ARRAYS[name]
    item = body.get(name)
    if not isinstance(item, dict) or not isinstance(item.get("data"), bytes) or not isinstance(item.get("shape"), list):
        raise CodecError(f"field {name!r} must be an array {{shape, data}}")
    shape = item["shape"]
    if len(shape) != ndim or not all(isinstance(s, int) and 0 <= s <= MAX_TOKENS for s in shape):
        raise CodecError(f"field {name!r} has a bad shape {shape!r}")
    dt = np.dtype(dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(item["data"]) != expected:
        raise CodecError(f"field {name!r} holds {len(item['data'])} bytes, its shape needs {expected}")
    return np.frombuffer(item["data"], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))


def decode(payload: bytes) -> FeedbackRecord:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=64 << 20)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise CodecError("payload is not a map")
    if body.get("schema") != SCHEMA_VERSION:
        raise CodecError(f"schema {body.get('schema')!r} is not {SCHEMA_VERSION}")
    fields = {}
    for name, kind in _SCALARS.items():
        value = body.get(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CodecError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
        if kind is float and not np.isfinite(value):
            raise CodecError(f"field {name!r} is not finite")
        fields[name] = value
    tenant = body.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise CodecError("field 'tenant' must be a string or null")
    domain = body.get("domain")
    if domain is not None and not (isinstance(domain, str) and 0 < len(domain) <= 64):
        raise CodecError("field 'domain' must be a string of 1-64 characters or null")
    for name in _ARRAYS:
        fields[name] = _array(body, name)
    try:
        record = FeedbackRecord(**fields, tenant=tenant, domain=domain)
        record.validate()
    except (ValueError, TypeError) as exc:
        raise CodecError(str(exc)) from None
    return record
