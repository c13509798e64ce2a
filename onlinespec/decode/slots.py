"""KV memory for many requests at once: one forward for a ragged batch of rows.

A :class:`SlotCache` keeps keys and values as ``[rows, kv_heads, capacity, head_dim]`` per
layer (rows grow by doubling up to ``slots`` as requests join, the capacity by doubling up to
``max_len`` plus one forward's padding; both are freed when the last row leaves), keeps each
row's own committed length, and :func:`forward_rows` feeds every active row its own number of
new tokens (a plain token, the last settled token plus ``k`` drafts, or nothing) in one
forward of transformers' own model, each row at its own positions:

- ``input_ids [B, T]``, rows padded to the longest;
- ``position_ids [B, T]``: ``length[b] + t``, so RoPE sees each row's true positions;
- a 4D mask ``[B, 1, T, L]`` over the first ``L = max(length + T)`` keys: query ``t`` of row
  ``b`` sees keys ``j <= length[b] + t``. Padding queries act as continuing tokens past the
  row's end (a fully masked query would put NaNs into the keys and values);
- new keys and values are written at each row's own positions; only ``length[b] += n[b]``
  commits them, so rejecting drafts (:meth:`SlotCache.rewind`) moves no data;
- logits are computed only at the fed positions (not the padding) where the model's head is a
  plain projection of the last hidden state (:data:`PLAIN_HEAD`);
- for those models, rows fed different numbers of tokens are **packed**: the decoder runs over
  the ``N = sum(n[b])`` fed tokens as one sequence ``[1, N]`` (every projection, MLP and norm
  costs ``N`` rows, not ``B x T``), and only attention unpacks them into ``[B, T]`` to read each
  row's own keys (:func:`rows_attention`, registered with transformers' attention interface
  as :data:`ROWS_ATTENTION` for the forward's duration). A batch whose rows draft different
  lengths (suffix copies end early, a muted drafter's rows copy only) paid for the longest on
  every row: at 16 users of SmolLM2, 28% of the verified positions were padding.

Active rows stay contiguous (a join takes row ``B``; a leave moves the last row into the hole),
so the attention reads views of the buffers, not gathers. What transformers does with a 4D mask
and a custom cache is pinned by ``tests/test_slots.py``, which compares every row with a
single-sequence forward of the same model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from onlinespec.decode.lm import CACHE_KWARG

__all__ = ["SlotCache", "forward_rows", "leave_row", "PLAIN_HEAD", "ROWS_ATTENTION", "rows_attention"]

ROWS_ATTENTION = "onlinespec_rows"

# Model types whose causal-LM logits are ``lm_head(last_hidden_state)`` and nothing more (no
# soft-capping, no logit scale): for them only the fed positions go through the head.
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "onlinespec-cut"})


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
        self.keys = torch.zeros(o.rows, heads, o.capacity, k_dim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(o.rows, heads, o.capacity, v_dim, dtype=value_states.dtype,
                                  device=value_states.device)
        self.is_initialized = True

    def grow(self, rows: int, capacity: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(rows, old.shape[1], capacity, old.shape[3])
            new[: old.shape[0], :, : old.shape[2]] = old
            setattr(self, name, new)

    def free(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [B, H, T, D] for the active rows, written at positions [B, T]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        kv_len = o.kv_len
        if o.packed is not None:  # [1, H, N, D]: token i goes to row rows[i], position positions[i]
            rows, positions = o.packed
            b = o.active
            self.keys[rows, :, positions] = key_states[0].transpose(0, 1)
            self.values[rows, :, positions] = value_states[0].transpose(0, 1)
            return self.keys[:b, :, :kv_len], self.values[:b, :, :kv_len]
        b = key_states.shape[0]
        where = o.write_positions  # [B, T]
        self.keys[:b].scatter_(2, where[:, None, :, None].expand_as(key_states), key_states)
        self.values[:b].scatter_(2, where[:, None, :, None].expand_as(value_states), value_states)
        return self.keys[:b, :, :kv_len], self.values[:b, :, :kv_len]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return int(self.owner.lengths[: self.owner.active].max()) if self.owner.active else 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """Keys and values of up to ``slots`` requests, each up to ``max_len`` tokens (plus room for
    one forward's padding). Rows ``0 .. active-1`` are in use."""

    def __init__(self, num_layers: int, slots: int, max_len: int, capacity: int = 256):
        assert slots >= 1 and max_len >= 2, "need at least one slot and room for two tokens"
        self.slots, self.max_len = slots, max_len
        self.initial_capacity = max(2, min(capacity, max_len))
        self.capacity = self.initial_capacity  # positions allocated per row (grows)
        self.rows = 1  # rows allocated (grows as requests join)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # committed tokens per row
        self.active = 0
        self.kv_len = 0  # keys the current forward attends over
        self.write_positions = torch.zeros(0, 0, dtype=torch.long)
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None  # a packed forward's (rows, positions)
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model, slots: int, max_len: int, capacity: int = 256) -> SlotCache:
        return cls(model.config.num_hidden_layers, slots, max_len, capacity)

    @staticmethod
    def position_bytes(model) -> int:
        """Bytes of keys and values one position takes in every layer of ``model``."""
        c = model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 2 * c.num_hidden_layers * heads * head_dim * torch.finfo(model.dtype).bits // 8

    @property
    def nbytes(self) -> int:
        """Memory the keys and values take now."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    @torch.inference_mode()  # its tensors may be inference tensors: so are their updates
    def ensure(self, positions: int) -> None:
        """Room for ``positions`` per row (doubling: a long request reallocates a few times)."""
        if positions <= self.capacity:
            return
        self._grow(self.rows, max(positions, min(2 * self.capacity, self.max_len + 64)))

    def _grow(self, rows: int, capacity: int) -> None:
        for layer in self.layers:
            if layer.is_initialized:
                layer.grow(rows, capacity)
        self.rows, self.capacity = rows, capacity

    @torch.inference_mode()  # its tensors may be inference tensors: so are their updates
    def join(self) -> int:
        """A free row for a new request (its length 0); raises when every slot is taken."""
        if self.active >= self.slots:
            raise RuntimeError(f"all {self.slots} slots are in use")
        row = self.active
        if row >= self.rows:
            self._grow(min(self.slots, 2 * self.rows), self.capacity)
        self.lengths[row] = 0
        self.active += 1
        return row

    @torch.inference_mode()  # its tensors may be inference tensors: so are their updates
    def load(self, row: int, source: Cache, length: int, source_row: int = 0) -> None:
        """Copy the first ``length`` positions of ``source_row`` of another cache (a staged
        prefill: a single-sequence cache, or another slot cache) into ``row``, whose length
        becomes ``length``."""
        assert 0 <= row < self.active, f"row {row} is not active"
        if length == 0:  # nothing to copy (the source may hold no tensors yet)
            self.ensure(1)
            self.lengths[row] = 0
            return
        self.fill(row, [layer.keys[source_row, :, :length] for layer in source.layers],
                  [layer.values[source_row, :, :length] for layer in source.layers])

    @torch.inference_mode()  # its tensors may be inference tensors: so are their updates
    def fill(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write one layer's keys and values ``[kv_heads, n, head_dim]`` per layer at positions
        ``0 .. n - 1`` of ``row`` (another cache's row: :meth:`load`; a prefix read before:
        :mod:`onlinespec.decode.prefix`), whose length becomes ``n``."""
        assert 0 <= row < self.active, f"row {row} is not active"
        assert len(keys) == len(values) == len(self.layers), "one tensor per layer"
        n = keys[0].shape[1]
        self.ensure(n + 1)
        for layer, k, v in zip(self.layers, keys, values):
            if not layer.is_initialized:
                layer.lazy_initialization(k[None], v[None])
            layer.keys[row, :, :n] = k
            layer.values[row, :, :n] = v
        self.lengths[row] = n

    def read(self, row: int, start: int, stop: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of ``row``'s keys and values at positions ``start .. stop - 1``, per layer."""
        assert 0 <= start <= stop <= int(self.lengths[row]), f"positions {start}..{stop} of row {row}"
        return ([layer.keys[row, :, start:stop].clone() for layer in self.layers],
                [layer.values[row, :, start:stop].clone() for layer in self.layers])

    @torch.inference_mode()  # its tensors may be inference tensors: so are their updates
    def leave(self, row: int) -> int | None:
        """Free ``row``; the last active row moves into it. Returns the row that moved (now at
        ``row``), or None when ``row`` was the last."""
        assert 0 <= row < self.active, f"row {row} is not active"
        last = self.active - 1
        self.active -= 1
        if self.active == 0:  # idle: give the memory back
            for layer in self.layers:
                layer.free()
            self.rows, self.capacity = 1, self.initial_capacity
        if row == last:
            return None
        n = int(self.lengths[last])
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys[row, :, :n] = layer.keys[last, :, :n]
                layer.values[row, :, :n] = layer.values[last, :, :n]
        self.lengths[row] = n
        return last

    @torch.inference_mode()  # its tensors may be inference tensors: so are their updates
    def rewind(self, row: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``row`` (rejected drafts are forgotten, not moved)."""
        assert 0 <= length <= int(self.lengths[row]), f"cannot rewind row {row} to {length}"
        self.lengths[row] = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()


def rows_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor, rows_layout: tuple[torch.Tensor, torch.Tensor] | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of a packed forward: ``query [1, H, N, D]`` holds the fed tokens of every row one
    after another; ``key``/``value`` ``[B, H_kv, L, D]`` are the rows' caches and
    ``attention_mask [B, 1, T, L]`` their masks. ``rows_layout``: ``unpack [B * T]`` (the packed
    token each row position reads; padding repeats a row's last token) and ``pack [N]`` (where
    each packed token sits in ``B x T``). Padding queries are computed (attention is a small
    share of a step) and dropped. Returns ``[1, N, H, D]`` as transformers' attention functions do."""
    unpack, pack = rows_layout
    b, t = attention_mask.shape[0], attention_mask.shape[2]
    q = query[0][:, unpack].unflatten(1, (b, t)).transpose(0, 1)  # [B, H, T, D]
    out, _ = sdpa_attention_forward(module, q, key, value, attention_mask, **kwargs)  # [B, T, H, D]
    return out.reshape(b * t, *out.shape[2:])[pack].unsqueeze(0), None


AttentionInterface.register(ROWS_ATTENTION, rows_attention)


@contextmanager
def _attention(model, implementation: str):
    """``model`` attends with ``implementation`` inside the block (its config is what its
    attention modules read at each forward)."""
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = old


def _packed_layout(starts: list[int], lens: list[int], t: int, device) -> dict:
    """Where the ``N`` fed tokens of a packed forward go: each token's row and position, and the
    two index maps of :func:`rows_attention`."""
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    rows = [b for b, n in enumerate(lens) for _ in range(n)]
    positions = [s + i for s, n in zip(starts, lens) for i in range(n)]
    unpack = [offsets[b] + min(i, n - 1) if n else 0 for b, n in enumerate(lens) for i in range(t)]
    pack = [b * t + i for b, n in enumerate(lens) for i in range(n)]

    def tensor(x):
        return torch.tensor(x, dtype=torch.long, device=device)
    return {"rows": tensor(rows), "positions": tensor(positions), "unpack": tensor(unpack), "pack": tensor(pack),
            "offsets": offsets}


def leave_row(cache: SlotCache, owners: list, owner) -> None:
    """Free ``owner``'s row of ``cache``, keeping ``owners`` (one per active row, in row order)
    in step with the row that moves into the hole."""
    row = owners.index(owner)
    cache.leave(row)
    last = owners.pop()
    if row < len(owners):
        owners[row] = last


@torch.inference_mode()
def forward_rows(model, cache: SlotCache, rows: list[list[int]], hidden: bool = False, logits: bool = True,
                 features: list[torch.Tensor] | None = None, last: bool = False):
    """Feed ``rows[b]`` (possibly nothing) to active row ``b``, every row in one forward.
    Returns each row's logits ``[len(rows[b]), V]`` (and with ``hidden``, the last hidden states
    at the same positions); the tokens are committed to the cache. ``logits=False``: only the
    keys and values are wanted (reading a prompt, encoding text), the head is not run; returns
    None, or with ``hidden`` the hidden states alone.
    ``features[b]`` (``[len(rows[b]), H]``): the target's feature paired with each token, for a
    :class:`~onlinespec.drafters.feature.FeatureDrafter` (its hidden states out are its own
    output features). ``last``: logits (and hidden states) at each row's last fed position only
    (``[1, V]``, ``[0, V]`` for a row fed nothing): a drafter drafts from its last position, and a
    row catching up on accepted tokens would otherwise run the head at each of them."""
    b = len(rows)
    assert b == cache.active, "one row of tokens per active row, in row order"
    lens = [len(r) for r in rows]
    kept = [min(n, 1) for n in lens] if last else lens  # positions whose logits are returned, the last ones
    t = max(1, max(lens))
    starts = cache.lengths[:b].tolist()
    need = max(starts) + t
    assert need <= cache.max_len + t, f"a row would pass max_len={cache.max_len}"
    cache.ensure(need)
    cache.kv_len = need
    device = model.device
    # pad each row with its last token (0 for a row fed nothing: its one query writes no committed key)
    ids = torch.tensor([r + [r[-1] if r else 0] * (t - len(r)) for r in rows], device=device)
    positions = torch.tensor([[s + i for i in range(t)] for s in starts], device=device)  # [B, T]
    cache.write_positions = positions
    mask = torch.arange(need, device=device)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, L]
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=device).masked_fill(
            ~mask, torch.finfo(model.dtype).min)
    inputs = dict(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
    if features is not None:  # a feature drafter: its layer reads fc([embedding, feature]); head on its output
        width = model.config.hidden_size
        feats = torch.zeros(b, t, width, dtype=model.dtype, device=device)
        for i, f in enumerate(features):
            if len(f):
                feats[i, : len(f)] = f.to(device=device, dtype=model.dtype)
        inputs["inputs_embeds"] = model.fuse(inputs.pop("input_ids"), feats)
        states = model.get_decoder()(**inputs).last_hidden_state  # [B, T, H]
        cache.lengths[:b] += torch.tensor(lens)
        if not logits:
            return None
        h = [states[i, n - k:n] for i, (n, k) in enumerate(zip(lens, kept))]
        out_logits = list(model.lm_head(torch.cat(h)).split(kept))
        return (out_logits, h) if hidden else out_logits
    plain_head = getattr(model.config, "model_type", None) in PLAIN_HEAD
    if plain_head and len(set(lens)) > 1:  # ragged: only the fed tokens go through the decoder
        return _forward_packed(model, cache, rows, lens, kept, starts, t, mask, hidden, logits)
    if not logits and not (hidden and plain_head):
        full = model(**inputs, logits_to_keep=1, output_hidden_states=hidden)
        cache.lengths[:b] += torch.tensor(lens)
        return [full.hidden_states[-1][i, lens[i] - kept[i]: lens[i]] for i in range(b)] if hidden else None
    if plain_head:
        states = model.get_decoder()(**inputs).last_hidden_state  # [B, T, H]
        if all(k == t for k in kept):
            h = states.reshape(b * t, -1)
        else:  # the head only where it is wanted
            fed = torch.tensor([[n - k <= i < n for i in range(t)] for n, k in zip(lens, kept)], device=device)
            h = states[fed]  # [sum kept, H]
        out_hidden = list(h.split(kept))
        if not logits:  # reading a prompt: its keys and values (and features), no head
            cache.lengths[:b] += torch.tensor(lens)
            return out_hidden
        logits = model.lm_head(h)  # every PLAIN_HEAD type names its head so (a cut drafter's is no Linear)
        out_logits = list(logits.split(kept))
    else:
        full = model(**inputs, output_hidden_states=hidden)
        out_logits = [full.logits[i, lens[i] - kept[i]: lens[i]] for i in range(b)]
        out_hidden = [full.hidden_states[-1][i, lens[i] - kept[i]: lens[i]] for i in range(b)] if hidden else None
    cache.lengths[:b] += torch.tensor(lens)
    return (out_logits, out_hidden) if hidden else out_logits


def _forward_packed(model, cache: SlotCache, rows: list[list[int]], lens: list[int], kept: list[int],
                    starts: list[int], t: int, mask: torch.Tensor, hidden: bool, logits: bool):
    """:func:`forward_rows` for a :data:`PLAIN_HEAD` model whose rows are fed different numbers of
    tokens: the decoder runs over the fed tokens alone, packed into one sequence; the mask
    ``[B, 1, T, L]`` built for the padded rows is what attention reads after unpacking."""
    device = model.device
    layout = _packed_layout(starts, lens, t, device)
    ids = torch.tensor([[tok for r in rows for tok in r]], device=device)
    cache.packed = (layout["rows"], layout["positions"])
    try:
        with _attention(model, ROWS_ATTENTION):
            states = model.get_decoder()(
                input_ids=ids, position_ids=layout["positions"][None], attention_mask=mask,
                use_cache=True, rows_layout=(layout["unpack"], layout["pack"]),
                **{CACHE_KWARG: cache}).last_hidden_state[0]  # [N, H]
    finally:
        cache.packed = None
    cache.lengths[: len(rows)] += torch.tensor(lens)
    offsets = layout["offsets"]
    if any(k != n for k, n in zip(kept, lens)):  # the last position of each row only
        states = states[torch.tensor([offsets[i + 1] - k for i, k in enumerate(kept) if k], device=device)]
    out_hidden = list(states.split(kept))
    if not logits:
        return out_hidden if hidden else None
    out_logits = list(model.lm_head(states).split(kept))
    return (out_logits, out_hidden) if hidden else out_logits
