"""Suffix speculation: copied drafts are exact, learned from finished outputs, scoped, bounded."""

import random

import numpy as np
import pytest

from onlinespec.drafters.hf import HFDrafter
from onlinespec.drafters.ngram import NGramDrafter
from onlinespec.decode.engine import EngineConfig, GenerationStats, SpeculativeEngine
from onlinespec.learn.replay import replay_greedy, trace_target
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import RequestIndex, SuffixCache, SuffixConfig, best_match
from tests.stats import chi2_pvalue
from tests.test_engine_greedy import hf_greedy, prompts
from tests.test_engine_sampling import V, engine_marginal_counts, exact_marginals, verify_without_residual
from tests.tiny import perturbed, tiny_llama


def test_request_index_most_recent_and_longest():
    idx = RequestIndex(SuffixConfig(max_n=3, min_n=1))
    seq = [1, 2, 3, 9, 1, 2, 4, 7, 2]
    idx.extend(seq)
    assert idx.lookup(seq).token == 4  # "2" was last followed by 4, not 3
    assert idx.lookup(seq + [3]).token == 9  # "2 3" (a draft after the settled "2") was followed by 9
    m = idx.lookup([1, 2, 3, 9, 1, 2, 4, 7, 2, 3, 9, 1, 2])
    assert (m.token, m.n) == (4, 3)  # the longest suffix that occurred, "9 1 2"
    assert RequestIndex(SuffixConfig(min_n=2)).lookup([5, 6]) is None


def test_request_index_drafts_are_matched_like_settled_tokens():
    """Lookups over settled tokens + drafts equal lookups with everything settled: the replay relies on it."""
    rng = random.Random(0)
    cfg = SuffixConfig(max_n=4, min_n=1)
    for _ in range(300):
        seq = [rng.randrange(5) for _ in range(rng.randrange(2, 30))]
        settled = rng.randrange(1, len(seq) + 1)
        partial, full = RequestIndex(cfg), RequestIndex(cfg)
        partial.extend(seq[:settled])
        full.extend(seq)
        assert partial.lookup(seq) == full.lookup(seq), (seq, settled)


def test_cache_counts_scopes_and_evicts():
    cache = SuffixCache(SuffixConfig(max_n=3, cache_min_n=2, max_tokens=10))
    cache.add_output([1, 2], [3, 4, 5], scope="a")
    cache.add_output([1, 2], [3, 6], scope="a")
    cache.add_output([1, 2], [3, 6], scope="a")
    assert cache.lookup([9, 1, 2], "a").token == 3  # the prompt tail lets the first output token match
    assert cache.lookup([1, 2, 3], "a").token == 6  # most frequent continuation
    assert cache.lookup([2, 3], "a").token == 6
    assert cache.lookup([1, 2, 3], "b") is None  # another tenant never sees a's outputs
    assert cache.tokens == 7
    cache.add_output([7], [8, 8, 8, 8], scope="a")  # 11 tokens > 10: the oldest output leaves
    assert cache.tokens == 8
    assert cache.lookup([1, 2, 3], "a").token == 6
    for _ in range(3):
        cache.add_output([], [8, 8, 8, 8], scope="a")
    assert cache.lookup([1, 2, 3], "a") is None and cache.lookup([1, 2], "a") is None
    assert len(cache) == 2  # only "8 8" and "8 8 8" remain: evicted outputs leave no entries behind


def test_best_match_prefers_the_longer_match_and_the_request_on_ties():
    cfg = SuffixConfig(max_n=4, min_n=1, cache_min_n=1)
    cache = SuffixCache(cfg)
    cache.add_output([], [5, 6, 7, 8])
    idx = RequestIndex(cfg)
    context = [6, 1, 5, 6, 7]
    idx.extend(context)
    assert best_match(idx, cache, context).source == "cache"  # "7" never occurred earlier in the request
    context = [7, 9, 5, 6, 7]
    idx = RequestIndex(cfg)
    idx.extend(context)
    m = best_match(idx, cache, context)
    assert (m.source, m.token) == ("cache", 8)  # cache "5 6 7" (3) beats the request's "7" (1)
    context = [5, 6, 7, 2, 5, 6, 7]
    idx = RequestIndex(cfg)
    idx.extend(context)
    m = best_match(idx, cache, context)
    assert (m.source, m.token) == ("request", 2)  # equal lengths: the request's own text


def bad_drafter(target):
    return HFDrafter(perturbed(target, 1.0, seed=7), "bad")


