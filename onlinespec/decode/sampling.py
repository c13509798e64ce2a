"""Sampling settings and the one place that turns logits into the distribution we sample from.

Target (``p``) and drafter (``q``) distributions go through the same :func:`probs`, so
temperature, top-k and top-p are applied identically to both: rejection sampling is lossless
with respect to the *processed* target distribution, which is what the user asked to sample from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onlinespec.decode.grammar import Structure
from onlinespec.errors import InvalidRequestError

__all__ = ["SamplingParams", "penalize", "probs", "draw", "logprobs_raw", "GREEDY_BELOW", "PositionNoise",
           "noisy_argmax"]

# Temperatures below this are served greedily (vLLM's _SAMPLING_EPS): dividing logits by 1e-300
# overflows to inf and the softmax to NaN, while the distribution it approximates is the argmax.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    min_p: float = 0.0  # vLLM's: tokens less likely than min_p x the likeliest one are cut (0 = none)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Draft length: an int for a fixed k, or None to let the engine's adaptive controller choose.
    k: int | None = None
    # Log-probs to return per generated token: None for none; n >= 0 for the chosen token's and the
    # n most likely alternatives' (the target's raw log-softmax, as vLLM returns by default).
    logprobs: int | None = None
    # what the text so far does to the target's logits at each position (:func:`penalize`), as
    # OpenAI and vLLM define them: frequency and presence over the generated tokens, repetition
    # over prompt and generated tokens; ``logit_bias``: (token id, bias) pairs added everywhere
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's: the only tokens the text may hold (every other one's logit is -inf); () = any
    allowed_token_ids: tuple[int, ...] = ()
    # vLLM's: the prompt tokens' log-probs (each but the first, under the target's raw
    # log-softmax) and this many alternatives' per token, computed while the prompt is read
    prompt_logprobs: int | None = None
    # vLLM's: the first ``min_tokens`` generated tokens are never EOS or a stop token id (their
    # logits are held at -inf), and no stop string ends within them
    min_tokens: int = 0
    # structured output (OpenAI's response_format, vLLM's structured_outputs): what the text
    # follows (a JSON schema, a regular expression, a choice), every token within what it allows
    structure: Structure | None = None
    # OpenAI's predicted output: token ids the answer is expected to hold much of, drafted from
    # (onlinespec/decode/prediction.py); the text is the target's whatever they are
    prediction: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (0 <= self.temperature < float("inf")):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise InvalidRequestError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
            raise InvalidRequestError("allowed_token_ids must be non-negative integers")
        if any(not isinstance(t, int) or t < 0 for t in self.prediction):
            raise InvalidRequestError("prediction token ids must be non-negative integers")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise InvalidRequestError(f"k (draft length) must be an integer >= 1, got {self.k!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise InvalidRequestError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (isinstance(self.prompt_logprobs, int)
                                                     and 0 <= self.prompt_logprobs <= 20):
            raise InvalidRequestError(f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens={self.max_new_tokens}], "
                                      f"got {self.min_tokens!r}")
        if self.structure is not None and self.min_tokens:
            raise InvalidRequestError("min_tokens cannot be combined with structured output: the structure "
                                      "decides where the text ends")
        if self.structure is not None and self.allowed_token_ids:
            raise InvalidRequestError("allowed_token_ids cannot be combined with structured output: the "
                                      "structure decides which tokens may come")
        if len(self.logit_bias) > 300 or any(not -100.0 <= b <= 100.0 or t < 0 for t, b in self.logit_bias):
            raise InvalidRequestError("logit_bias maps up to 300 token ids to biases in [-100, 100]")

    @property
    def penalized(self) -> bool:
        """Whether the text so far changes the target's logits (:func:`penalize`)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids)

    def shapes(self, generated: int) -> bool:
        """Whether :func:`penalize` changes the target's logits after ``generated`` tokens: the
        request is penalized, or its stop tokens are still held back by ``min_tokens``."""
        return self.penalized or generated < self.min_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def as_record(self) -> dict:
        """The settings a feedback record keeps (everything that shaped ``p``)."""
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": int(self.top_k)}


