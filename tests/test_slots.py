"""Ragged batched forwards through transformers' own Llama with a slot cache equal
single-sequence forwards, through joins, leaves and per-row rollbacks (this pins what
transformers does with a 4D mask and a custom cache: a change in its internals fails here)."""

import random

import pytest
import torch

from onlinespec.decode.slots import SlotCache, forward_rows
from tests.tiny import tiny_llama


def reference(model, tokens: list[int], n: int) -> torch.Tensor:
    """Logits at the last ``n`` positions of ``tokens`` from one forward without any cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -n:]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_ragged_forwards_equal_single_sequence_forwards(attention):
    model = tiny_llama(layers=2, hidden=64, heads=4, seed=3)
    model.set_attn_implementation(attention)  # eager adds the mask: it must get a float mask
    rng = random.Random(0)
    cache = SlotCache.for_model(model, slots=4, max_len=96)
    seqs: list[list[int]] = []  # committed tokens of each active row, in row order

    def step(feeds):
        outs = forward_rows(model, cache, feeds)
        for row, (feed, logits) in enumerate(zip(feeds, outs)):
            seqs[row] += feed
            ref = reference(model, seqs[row], len(feed))
            assert torch.allclose(logits, ref, atol=5e-5), (row, (logits - ref).abs().max())

    for length in (5, 9, 2):  # three requests join and prefill together, ragged
        cache.join()
        seqs.append([])
    step([[rng.randrange(1, 128) for _ in range(length)] for length in (5, 9, 2)])
    for i in range(12):
        feeds = [[rng.randrange(1, 128) for _ in range(rng.randint(1, 5))] for _ in seqs]  # k+1 per row
        step(feeds)
        for row in range(len(seqs)):  # each row rejects some of what it fed: a rewind, no data moves
            keep = len(seqs[row]) - rng.randint(0, len(feeds[row]) - 1)
            cache.rewind(row, keep)
            del seqs[row][keep:]
        if i == 4:  # the first request finishes: the last row moves into its place
            moved = cache.leave(0)
            assert moved == len(seqs) - 1
            seqs[0] = seqs.pop()
        if i == 6:  # a new request joins mid-batch with a long prompt
            cache.join()
            seqs.append([])
            step([[rng.randrange(1, 128)] for _ in seqs[:-1]] + [[rng.randrange(1, 128) for _ in range(11)]])
    assert cache.active == len(seqs) == 3
    assert [int(x) for x in cache.lengths[: cache.active]] == [len(s) for s in seqs]


def test_slots_are_bounded():
    cache = SlotCache(num_layers=1, slots=2, max_len=8)
    cache.join()
    cache.join()
    try:
        cache.join()
        raise AssertionError("a third join must be refused")
    except RuntimeError as exc:
        assert "slots" in str(exc)
    assert cache.leave(1) is None and cache.active == 1


@pytest.mark.parametrize("plain_head", [True, False], ids=["head-on-fed-positions", "full-forward"])
def test_rows_fed_nothing_growth_and_loading_a_staged_prefill(plain_head, monkeypatch):
    import onlinespec.decode.slots as slots
    from onlinespec.decode.lm import CacheSession

    if not plain_head:
        monkeypatch.setattr(slots, "PLAIN_HEAD", frozenset())
    model = tiny_llama(layers=2, hidden=64, heads=4, seed=5)
    rng = random.Random(1)
    cache = SlotCache.for_model(model, slots=3, max_len=200, capacity=4)  # grows several times
    seqs = [[rng.randrange(1, 128) for _ in range(n)] for n in (7, 1)]
    for seq in seqs:  # staged prefills: a single-sequence cache copied into a row
        row = cache.join()
        staged = CacheSession(model)
        staged.feed(seq, last_only=True)
        cache.load(row, staged.cache, len(seq))
    for i in range(30):
        feeds = [[rng.randrange(1, 128) for _ in range(rng.randint(0, 4))] for _ in seqs]  # 0: fed nothing
        logits, hidden = forward_rows(model, cache, feeds, hidden=True)
        for row, feed in enumerate(feeds):
            seqs[row] += feed
            assert logits[row].shape[0] == hidden[row].shape[0] == len(feed)
            if feed:
                ref = reference(model, seqs[row], len(feed))
                assert torch.allclose(logits[row], ref, atol=5e-5), (i, row, (logits[row] - ref).abs().max())
    assert cache.capacity >= max(map(len, seqs)) > 4
    assert [int(x) for x in cache.lengths[:2]] == [len(s) for s in seqs]


@pytest.mark.parametrize("plain_head", [True, False], ids=["head-on-fed-positions", "full-forward"])
def test_reading_a_prompt_without_the_head_returns_the_same_states_and_keys(plain_head, monkeypatch):
    """Prefill runs no head (its logits are never read): the hidden states it returns and the keys
    it leaves are those of a forward with the head."""
    import onlinespec.decode.slots as slots

    if not plain_head:
        monkeypatch.setattr(slots, "PLAIN_HEAD", frozenset())
    model = tiny_llama(layers=2, hidden=64, heads=4, seed=7)
    rng = random.Random(2)
    prompts = [[rng.randrange(1, 128) for _ in range(n)] for n in (6, 3, 9)]
    with_head, without = (SlotCache.for_model(model, slots=3, max_len=64) for _ in range(2))
    for cache in (with_head, without):
        for _ in prompts:
            cache.join()
    _, ref = forward_rows(model, with_head, prompts, hidden=True)
    states = forward_rows(model, without, prompts, hidden=True, logits=False)
    assert forward_rows(model, without, [[1], [2], [3]], logits=False) is None
    forward_rows(model, with_head, [[1], [2], [3]], logits=False)
    for row, prompt in enumerate(prompts):
        assert states[row].shape == ref[row].shape == (len(prompt), 64)
        assert torch.allclose(states[row], ref[row], atol=1e-5)
    # what comes next sees the same keys: the next token's logits agree with a single-sequence forward
    nxt = [[5], [6], [7]]
    for cache in (with_head, without):
        for row, logits in enumerate(forward_rows(model, cache, nxt)):
            ref_logits = reference(model, prompts[row] + [row + 1] + nxt[row], 1)
            assert torch.allclose(logits, ref_logits, atol=5e-5), (row, (logits - ref_logits).abs().max())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_ragged_rows_are_packed_only_fed_tokens_reach_the_layers(attention):
    """Rows fed different numbers of tokens cost the layers their fed tokens, not rows x the
    longest (padding positions never reach a projection); the logits still equal single-sequence
    forwards, and rows of one length take the padded path, unchanged."""
    model = tiny_llama(layers=2, hidden=64, heads=4, seed=11)
    model.set_attn_implementation(attention)
    seen: list[int] = []
    model.model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].numel() // 64))
    rng = random.Random(4)
    cache = SlotCache.for_model(model, slots=4, max_len=64)
    seqs = [[rng.randrange(1, 128) for _ in range(n)] for n in (3, 8, 1, 5)]
    for _ in seqs:
        cache.join()
    for feeds in (seqs, [[7], [], [9, 10, 11, 12, 13, 14, 15, 16, 17], [4, 4]], [[1], [2], [3], [4]]):
        seen.clear()
        logits, states = forward_rows(model, cache, [list(f) for f in feeds], hidden=True)
        assert seen == [sum(map(len, feeds)) if len(set(map(len, feeds))) > 1 else len(feeds)]
        for row, feed in enumerate(feeds):
            if feeds is not seqs:
                seqs[row] = seqs[row] + feed
            assert logits[row].shape == (len(feed), 128) and states[row].shape == (len(feed), 64)
            if feed:
                ref = reference(model, seqs[row], len(feed))
                assert torch.allclose(logits[row], ref, atol=5e-5), (row, (logits[row] - ref).abs().max())
    assert model.config._attn_implementation == attention  # restored after each packed forward
    # `last`: the last fed position of each row only (a drafter's catch-up), packed as well
    seen.clear()
    out = forward_rows(model, cache, [[5, 6, 7], [8], [], [9, 9]], last=True)
    assert seen == [6] and [tuple(x.shape) for x in out] == [(1, 128), (1, 128), (0, 128), (1, 128)]
    for row, feed in enumerate([[5, 6, 7], [8], [], [9, 9]]):
        seqs[row] = seqs[row] + feed
        if feed:
            assert torch.allclose(out[row], reference(model, seqs[row], 1), atol=5e-5)
