"""Predicted outputs (OpenAI's ``prediction``): text the client expects much of the answer to be.

A client that asks to rewrite a file, fix a paragraph or reformat a table knows most of the
answer before it is written: the text it had. It sends that text as the request's prediction,
and the engine drafts from it: where the answer so far is the prediction's beginning, the next
predicted token; elsewhere the token after the latest occurrence, at or past where the answer
last followed the prediction, of the longest n-gram the answer ends with (``min_n`` to
``max_n`` tokens), so the drafts pick the prediction up again after an edit. The drafts are
copies (deterministic, ``q`` one-hot): verification accepts what the target would write and
nothing else, so the text is the target's whatever the prediction says; a wrong prediction costs
speed only (the adaptive draft length stops drafting from a row whose copies fail).

The prediction's drafts count as copies in the request's statistics (``copied``), and on their
own as the response's ``usage.completion_tokens_details`` (``accepted_prediction_tokens``,
``rejected_prediction_tokens``: drafted from it and not accepted).
"""

from __future__ import annotations

__all__ = ["Prediction", "MAX_N", "MIN_N"]

MAX_N = 8  # longest n-gram of the answer looked up in the prediction
MIN_N = 2  # shortest


class Prediction:
    """One request's predicted output and where its answer follows it. Not thread-safe: the
    engine loop drives it."""

    def __init__(self, tokens: list[int] | tuple[int, ...], max_n: int = MAX_N, min_n: int = MIN_N):
        self.tokens = list(tokens)
        self.max_n, self.min_n = max_n, min_n
        # n-gram -> the positions of the token after each occurrence, in order
        self.after: dict[tuple[int, ...], list[int]] = {}
        for p in range(1, len(self.tokens)):
            for n in range(min_n, min(max_n, p) + 1):
                self.after.setdefault(tuple(self.tokens[p - n:p]), []).append(p)
        self.cursor = 0  # the position after the last predicted token drafted
        self.block: list[int] = []  # draft positions of the current block that came from the prediction

    def propose(self, text: list[int]) -> int | None:
        """The predicted token after ``text`` (the answer so far and the block's drafts before
        this position), or None where the prediction says nothing."""
        n_text = len(text)
        if n_text < len(self.tokens) and text == self.tokens[:n_text]:
            return self._take(n_text)
        for n in range(min(self.max_n, n_text), self.min_n - 1, -1):
            places = self.after.get(tuple(text[n_text - n:]))
            if places:
                ahead = next((p for p in places if p >= self.cursor), None)
                return self._take(ahead if ahead is not None else places[-1])
        return None

    def _take(self, position: int) -> int:
        self.cursor = position + 1
        return self.tokens[position]

    def settle(self, accepted: int) -> tuple[int, int]:
        """The block was verified: its first ``accepted`` drafts were accepted. Returns the
        block's (drafts from the prediction, of which accepted; the request's statistics count
        them) and starts the next block."""
        drafted, taken = len(self.block), sum(i < accepted for i in self.block)
        self.block = []
        return drafted, taken
