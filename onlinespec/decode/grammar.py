"""Structured output: the text must follow a :class:`Structure` (a JSON schema, OpenAI's
``response_format``; a regular expression or a list of choices, vLLM's ``structured_outputs``),
token by token, as llguidance's matcher allows it.

Speculation stays lossless: at every position of a verified block the target's logits are held
at -inf outside the tokens the grammar allows after the text so far (the block's drafts before
that position included), so the verdict is the constrained target's, drafts or not. Drafter
models draft under the same mask; a draft the grammar refuses is rejected where it stands. The
text ends where the grammar ends (a complete JSON value, a choice), finish reason ``stop``.

JSON is written with ``", "`` and ``": "`` between items and keys and no other whitespace: a
model cannot pad forever with blanks the grammar would otherwise allow.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from onlinespec.errors import InvalidRequestError

__all__ = ["JSON_OBJECT", "Structure", "Structured", "GrammarState"]

JSON_OBJECT = '{"type": "object"}'  # response_format json_object: any JSON object
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json", "regex", "choice")


@dataclass(frozen=True)
class Structure:
    """What a request's text must follow: ``json``, a JSON schema (its text); ``regex``, a
    regular expression (Rust's syntax, as llguidance and vLLM read it) the whole text matches;
    ``choice``, a JSON list of the texts allowed (one of them, exactly)."""

    kind: str
    spec: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidRequestError(f"structured output is one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def choice(cls, texts: list[str]) -> Structure:
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise InvalidRequestError("choice is a list of non-empty strings")
        return cls("choice", json.dumps(texts))

    def texts(self) -> list[str]:
        """A ``choice``'s texts."""
        return json.loads(self.spec)

    def grammar(self) -> str:
        """llguidance's grammar; a structure it cannot follow is an :class:`InvalidRequestError`
        that says why."""
        import llguidance

        what = {"json": "a JSON schema", "regex": "a regular expression", "choice": "a list of choices"}[self.kind]
        try:
            if self.kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=_LAYOUT)
            elif self.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(self.spec)
            else:  # one alternative per text, each a Lark string literal (JSON's escapes)
                grammar = llguidance.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(t) for t in self.texts()))
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"structured output: not {what} this server can follow: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise InvalidRequestError(f"structured output: not {what} this server can follow: {error}")
        return grammar


class Structured:
    """llguidance's view of an engine's tokenizer (built once): a request's matcher from its
    schema. Compiled matchers are kept for the ``keep`` schemas used last; a request gets a copy
    (microseconds, where compiling a large schema takes hundreds of milliseconds: the server
    compiles in :meth:`prepare`, off the engine loop, before the request is queued)."""

    keep = 64

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        import llguidance.hf

        if tokenizer is None:
            raise InvalidRequestError("structured output needs the model's tokenizer; none is loaded")
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                          eos_token=sorted(eos_token_ids) or None)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"structured output is not available for this model's tokenizer: {exc}") from None
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def prepare(self, structure: Structure):
        """The compiled matcher of ``structure`` (compiled now unless kept)."""
        import llguidance

        with self._lock:
            matcher = self._compiled.get(structure)
            if matcher is not None:
                self._compiled.move_to_end(structure)
                return matcher
        matcher = llguidance.LLMatcher(self.tokenizer, structure.grammar())
        if matcher.is_error():
            raise InvalidRequestError(f"structured output: {matcher.get_error()}")
        with self._lock:
            self._compiled[structure] = matcher
            while len(self._compiled) > self.keep:
                self._compiled.popitem(last=False)
        return matcher

    def start(self, structure: Structure) -> GrammarState:
        return GrammarState(self.prepare(structure).deep_copy(), self.vocab_size)


class GrammarState:
    """One request's matcher: it has consumed the request's generated tokens, never a draft."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    @property
    def stopped(self) -> bool:
        """The text is complete: nothing may follow it."""
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor, drafts: list[int], before: list[int] = ()) -> torch.Tensor:
        """``logits`` ``[m+1, V]`` at a block's positions (after the text and ``before``, drafts
        already in the block; then after each of the ``m`` ``drafts``), -inf where the grammar
        forbids a token, in place. Past a draft the grammar refuses, the rows are its row's, or
        (refused within ``before``) left as they are: the block is rejected there."""
        entered = self._enter(before)
        if entered is None:
            return logits
        rows = logits.shape[0]
        bitmask = _bitmask(rows, self.vocab_size)
        valid = self.matcher.validate_tokens(drafts[:rows - 1]) if rows > 1 and not self.stopped else 0
        _fill(self.matcher, bitmask, 0)
        consumed = 0
        for j in range(valid):
            if self.stopped:  # complete: its row allows only EOS, and the text ends before that
                break
            self._consume([drafts[j]])
            consumed += 1
            _fill(self.matcher, bitmask, j + 1)
        if entered + consumed:
            self.matcher.rollback(entered + consumed)
        bitmask[consumed + 1:] = bitmask[consumed]
        return _apply(logits, bitmask)

    def _enter(self, tokens: list[int]) -> int | None:
        """Consume ``tokens`` up to where the text is complete (after that EOS is all a row
        allows); how many, or None (nothing consumed) where the grammar refuses one of them."""
        consumed = 0
        for token in tokens:
            if self.stopped:
                break
            if not self.matcher.validate_tokens([token]):
                if consumed:
                    self.matcher.rollback(consumed)
                return None
            self._consume([token])
            consumed += 1
        return consumed

    def advance(self, token: int) -> None:
        """A generated token (the grammar allowed it: it was drawn under the mask)."""
        self._consume([token])

    def _consume(self, tokens: list[int]) -> None:
        if tokens and not self.matcher.consume_tokens(tokens):
            raise RuntimeError(f"the grammar refused tokens it allowed: {self.matcher.get_error()}")


_BITS = torch.arange(32, dtype=torch.int32)


def _bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """llguidance's token bitmask: bit ``t % 32`` of word ``t // 32`` set where token ``t`` is allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def _fill(matcher, bitmask: torch.Tensor, row: int) -> None:
    """Row ``row`` of ``bitmask``: what ``matcher`` allows next (llguidance's own
    ``fill_next_token_bitmask``, without importing its ``torch.compile``d kernels)."""
    words = bitmask[row]
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())


def _apply(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf in ``logits`` ``[rows, V]`` wherever ``bitmask`` forbids (llguidance's own kernel is
    ``torch.compile``d, which a CPU server need not pay for)."""
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).bool().reshape(bitmask.shape[0], -1)[:, :logits.shape[-1]]
    return logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
