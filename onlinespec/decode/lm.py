"""A causal LM with a KV cache for one sequence: ``feed`` tokens, get logits, ``rewind``.

Both the target and the Hugging Face drafter are driven through :class:`CacheSession`, so the
cache bookkeeping (what is encoded, how to roll back a rejected draft) lives in one place.
The prefix is never re-encoded: every token is fed exactly once unless a rewind removed it.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel

__all__ = ["CacheSession", "CACHE_KWARG"]

# transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40).
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class CacheSession:
    """KV cache of one sequence on one model.

    ``length`` is the number of tokens whose keys and values are in the cache.
    """

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.length = 0

    @torch.inference_mode()
    def feed(self, ids: list[int] | torch.Tensor, last_only: bool = False, **inputs) -> torch.Tensor:
        """Encode ``ids`` after what is cached. Returns logits [len(ids), V] (or [1, V] if last_only).
        ``inputs``: more of the model's inputs (a feature drafter's ``features``)."""
        if not torch.is_tensor(ids):
            ids = torch.tensor(ids, dtype=torch.long)
        n = ids.numel()
        assert n > 0, "feed() needs at least one token"
        # input_ids: [1, n]; cache_position: [n]
        out = self.model(
            input_ids=ids.view(1, n).to(self.model.device),
            **{CACHE_KWARG: self.cache},
            use_cache=True,
            cache_position=torch.arange(self.length, self.length + n, device=self.model.device),
            logits_to_keep=1 if last_only else 0,
            **inputs,
        )
        self.length += n
        return out.logits[0]

    def rewind(self, keep: int) -> None:
        """Drop cached positions ``keep`` and after (a rejected draft's keys and values)."""
        assert 0 <= keep, f"rewind to a negative length {keep}"
        if keep >= self.length:
            return
        if keep == 0:
            self.reset()
            return
        # transformers 5: DynamicCache.crop refuses a positive length; a negative one removes tokens.
        self.cache.crop(-(self.length - keep))
        self.length = keep

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.length = 0
