"""Suffix speculation: drafts copied from text the target has already written.

The nonparametric half of online learning. Two indexes map an n-gram to the token that
followed it:

- :class:`RequestIndex`: this request's prompt and settled output, most recent occurrence
  (prompt lookup);
- :class:`SuffixCache`: the outputs of finished requests, shared by every request of the engine,
  most frequent continuation. It learns from live traffic the moment a request finishes (no
  worker, no version), is bounded in tokens (oldest outputs leave first) and scoped per tenant
  by default, so one tenant's text is never proposed to another.

At each draft position the longer of the two matches proposes (the request's own on a tie);
with no match the drafter does (:meth:`onlinespec.decode.batch.Batch._propose`). Copied drafts are deterministic: their ``q`` is one-hot, so
sampling verification accepts them with probability ``p(token)`` and stays exact.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


__all__ = ["SuffixConfig", "SuffixCache", "RequestIndex", "Match", "best_match", "copyable_outputs"]


@dataclass(frozen=True)
class SuffixConfig:
    enabled: bool = True
    max_n: int = 6  # longest n-gram matched
    min_n: int = 2  # shortest match in the request's own text
    cache_min_n: int = 3  # shortest match in other requests' outputs (shorter ones mislead more)
    max_tokens: int = 100_000  # tokens of past outputs kept (about max_n - cache_min_n + 1 entries each)
    scope: str = "tenant"  # tenant: outputs are matched only within their tenant | shared

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n or not 1 <= self.cache_min_n <= self.max_n:
            raise ValueError(f"suffix: need 1 <= min_n, cache_min_n <= max_n, got {self.min_n}, "
                              f"{self.cache_min_n}, {self.max_n}")
        if self.max_tokens < 0:
            raise ValueError(f"suffix: max_tokens must be >= 0, got {self.max_tokens}")
        if self.scope not in ("tenant", "shared"):
            raise ValueError(f"suffix: scope must be 'tenant' or 'shared', got {self.scope!r}")

    def scope_of(self, tenant: object) -> object:
        """Whose past outputs a request of ``tenant`` copies from and adds to: its tenant's under
        ``scope: tenant``, everyone's (None) under ``shared``."""
        return tenant if self.scope == "tenant" else None

    def isolates(self, tenant: object) -> bool:
        """A request with no identity under ``scope: tenant`` copies only from its own text and
        leaves nothing behind (no tenant's past outputs are its to read)."""
        return tenant is None and self.scope == "tenant"

    @classmethod
    def from_dict(cls, d: dict | None) -> SuffixConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"suffix: unknown keys {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Match:
    token: int
    n: int  # length of the matched suffix
    source: str  # "request" | "cache"


def copyable_outputs(records, config: SuffixConfig):
    """(prompt, generated, scope) of logged feedback records whose outputs suffix speculation may
    copy from: each record's tenant is its scope under ``scope: tenant``; a record served to no
    identity there was isolated and stays so."""
    for r in records:
        if config.isolates(r.tenant):
            continue
        tokens = r.tokens.tolist()
        yield tokens[:r.prompt_len], tokens[r.prompt_len:], config.scope_of(r.tenant)


class SuffixCache:
    """n-gram -> next-token counts over finished outputs. One engine loop drives it (not thread-safe)."""

    def __init__(self, config: SuffixConfig = SuffixConfig()):
        self.config = config
        self._next: dict[tuple, dict[int, int]] = {}
        self._kept: deque[tuple[object, list[int], int]] = deque()  # (scope, prompt tail + output, start)
        self.tokens = 0  # tokens of output kept
        self.added = 0  # outputs learned from, evicted ones included

    def __len__(self) -> int:
        return len(self._next)

    def warm(self, records) -> int:
        """Learn logged feedback records' outputs, oldest first (a restarted server's start);
        each record's tenant is its scope under ``scope: tenant``. Returns the outputs learned."""
        before = self.added
        for prompt, generated, scope in copyable_outputs(records, self.config):
            self.add_output(prompt, generated, scope)
        return self.added - before

    def add_output(self, prompt: list[int], generated: list[int], scope: object = None) -> None:
        """Learn a finished request's output; the prompt's last tokens let its first tokens match."""
        if not generated or self.config.max_tokens == 0:
            return
        context = list(prompt[-(self.config.max_n):]) if prompt else []
        seq = context + list(generated)
        self._count(scope, seq, len(context), +1)
        self._kept.append((scope, seq, len(context)))
        self.tokens += len(generated)
        self.added += 1
        while self.tokens > self.config.max_tokens and self._kept:
            old_scope, old, start = self._kept.popleft()
            self._count(old_scope, old, start, -1)
            self.tokens -= len(old) - start

    def _count(self, scope, seq: list[int], start: int, delta: int) -> None:
        lo, hi = self.config.cache_min_n, self.config.max_n
        for p in range(max(start, 1), len(seq)):
            for n in range(lo, min(hi, p) + 1):
                key = (scope, *seq[p - n:p])
                nxt = self._next.get(key)
                if nxt is None:
                    if delta < 0:
                        continue
                    nxt = self._next[key] = {}
                c = nxt.get(seq[p], 0) + delta
                if c > 0:
                    nxt[seq[p]] = c
                else:
                    nxt.pop(seq[p], None)
                    if not nxt:
                        del self._next[key]

    def lookup(self, context: list[int], scope: object = None) -> Match | None:
        """The most frequent continuation of the longest suffix of ``context`` seen in past outputs."""
        for n in range(min(self.config.max_n, len(context)), self.config.cache_min_n - 1, -1):
            nxt = self._next.get((scope, *context[-n:]))
            if nxt:
                # ties go to the continuation seen first (dicts keep insertion order)
                return Match(max(nxt, key=nxt.__getitem__), n, "cache")
        return None


class RequestIndex:
    """n-gram -> the token after its most recent occurrence, over one request's settled tokens."""

    def __init__(self, config: SuffixConfig = SuffixConfig()):
        self.max_n, self.min_n = config.max_n, config.min_n
        self._last: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # continuations at positions < indexed are in _last

    def extend(self, settled: list[int]) -> None:
        """Index the continuations of settled tokens (never drafts: they may be rejected)."""
        for p in range(max(self.indexed, 1), len(settled)):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self._last[tuple(settled[p - n:p])] = settled[p]
        self.indexed = max(self.indexed, len(settled))

    def lookup(self, context: list[int]) -> Match | None:
        """Continuation of the longest suffix of ``context`` that occurred earlier in it.

        ``context`` is the indexed settled tokens plus any drafts after them; occurrences whose
        continuation is a draft are the most recent, so they are searched first, directly.
        """
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            suffix = context[end - n:]
            for p in range(end - 1, max(self.indexed, n) - 1, -1):
                if context[p - n:p] == suffix:
                    return Match(context[p], n, "request")
            token = self._last.get(tuple(suffix))
            if token is not None:
                return Match(token, n, "request")
        return None


def best_match(index: RequestIndex | None, cache: SuffixCache | None, context: list[int],
               scope: object = None) -> Match | None:
    """The longer of the request's and the cache's matches; the request's own text on a tie."""
    mine = index.lookup(context) if index is not None else None
    theirs = cache.lookup(context, scope) if cache is not None else None
    if mine is None:
        return theirs
    if theirs is None or mine.n >= theirs.n:
        return mine
    return theirs
