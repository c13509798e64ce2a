"""KV memory for many requests at once: one target forward for a ragged batch of rows.

The first step of batched serving (the engine loop still steps one request at a time): a
:class:`SlotCache` preallocates keys and values as ``[slots, kv_heads, max_len, head_dim]`` per
layer, keeps each row's own committed length, and :func:`forward_rows` feeds every active row
its own number of new tokens (a prefill chunk, a plain token, or the last settled token plus
``k`` drafts) in one forward of transformers' own model, each row at its own positions:

- ``input_ids [B, T]``, rows padded to the longest with their last token;
- ``position_ids [B, T]``: ``length[b] + t``, so RoPE sees each row's true positions;
- a 4D mask ``[B, 1, T, max_len]``: query ``t`` of row ``b`` sees keys ``j <= length[b] + t``.
  Padding queries act as continuing tokens past the row's end (a fully masked query would
  put NaNs into the keys and values), which is why ``max_len`` leaves room for ``T`` more;
- new keys and values are written at each row's own positions; only ``length[b] += n[b]``
  commits them, so rejecting drafts (:meth:`SlotCache.rewind`) moves no data.

Active rows stay contiguous (a join takes row ``B``; a leave moves the last row into the hole),
so the attention reads views of the buffers, not gathers. What transformers does with a 4D mask
and a custom cache is pinned by ``tests/test_slots.py``, which compares every row with a
single-sequence forward of the same model.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["SlotCache", "forward_rows"]


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot; writes go where :class:`SlotCache` says."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: SlotCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        heads, k_dim, v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = torch.zeros(o.slots, heads, o.max_len, k_dim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(o.slots, heads, o.max_len, v_dim, dtype=value_states.dtype,
                                  device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, H, T, D] for the active rows, written at positions [B, T]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b = key_states.shape[0]
        where = self.owner.write_positions  # [B, T]
        self.keys[:b].scatter_(2, where[:, None, :, None].expand_as(key_states), key_states)
        self.values[:b].scatter_(2, where[:, None, :, None].expand_as(value_states), value_states)
        return self.keys[:b], self.values[:b]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.owner.max_len, 0

    def get_seq_length(self) -> int:
        return int(self.owner.lengths[: self.owner.active].max()) if self.owner.active else 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """Keys and values of up to ``slots`` requests, each up to ``max_len`` tokens (plus room for
    one forward's padding). Rows ``0 .. active-1`` are in use."""

    def __init__(self, num_layers: int, slots: int, max_len: int):
        assert slots >= 1 and max_len >= 2, "need at least one slot and room for two tokens"
        self.slots, self.max_len = slots, max_len
        self.lengths = torch.zeros(slots, dtype=torch.long)  # committed tokens per row
        self.active = 0
        self.write_positions = torch.zeros(0, 0, dtype=torch.long)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> SlotCache:
        return cls(model.config.num_hidden_layers, slots, max_len)

    def join(self) -> int:
        """A free row for a new request (its length 0); raises when every slot is taken."""
        if self.active >= self.slots:
            raise RuntimeError(f"all {self.slots} slots are in use")
        row = self.active
        self.lengths[row] = 0
        self.active += 1
        return row

    def leave(self, row: int) -> int | None:
        """Free ``row``; the last active row moves into it. Returns the row that moved (now at
        ``row``), or None when ``row`` was the last."""
        assert 0 <= row < self.active, f"row {row} is not active"
        last = self.active - 1
        self.active -= 1
        if row == last:
            return None
        n = int(self.lengths[last])
        with torch.inference_mode():  # the buffers were made in inference mode: so are their updates
            for layer in self.layers:
                if layer.is_initialized:
                    layer.keys[row, :, :n] = layer.keys[last, :, :n]
                    layer.values[row, :, :n] = layer.values[last, :, :n]
        self.lengths[row] = n
        return last

    def rewind(self, row: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``row`` (rejected drafts are forgotten, not moved)."""
        assert 0 <= length <= int(self.lengths[row]), f"cannot rewind row {row} to {length}"
        self.lengths[row] = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()


_CACHE_KWARG = "cache" if "cache" in inspect.signature(
    __import__("transformers").LlamaForCausalLM.forward).parameters else "past_key_values"


@torch.inference_mode()
def forward_rows(model, cache: SlotCache, rows: list[list[int]]) -> list[torch.Tensor]:
    """Feed ``rows[b]`` (at least one token) to active row ``b``, every row in one forward.
    Returns each row's logits ``[len(rows[b]), V]``; the tokens are committed to the cache."""
    b = len(rows)
    assert b == cache.active and all(rows), "one non-empty row of tokens per active row, in row order"
    n = torch.tensor([len(r) for r in rows])
    t = int(n.max())
    start = cache.lengths[:b].clone()
    assert int((start + t).max()) <= cache.max_len, f"a row would pass max_len={cache.max_len}"
    ids = torch.tensor([r + [r[-1]] * (t - len(r)) for r in rows])  # pad with each row's last token
    positions = start[:, None] + torch.arange(t)[None, :]  # [B, T]
    cache.write_positions = positions
    keys = torch.arange(cache.max_len)
    mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, max_len]
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask
        mask = torch.zeros(mask.shape, dtype=model.dtype).masked_fill(~mask, torch.finfo(model.dtype).min)
    device = model.device
    out = model(input_ids=ids.to(device), position_ids=positions.to(device), attention_mask=mask.to(device),
                use_cache=True, **{_CACHE_KWARG: cache})
    cache.lengths[:b] = start + n
    return [out.logits[i, : int(n[i])] for i in range(b)]
