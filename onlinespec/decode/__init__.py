"""Decoding: the engine that proposes, verifies, accepts and rewinds, one request or a batch.

Owns the per-request generation (``engine``), continuous batching and its KV slots (``batch``,
``slots``, ``lm``), the prefix cache of text read before (``prefix``), the proposers behind one
seam (``proposers``: drafter models and suffix copies, ``suffix``), verification, sampling and
penalties (``verify``, ``sampling``, ``stops``), the draft-length controller (``adaptive``),
which drafter drafts for a request (``routing``) and chat rendering (``chat``). It builds the feedback record (``onlinespec.feedback.record``) but never sends it.

May import: ``onlinespec.feedback``, ``onlinespec.drafters`` and the shared top-level modules;
not ``learn``, ``ops``, ``serving`` or ``workers``.
"""