@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_with_suffix_equals_target_alone(target, k):
    cache = SuffixCache()
    engine = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=k), suffix=cache)
    copied = 0
    for prompt in prompts(6, seed=k) * 2:  # the second pass meets its own earlier outputs in the cache
        result = engine.generate(prompt, SamplingParams(max_new_tokens=40))
        assert result.tokens == hf_greedy(target, prompt, 40), f"k={k} prompt={prompt}"
        copied += result.stats.copied_accepted
    assert copied > 0, "nothing copied was accepted: the test exercises nothing"
    assert cache.added == 12


def test_suffix_learns_from_finished_requests(target):
    """The same traffic served again: the cache has learned it, the drafter alone has not."""
    ps = prompts(6, seed=3)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)

    def serve(suffix):
        engine = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=4), suffix=suffix)
        first = GenerationStats.combine(engine.generate(p, params).stats for p in ps)
        again = GenerationStats.combine(engine.generate(p, params).stats for p in ps)
        return first, again

    plain_first, plain_again = serve(None)
    first, again = serve(SuffixCache())
    assert plain_again.mean_accepted_length == plain_first.mean_accepted_length  # no learning without the cache
    assert again.mean_accepted_length > first.mean_accepted_length + 1.0
    assert again.mean_accepted_length > plain_again.mean_accepted_length + 1.0
    assert again.copied_accepted > first.copied_accepted


def test_suffix_is_scoped_per_tenant(target):
    prompt, params = prompts(1, seed=5)[0], SamplingParams(max_new_tokens=40, ignore_eos=True)
    engine = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=4), suffix=SuffixCache())
    alone = engine.generate(prompt, params, tenant="a").stats
    other = engine.generate(prompt, params, tenant="b").stats
    same = engine.generate(prompt, params, tenant="a").stats
    assert other.copied_accepted == alone.copied_accepted  # b only copies from its own request
    assert same.copied_accepted > alone.copied_accepted
    shared = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=4),
                               suffix=SuffixCache(SuffixConfig(scope="shared")))
    shared.generate(prompt, params, tenant="a")
    assert shared.generate(prompt, params, tenant="b").stats.copied_accepted > alone.copied_accepted


def test_suffix_with_a_model_free_drafter(target):
    engine = SpeculativeEngine(target, NGramDrafter(target.config.vocab_size), config=EngineConfig(k=4),
                               suffix=SuffixCache())
    for prompt in prompts(4, seed=9) * 2:
        assert engine.generate(prompt, SamplingParams(max_new_tokens=30)).tokens == hf_greedy(target, prompt, 30)


@pytest.mark.parametrize("k", [None, 3])
def test_suffix_speculation_without_any_drafter_model(target, k):
    """No drafter model at all: copies are the only drafts (fixed k, or the adaptive controller
    of suffix speculation alone), and the output is still exactly the target's."""
    engine = SpeculativeEngine(target, None, config=EngineConfig(k=k), suffix=SuffixCache())
    copied = 0
    for prompt in prompts(6, seed=11) * 2:
        result = engine.generate(prompt, SamplingParams(max_new_tokens=40))
        assert result.tokens == hf_greedy(target, prompt, 40)
        assert result.stats.copied == result.stats.drafted  # every draft is a copy
        copied += result.stats.copied_accepted
    assert copied > 0, "nothing was copied: the test exercises nothing"


@pytest.mark.parametrize("k", [2, 5])
def test_replay_with_suffix_matches_the_engine(target, close_drafter_model, k):
    """Requests served one after another, the cache learning each at its finish: replay == engine."""
    ps = prompts(5, seed=k) * 2
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "c"), config=EngineConfig(k=k, feedback_topk=8),
                               suffix=SuffixCache())
    real = [engine.generate(p, SamplingParams(max_new_tokens=40, ignore_eos=True)) for p in ps]
    cache = SuffixCache()
    stats, records = [], []
    for p in ps:
        trace = trace_target(target, p, 40, topk=8, ignore_eos=True)
        recs, st = replay_greedy(close_drafter_model, [trace], k, suffix=cache)
        cache.add_output(trace.prompt, trace.generated)
        stats.append(st)
        records += recs
    replayed, served = GenerationStats.combine(stats), GenerationStats.combine(r.stats for r in real)
    assert served.copied_accepted > 0
    for name in ("steps", "spec_steps", "drafted", "accepted", "accepted_hist", "copied_accepted", "own_judged"):
        assert getattr(replayed, name) == getattr(served, name), name
    assert replayed.copied <= served.copied  # the replay knows only the judged drafts' sources
    # the drafter's own judged drafts and the copies judged are the record's drafted positions (a
    # record keeps the emitted ones: up to each block's first rejection); drafts past a rejection
    # count as drafted, not judged
    assert served.own_judged + replayed.copied == sum(int(r.record.drafted.sum()) for r in real)
    assert served.own_accepted <= served.own_judged < served.own_drafted
    for rec, r in zip(records, real):
        for name in ("drafted", "accepted", "block_index", "draft_tokens"):
            assert np.array_equal(getattr(rec, name), getattr(r.record, name)), name


