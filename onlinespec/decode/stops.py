"""Stop conditions and incremental text, applied one token at a time.

A speculative step can emit several tokens at once; :meth:`StopState.push` is called for each
of them in order, and the first one that ends the generation wins: nothing after it is
returned, streamed, or logged as generated, even when it was inside an accepted block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from onlinespec.errors import InvalidRequestError
from onlinespec.decode.sampling import SamplingParams

__all__ = ["FinishReason", "StopState"]


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_new_tokens reached


@dataclass
class StopState:
    params: SamplingParams
    eos_token_ids: frozenset[int]
    tokenizer: object | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""  # the generated text so far, stop string excluded
    emitted: int = 0  # characters of ``text`` already handed out by ``take_text``
    finish_reason: FinishReason | None = None

    def __post_init__(self):
        if self.params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer to decode text; none is loaded")
        self._stop_ids = frozenset(self.params.stop_token_ids) | (
            frozenset() if self.params.ignore_eos else self.eos_token_ids
        )
        # what ``min_tokens`` holds back: EOS even under ignore_eos, as vLLM does
        self.held_ids = frozenset(self.params.stop_token_ids) | self.eos_token_ids
        self._longest_stop = max((len(s) for s in self.params.stop), default=0)
        self._floor = 0  # characters of ``text`` within the first ``min_tokens`` tokens: no stop string ends there

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> bool:
        """Add one generated token. Returns True when it ended the generation."""
        assert not self.finished, "push() after the generation finished"
        self.generated.append(token)
        if token in self._stop_ids:
            self.finish_reason = FinishReason.STOP
            return True
        if self.tokenizer is not None:
            self._update_text()
            if self.finished:
                return True
        if len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False

    def end(self) -> bool:
        """The text is complete (its grammar allows nothing more): finished, reason ``stop``."""
        if not self.finished:
            self.finish_reason = FinishReason.STOP
        return True

    def _update_text(self) -> None:
        full = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if len(self.generated) <= self.params.min_tokens:
            self.text = full
            self._floor = len(full)
            return
        if self.params.stop:
            start = max(0, len(self.text) - self._longest_stop)
            hits = [i for i in (full.find(s, max(start, self._floor - len(s) + 1)) for s in self.params.stop)
                    if i >= 0]
            if hits:
                self.text = full[: min(hits)]
                self.finish_reason = FinishReason.STOP
                return
        self.text = full

    def take_text(self) -> str:
        """Text not handed out yet that is safe to show: no half-decoded character, and (while
        running) nothing that could still turn out to be the start of a stop string."""
        safe = len(self.text)
        if not self.finished:
            while safe > self.emitted and self.text[safe - 1] == "\ufffd":
                safe -= 1  # an incomplete UTF-8 sequence: wait for its next bytes
            for s in self.params.stop:
                for n in range(min(len(s) - 1, safe - self.emitted), 0, -1):
                    if self.text[safe - n : safe] == s[:n]:
                        safe -= n
                        break
        delta = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta
