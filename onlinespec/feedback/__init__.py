"""Feedback transport: the record one request leaves, its wire format and its Redis stream.

``record`` (the typed record and its validation), ``codec`` (msgpack with raw arrays, never
pickle), ``stream`` (a non-blocking writer and a consumer-group reader with a dead-letter stream),
``keys`` (every Redis key and stream name the processes share).

May import: only the shared top-level modules (``errors``, ``faults``); no other folder.
"""
