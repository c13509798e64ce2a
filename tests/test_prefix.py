"""Prefix caching: prompts that begin with text read before take its keys and values from the
cache, prefill only the rest, and get exactly what they would get without it (greedy: the
target's own output), with a feature drafter's features too; the radix tree splits, keeps hidden
states it learns later, and evicts the least recently used leaves within its budget."""

import pytest
import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.features import FeatureLog
from onlinespec.decode.prefix import PrefixCache
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.slots import SlotCache, forward_rows
from onlinespec.decode.suffix import SuffixCache
from onlinespec.drafters.hf import HFDrafter
from tests.test_batch import drive
from tests.test_engine_greedy import hf_greedy
from tests.tiny import VOCAB, perturbed

SYSTEM = list(range(5, 28))  # 23 tokens every prompt begins with, as a chat template's system prompt


def chat_like(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [SYSTEM + torch.randint(1, VOCAB, (int(torch.randint(4, 15, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def prefilled(batch: Batch, gens: list) -> int:
    """Drive ``gens`` through ``batch``; returns the prompt tokens the target prefilled."""
    fed, waiting = 0, list(gens)
    while waiting or len(batch):
        while waiting and batch.room:
            batch.add(waiting.pop(0))
        for _, out in batch.step():
            assert not isinstance(out, Exception), out
        fed += batch.last.prefill_tokens
    return fed


@torch.inference_mode()
def test_a_loaded_prefix_gives_the_logits_of_reading_the_whole_prompt(target):
    a = SYSTEM + [40, 41, 42, 43]
    b = SYSTEM + [40, 41, 90, 91, 92]  # shares 25 tokens with a, then differs
    first = SlotCache.for_model(target, 1, 64)
    first.join()
    forward_rows(target, first, [a], logits=False)
    prefix = PrefixCache(1000)
    assert prefix.store(a, first, 0) == len(a)
    cache = SlotCache.for_model(target, 2, 64)
    cache.join()
    assert prefix.load(b, cache, 0) == 25
    assert int(cache.lengths[0]) == 25
    got = forward_rows(target, cache, [b[25:]])[0]
    expected = target(torch.tensor([b])).logits[0, 25:]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # a prefix of a node's run splits it: both halves and the new branch are matched exactly
    assert prefix.store(b, cache, 0) == len(b) - 25
    assert len(prefix) == len(a) + len(b) - 25
    third = SlotCache.for_model(target, 1, 64)
    third.join()
    assert prefix.load(SYSTEM + [40, 77], third, 0) == len(SYSTEM) + 1
    assert prefix.stats.hit == 25 + len(SYSTEM) + 1


@pytest.mark.parametrize("config", [EngineConfig(k=4), EngineConfig()], ids=["k4", "adaptive"])
def test_greedy_rows_equal_the_target_alone_and_read_the_shared_beginning_once(target, config):
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=config,
                               suffix=SuffixCache())
    ps = chat_like(6, seed=4)
    plain = [engine.start(p, SamplingParams(max_new_tokens=10 + i)) for i, p in enumerate(ps)]
    cached = [engine.start(p, SamplingParams(max_new_tokens=10 + i)) for i, p in enumerate(ps)]
    fed_plain = prefilled(Batch(engine, slots=2, prefill_tokens=16), plain)
    fed_cached = prefilled(Batch(engine, slots=2, prefill_tokens=16, prefix_tokens=4096), cached)
    for p, a, b in zip(ps, plain, cached):
        expected = hf_greedy(target, p, b.params.max_new_tokens)
        assert a.generated == b.generated == expected
    assert fed_plain == sum(len(p) - 1 for p in ps)
    # the first two prompts are read whole (they are prefilled together); the others find the
    # shared beginning (and the later rows their earlier rows' text, where it goes further)
    assert [g.cached_tokens for g in cached[:2]] == [0, 0]
    assert all(g.cached_tokens >= len(SYSTEM) for g in cached[2:])
    assert fed_cached == fed_plain - sum(g.cached_tokens for g in cached)


def test_a_conversations_next_turn_reads_only_what_is_new(target):
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=3))
    batch = Batch(engine, slots=2, prefix_tokens=4096)
    first = engine.start(SYSTEM + [50, 51, 52], SamplingParams(max_new_tokens=12))
    drive(batch, [first])
    turn = first.tokens + [60, 61, 62, 63]  # the answer, then the user's next message
    second = engine.start(turn, SamplingParams(max_new_tokens=12))
    drive(batch, [second])
    # everything the first request settled but its last token (never fed) was kept
    assert second.cached_tokens == len(first.tokens) - 1
    assert second.generated == hf_greedy(target, turn, 12)
    # an isolated request reads what is there but leaves its own text behind
    alone = engine.start(SYSTEM + [70, 71], SamplingParams(max_new_tokens=8), isolated=True)
    before = len(batch.prefix)
    drive(batch, [alone])
    assert alone.cached_tokens == len(SYSTEM)
    assert len(batch.prefix) == before + 1  # its prompt's new token is kept, its output is not


def test_a_feature_drafter_gets_the_features_of_the_cached_prefix(target):
    from tests.test_feature_drafter import HEAD
    from onlinespec.drafters.feature import feature_from
    from tests.tiny import tiny_llama
    t = tiny_llama(layers=3, hidden=48, heads=4, vocab=96, seed=21)
    drafter = HFDrafter(feature_from(t, "prefix-test-target", HEAD), "f")
    engine = SpeculativeEngine(t, drafter, config=EngineConfig(k=3, capture_features=1.0))
    ps = [SYSTEM + [30 + i, 31 + i, 32 + i] for i in range(3)]
    for prefix_tokens in (0, 4096):
        gens = [engine.start(p, SamplingParams(max_new_tokens=9)) for p in ps]
        drive(Batch(engine, slots=1, prefix_tokens=prefix_tokens), list(gens))
        for gen, p in zip(gens, ps):
            assert gen.generated == hf_greedy(t, p, 9)
            with torch.no_grad():
                truth = t.model(torch.tensor([gen.tokens[:-1]])).last_hidden_state[0]
            torch.testing.assert_close(gen.features[:], truth, rtol=1e-4, atol=1e-4)
        if prefix_tokens:
            assert [g.cached_tokens for g in gens] == [0, len(SYSTEM), len(SYSTEM)]


@torch.inference_mode()
def test_hidden_states_learnt_later_and_least_recently_used_leaves_leave_first(target):
    cache = SlotCache.for_model(target, 1, 128)
    cache.join()
    text = SYSTEM + list(range(40, 60))
    forward_rows(target, cache, [text], logits=False)
    hidden = FeatureLog()
    hidden.append(torch.randn(len(text), 64))
    prefix = PrefixCache(len(SYSTEM) + 10)
    prefix.store(SYSTEM, cache, 0)  # no hidden states known
    row = SlotCache.for_model(target, 1, 128)
    row.join()
    assert prefix.load(SYSTEM, row, 0, FeatureLog()) == 0, "a reader of features needs their hidden states"
    prefix.store(SYSTEM, cache, 0, hidden)
    features = FeatureLog()
    assert prefix.load(SYSTEM, row, 0, features) == len(SYSTEM)
    torch.testing.assert_close(features[:], hidden[: len(SYSTEM)])
    # two branches of 5 fit the budget; a third evicts the one used least recently
    branches = [SYSTEM + list(range(40 + 5 * i, 45 + 5 * i)) for i in range(3)]
    for i, b in enumerate(branches[:2]):
        c = SlotCache.for_model(target, 1, 128)
        c.join()
        forward_rows(target, c, [b], logits=False)
        prefix.store(b, c, 0)
    prefix.load(branches[0], row, 0)  # the first branch is used again
    c = SlotCache.for_model(target, 1, 128)
    c.join()
    forward_rows(target, c, [branches[2]], logits=False)
    prefix.store(branches[2], c, 0)
    assert len(prefix) == len(SYSTEM) + 10 and prefix.stats.evicted == 5
    assert prefix.load(branches[0], row, 0) == len(branches[0])
    assert prefix.load(branches[1], row, 0) == len(SYSTEM)
    assert prefix.stats.nbytes == sum(n.nbytes for n in _nodes(prefix))
    # a text longer than the budget keeps its beginning, not nothing
    long = list(range(60, 60 + 2 * prefix.max_tokens))
    c = SlotCache.for_model(target, 1, 128)
    c.join()
    forward_rows(target, c, [long], logits=False)
    assert prefix.store(long, c, 0) == prefix.max_tokens == len(prefix)
    assert prefix.load(long, row, 0) == prefix.max_tokens


def _nodes(prefix):
    out, todo = [], [child for root in prefix.roots.values() for child in root.children.values()]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(node.children.values())
    return out


def test_with_scope_tenant_each_tenant_reads_only_what_its_own_requests_left(target):
    from onlinespec.config import ServingConfig
    with pytest.raises(ValueError, match="prefix_cache_scope"):
        ServingConfig(prefix_cache_scope="nobody")
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=3))
    batch = Batch(engine, slots=1, prefix_tokens=4096, prefix_scope="tenant")
    prompt = SYSTEM + [50, 51]

    def serve(tenant, salt=None):
        gen = engine.start(prompt, SamplingParams(max_new_tokens=6), tenant=tenant)
        gen.cache_salt = salt
        drive(batch, [gen])
        assert gen.generated == hf_greedy(target, prompt, 6)
        return gen.cached_tokens

    assert serve("a") == 0
    assert serve("b") == 0, "another tenant's text is not read"
    assert serve("a") == len(prompt) - 1
    assert serve(None) == 0 and serve(None) == 0, "a request without a tenant neither reads nor leaves"
    # a salt (vLLM's cache_salt) narrows a tenant's tree, and gives a request without a tenant one
    assert serve("a", "s") == 0 and serve("a", "s") == len(prompt) - 1
    assert serve(None, "s") == 0 and serve(None, "s") == len(prompt) - 1
    assert set(batch.prefix.roots) == {("a", None), ("b", None), ("a", "s"), (None, "s")}
    # a shared cache serves everyone
    shared = Batch(engine, slots=1, prefix_tokens=4096)
    for tenant, cached in (("a", 0), ("b", len(prompt) - 1), (None, len(prompt) - 1)):
        gen = engine.start(prompt, SamplingParams(max_new_tokens=6), tenant=tenant)
        drive(shared, [gen])
        assert gen.cached_tokens == cached
    # the budget is shared: a scope whose last text is evicted leaves no tree behind
    small = PrefixCache(len(prompt) - 1)
    c = SlotCache.for_model(target, 1, 64)
    c.join()
    forward_rows(target, c, [prompt], logits=False)
    small.store(prompt, c, 0, scope="a")
    small.store(prompt, c, 0, scope="b")
    assert set(small.roots) == {"b"} and len(small) == len(prompt) - 1 and small.stats.evicted == len(prompt) - 1


def test_with_a_key_value_budget_the_cache_gives_way_to_the_requests(target):
    """``kv_tokens`` counts the cache's positions too: at every moment the requests' reservations
    and the cache fit within it, the cache keeps what room they leave (and is read from), and no
    request waits for the cache's sake."""
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=4),
                               suffix=SuffixCache())
    ps = chat_like(8, seed=9)
    gens = [engine.start(p, SamplingParams(max_new_tokens=12)) for p in ps]
    batch = Batch(engine, slots=2, prefill_tokens=16, kv_tokens=150, prefix_tokens=4096)
    waiting, most, shared = list(gens), 0, 0
    while waiting or len(batch):
        while waiting and batch.fits(waiting[0]):
            batch.add(waiting.pop(0))
            assert batch.reserved + len(batch.prefix) <= 150
        shared = max(shared, len(batch))
        for _, out in batch.step():
            assert not isinstance(out, Exception), out
        assert batch.reserved + len(batch.prefix) <= 150
        most = max(most, len(batch.prefix))
    for p, gen in zip(ps, gens):
        assert gen.generated == hf_greedy(target, p, 12)
    assert shared == 2  # two requests at once, as without a cache: it gave way
    assert batch.prefix.stats.evicted > 0 and batch.prefix.stats.hit >= len(SYSTEM)
    assert most > len(SYSTEM)  # alone, a request leaves room the cache keeps