def test_sampling_with_copied_drafts_matches_target_marginals(monkeypatch):
    """Copied drafts are one-hot proposals: the rejection rule keeps the output exactly the target's."""
    params = SamplingParams(temperature=0.8, top_k=8)
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=4)
    drafter = HFDrafter(tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=5), "other")
    prompt = [3, 7, 1]
    cache = SuffixCache(SuffixConfig(cache_min_n=2, max_n=3))
    cache.add_output(prompt, [2, 9, 4])  # a confident, often wrong, continuation: copied at most positions
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(k=3), suffix=cache)
    # the cache must not learn from the test's own samples: freeze it
    monkeypatch.setattr(cache, "add_output", lambda *a, **kw: None)
    exact = exact_marginals(target, prompt, params)
    n = 1500
    counts = engine_marginal_counts(engine, prompt, params, n)
    for j in range(3):
        assert chi2_pvalue(counts[j], exact[j]) > 1e-3, f"position {j}: {counts[j]} vs {exact[j] * n}"
    copied = engine.generate(prompt, SamplingParams(**{**params.__dict__, "seed": 1, "max_new_tokens": 3,
                                                       "ignore_eos": True})).stats.copied
    assert copied >= 1
    import onlinespec.decode.engine as engine_mod

    monkeypatch.setattr(engine_mod, "verify", verify_without_residual)
    bad = engine_marginal_counts(engine, prompt, params, n)
    assert min(chi2_pvalue(bad[j], exact[j]) for j in range(3)) < 1e-4


def test_suffix_config_rejects_nonsense():
    with pytest.raises(ValueError, match="min_n"):
        SuffixConfig(min_n=0)
    with pytest.raises(ValueError, match="scope"):
        SuffixConfig(scope="global")
    with pytest.raises(ValueError, match="unknown"):
        SuffixConfig.from_dict({"max_n": 4, "mx_tokens": 3})
    assert SuffixConfig.from_dict({"max_n": 4}).max_n == 4


def test_a_restarted_server_warms_the_cache_from_the_feedback_stream(target, redis_client):
    """The logged records carry every output and its tenant: a fresh cache relearns the newest."""
    from onlinespec.feedback import keys
    from onlinespec.feedback.codec import encode
    from onlinespec.feedback.stream import recent_records

    engine = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=4, target_id="t"),
                               suffix=SuffixCache())
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    ps = prompts(5, seed=2)
    stream = keys.feedback_stream("t")
    for i, p in enumerate(ps):
        record = engine.generate(p, params, tenant="a" if i % 2 == 0 else "b").record
        redis_client.xadd(stream, {"r": encode(record)})
        if i == 2:
            redis_client.xadd(stream, {"r": b"\x93not a record"})  # malformed: skipped, counted
    records, bad = recent_records(redis_client, "t", max_tokens=10**6, batch=2)
    assert bad == 1 and len(records) == 5
    assert [r.tokens[:r.prompt_len].tolist() for r in records] == ps  # oldest first
    newest, _ = recent_records(redis_client, "t", max_tokens=45)
    assert len(newest) == 2 and newest[-1].tokens.tolist() == records[-1].tokens.tolist()  # 30 + 30 >= 45

    warm = SuffixCache()
    assert warm.warm(records) == 5
    assert warm.tokens == engine.suffix.tokens == 150
    for r in records:
        context = r.tokens[:r.prompt_len + 10].tolist()
        assert warm.lookup(context, r.tenant) == engine.suffix.lookup(context, r.tenant)
    restarted = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=4), suffix=warm)
    cold = SpeculativeEngine(target, bad_drafter(target), config=EngineConfig(k=4), suffix=SuffixCache())
    again = restarted.generate(ps[0], params, tenant="a").stats
    assert again.copied_accepted > cold.generate(ps[0], params, tenant="a").stats.copied_accepted