def penalize(logits: torch.Tensor, params: SamplingParams, prompt: list[int], generated: list[int],
             drafts: list[int], stop_ids: frozenset[int] = frozenset()) -> torch.Tensor:
    """The target's logits ``[m+1, V]`` at a block's positions (after ``generated``, then after
    each of the ``m`` drafts) as the request's penalties and biases make them: at position ``i``
    the text so far is ``generated + drafts[:i]``. In vLLM's order: repetition (vLLM's and
    Hugging Face's), ``l / r`` where ``l > 0``, else ``l * r``, for every token of the prompt or
    the generated text; frequency and presence (OpenAI's), ``l - f * count - p * (count > 0)``
    over generated tokens; then the logit biases; then ``allowed_token_ids`` (every other token
    -inf); last, ``min_tokens``: at a position with fewer
    tokens before it, the ``stop_ids`` (EOS and stop token ids) get -inf. A copy: the raw logits
    stay what feedback records log."""
    out = logits.float().clone()
    rows, vocab = out.shape
    device = out.device
    counts = None
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
        base = torch.bincount(torch.tensor(generated, dtype=torch.long, device=device), minlength=vocab)[:vocab]
        counts = base.float().expand(rows, vocab).clone()
        if rows > 1:  # position i also counts drafts[:i]
            steps = torch.zeros(rows, vocab, device=device)
            steps[torch.arange(1, rows, device=device), torch.tensor(drafts[:rows - 1], dtype=torch.long,
                                                                     device=device)] = 1.0
            counts += steps.cumsum(0)
    if params.repetition_penalty != 1.0:  # first, as vLLM applies them
        seen = counts > 0
        if prompt:
            seen[:, torch.tensor(prompt, dtype=torch.long, device=device)] = True
        r = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
    if params.frequency_penalty or params.presence_penalty:
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=device)
        out[:, ids] += torch.tensor([b for _, b in params.logit_bias], device=device)
    if params.allowed_token_ids:
        allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
        allowed[torch.tensor(params.allowed_token_ids, dtype=torch.long, device=device)] = True
        out[:, ~allowed] = float("-inf")
    held = min(rows, params.min_tokens - len(generated))  # positions i with len(generated) + i < min_tokens
    if held > 0 and stop_ids:
        out[:held, torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)] = float("-inf")
    return out


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed distribution over the vocabulary. logits: [..., V] -> probabilities [..., V]:
    temperature, then the min-p, top-k and top-p cuts.

    Greedy settings give a one-hot distribution on the argmax, so the same rejection rule
    (accept with probability min(1, p/q)) reduces to "accept iff the draft is the argmax".
    """
    logits = logits.float()
    if params.greedy:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.min_p > 0.0:  # after the temperature, before top-k and top-p, as vLLM applies it
        p = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(p < params.min_p * p.max(-1, keepdim=True).values, float("-inf"))
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop[..., 0] = False  # rounding can make the first "mass before" exceed a tiny top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


class PositionNoise:
    """Gumbel noise fixed by a request's seed and a token's position in the sequence.

    A seeded request samples the token at position ``t`` as ``argmax(log p_t + g_t)`` (the
    Gumbel-max trick: an exact sample from ``p_t``, the noise ``g_t`` independent across
    positions). The draw depends on the seed, the position and ``p_t`` only, never on what was
    drafted, the draft length or the other requests in a batch, so a seed gives one text. The
    drafter draws with the same noise (``argmax(log q_t + g_t)``) so that it proposes what the
    target will draw whenever ``q`` is close to ``p``.
    """

    def __init__(self, seed: int, vocab_size: int):
        self.seed, self.vocab_size = seed % 2**63, vocab_size
        self._cache: dict[int, torch.Tensor] = {}

    def at(self, position: int) -> torch.Tensor:
        g = self._cache.get(position)
        if g is None:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + position * 7_919) % 2**63)
            u = torch.rand(self.vocab_size, generator=gen, dtype=torch.float64).clamp_(1e-300, 1.0)
            g = self._cache[position] = -torch.log(-torch.log(u)).float()
        return g

    def forget(self, before: int) -> None:
        """Positions before ``before`` are settled: their noise is not needed again."""
        for position in [p for p in self._cache if p < before]:
            del self._cache[position]


def noisy_argmax(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor) -> torch.Tensor:
    """``argmax(log probs(logits) + noise)`` along the last axis: the Gumbel-max sample."""
    return (probs(logits, params).log() + noise.to(logits.device)).argmax(-1)


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | PositionNoise | None,
         position: int | None = None) -> tuple[int, torch.Tensor | None]:
    """One token from logits [V]: (the argmax, None) for greedy settings, else (a sample from
    ``probs``, that distribution): what a drafter proposes and the ``q`` it proposed from.
    With a seeded request's :class:`PositionNoise` (and the token's ``position``), the Gumbel-max
    draw with that position's noise (and None: the target verifies it by equality)."""
    if params.greedy:
        return int(logits.argmax()), None
    if isinstance(generator, PositionNoise):
        return int(noisy_argmax(logits, params, generator.at(position))), None
    q = probs(logits, params)
    return int(torch.multinomial(q, 1, generator=generator)), q


def logprobs_raw(logits: torch.Tensor) -> torch.Tensor:
    """The target's own log-distribution (temperature 1, no cuts): what feedback records log."""
    return torch.log_softmax(logits.float(), dim=-1)
