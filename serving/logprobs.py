"""Log-probabilities in the two OpenAI shapes, from the engine's :class:`TokenLogprob` records.

The values are the target's raw log-softmax at each generated position (what vLLM returns by
default): computed by the verification forward that produced the token, at no extra cost; an
echoed prompt's, by the forward that read the prompt.
Token strings are each id decoded alone (a byte-level piece of a multi-byte character decodes to
U+FFFD, as with other servers); ``bytes`` carry the same string in UTF-8.
"""

from __future__ import annotations

from functools import lru_cache

from onlinespec.decode.engine import TokenLogprob

__all__ = ["completion_logprobs", "chat_logprobs"]


@lru_cache(maxsize=1 << 18)
def _piece(tokenizer, token: int) -> str:
    """A token id decoded alone: once per tokenizer and id (a response with top log-probs names
    each of thousands of tokens, most of them many times)."""
    return tokenizer.decode([token])


def _text(tokenizer, token: int) -> str:
    return _piece(tokenizer, token) if tokenizer is not None else str(token)


def completion_logprobs(tokenizer, items: list[TokenLogprob], text_offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (the chosen token and the
    ``n`` most likely, as a map), text_offset (character offset of each token in the text)."""
    tokens, offsets, offset = [], [], text_offset
    for item in items:
        tokens.append(_text(tokenizer, item.token))
        offsets.append(offset)
        offset += len(tokens[-1])
    # an echoed prompt's first token has no log-prob and no alternatives (None, as OpenAI and vLLM give)
    top = [None if item.logprob is None
           else {_text(tokenizer, t): lp for t, lp in (*item.top, (item.token, item.logprob))} for item in items]
    return {"tokens": tokens, "token_logprobs": [i.logprob for i in items], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer, items: list[TokenLogprob]) -> dict:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    def entry(token: int, logprob: float) -> dict:
        text = _text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                        for i in items]}
