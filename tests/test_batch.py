"""Continuous batching is lossless row by row: every request of a batch gets exactly what it
would get alone (greedy: the target's own output; seeded sampling: the same text whatever else
is in the batch; unseeded sampling: the target's distribution), through joins, leaves,
cancellations, stops inside an accepted block and a request that fails."""

import numpy as np
import pytest
import torch

import onlinespec.decode.engine as engine_mod
from onlinespec.decode.batch import Batch, run_batched
from onlinespec.drafters.hf import HFDrafter
from onlinespec.drafters.ngram import NGramDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import SuffixCache
from tests.stats import chi2_pvalue
from tests.test_engine_greedy import hf_greedy, prompts
from tests.test_engine_sampling import (V, exact_marginals, verify_coupled_accepting_every_draft,
                                        verify_without_residual)
from tests.tiny import VOCAB, perturbed, tiny_llama


def drive(batch: Batch, waiting: list, cancel_at: dict | None = None) -> dict:
    """Step until every request is done; returns each generation's emitted tokens (by id) as
    streamed, so a cancelled one shows what it got before it left."""
    streamed: dict[int, list[int]] = {id(g): [] for g in waiting}
    steps = 0
    while waiting or len(batch):
        while waiting and batch.room:
            batch.add(waiting.pop(0))
        for gen, out in batch.step():
            assert not isinstance(out, Exception), out
            streamed.setdefault(id(gen), []).extend(out.tokens)
        steps += 1
        for gen in list(batch.generations):
            if cancel_at and cancel_at.get(id(gen)) == steps:
                batch.remove(gen)
    return streamed


@pytest.mark.parametrize("config", [EngineConfig(k=4), EngineConfig(k=2), EngineConfig()], ids=["k4", "k2", "adaptive"])
@pytest.mark.parametrize("suffix", [False, True], ids=["drafter", "drafter+suffix"])
def test_greedy_rows_equal_target_alone_through_joins_and_leaves(target, config, suffix):
    drafter = HFDrafter(perturbed(target, 0.1, seed=3), "d")
    engine = SpeculativeEngine(target, drafter, config=config, suffix=SuffixCache() if suffix else None)
    batch = Batch(engine, slots=3, prefill_tokens=16)  # prompts up to 40 tokens: prefilled over several steps
    todo = prompts(9, seed=2)
    todo[1] = todo[1] * 3  # repetitive: suffix copies get accepted
    gens = [engine.start(p, SamplingParams(max_new_tokens=12 + 5 * i)) for i, p in enumerate(todo)]
    streamed = drive(batch, list(gens))
    accepted = 0
    for gen in gens:
        assert gen.finished
        expected = hf_greedy(target, gen.prompt, gen.params.max_new_tokens)
        assert gen.generated == expected == streamed[id(gen)], gen.prompt
        accepted += gen.stats.accepted
    if config.k:
        assert accepted > 20, "drafts were hardly accepted: the test would not see a broken rewind"


def test_a_stop_inside_an_accepted_block_and_a_cancel_leave_the_others_exact(target):
    # the drafter is the target: every draft is accepted, so stops fall inside accepted blocks
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.0), "same"), config=EngineConfig(k=5))
    p = prompts(4, seed=7)
    full = hf_greedy(target, p[0], 30)
    stop_id = full[7]
    first = full.index(stop_id)
    gens = [
        engine.start(p[0], SamplingParams(max_new_tokens=30, stop_token_ids=(stop_id,))),
        engine.start(p[1], SamplingParams(max_new_tokens=30)),
        engine.start(p[2], SamplingParams(max_new_tokens=30)),  # cancelled after its 2nd step
        engine.start(p[3], SamplingParams(max_new_tokens=3)),  # stops on max_new_tokens mid-block
    ]
    streamed = drive(Batch(engine, slots=4), list(gens), cancel_at={id(gens[2]): 2})
    assert gens[0].generated == full[: first + 1] and gens[0].stop.finish_reason.value == "stop"
    assert gens[1].generated == hf_greedy(target, p[1], 30)
    assert not gens[2].finished and streamed[id(gens[2])] == hf_greedy(target, p[2], 30)[: len(streamed[id(gens[2])])]
    assert gens[3].generated == hf_greedy(target, p[3], 3)


def test_requests_join_a_running_batch_and_ngram_drafters_batch_too(target):
    engine = SpeculativeEngine(target, NGramDrafter(VOCAB), config=EngineConfig(k=4))
    batch = Batch(engine, slots=4)
    todo = [p * 2 for p in prompts(6, seed=9)]
    gens = [engine.start(p, SamplingParams(max_new_tokens=40)) for p in todo]
    batch.add(gens[0])
    for _ in range(5):  # the first request runs alone for a while; the others join mid-generation
        batch.step()
    drive(batch, gens[1:])
    for gen in gens:
        assert gen.generated == hf_greedy(target, gen.prompt, 40)
    assert sum(g.stats.accepted for g in gens) > 0


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=3))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=123)
    alone = run_batched(engine, [engine.start([5, 6, 7], params)])[0].generated
    single = engine.generate([5, 6, 7], params).tokens
    crowd = [engine.start(p, SamplingParams(max_new_tokens=20 + i, temperature=0.9, seed=i))
             for i, p in enumerate(prompts(5, seed=4))]
    mine = engine.start([5, 6, 7], params)
    run_batched(engine, crowd[:2] + [mine] + crowd[2:], slots=4)
    assert mine.generated == alone == single
    other = run_batched(engine, [engine.start([5, 6, 7], SamplingParams(max_new_tokens=40, temperature=1.0,
                                                                          seed=124))])[0].generated
    assert other != alone


@pytest.mark.slow
@pytest.mark.parametrize("coupled", [False, True], ids=["rejection-sampling", "seeded"])
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=8, top_p=0.95)]
)
def test_batched_sampling_matches_target_marginals(params, coupled, monkeypatch):
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=4)
    drafter_model = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=5)  # an unrelated drafter
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "other"), config=EngineConfig(k=2),
                               suffix=SuffixCache())
    prompt = [3, 7, 1]
    exact = exact_marginals(target, prompt, params)
    n = 1500

    def counts():
        gens = [engine.start(prompt, SamplingParams(**{**params.__dict__, "seed": 1000 + i, "max_new_tokens": 3,
                                                       "ignore_eos": True}), isolated=True, coupled=coupled)
                for i in range(n)]
        out = [np.zeros(V) for _ in range(3)]
        for gen in run_batched(engine, gens, slots=16):
            for j, t in enumerate(gen.generated[:3]):
                out[j][t] += 1
        return out

    good = counts()
    for j in range(3):
        assert chi2_pvalue(good[j], exact[j]) > 1e-3, f"position {j}: {good[j]} vs {exact[j] * n}"
    if coupled:  # the statistic has the power to see a broken verifier
        monkeypatch.setattr(engine_mod, "verify_coupled", verify_coupled_accepting_every_draft)
    else:
        monkeypatch.setattr(engine_mod, "verify", verify_without_residual)
    bad = counts()
    assert min(chi2_pvalue(bad[j], exact[j]) for j in range(3)) < 1e-4


def test_a_request_that_fails_late_leaves_the_others_untouched(target, close_drafter_model, monkeypatch):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=3))
    gens = [engine.start(p, SamplingParams(max_new_tokens=24)) for p in prompts(4, seed=5)]
    doomed = gens[1]
    real = doomed.settle
    calls = []

    def settle(*a, **kw):  # bad input discovered late: the 3rd step of this request raises
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("detokenizer exploded")
        return real(*a, **kw)

    monkeypatch.setattr(doomed, "settle", settle)
    batch = Batch(engine, slots=4)
    for g in gens:
        batch.add(g)
    failed = []
    while len(batch):
        for gen, out in batch.step():
            if isinstance(out, Exception):
                failed.append((gen, str(out)))
    assert failed == [(doomed, "detokenizer exploded")]
    for gen in gens:
        if gen is not doomed:
            assert gen.generated == hf_greedy(target, gen.prompt, 24)


def test_memory_and_rows_are_released(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=2))
    batch = Batch(engine, slots=2)
    run = [engine.start(p, SamplingParams(max_new_tokens=8)) for p in prompts(5, seed=1)]
    drive(batch, run)
    assert len(batch) == 0 and batch.cache.active == 0 and batch.staging.active == 0
    assert not batch.drafters  # the drafter's rows went with its last request
    assert batch.kv_bytes == 0  # idle: the key/value memory is given back
    with pytest.raises(AssertionError):
        for _ in range(3):
            batch.add(engine.start([1, 2], SamplingParams(max_new_tokens=4)))
    assert torch.is_tensor(batch.cache.lengths)


def _batch_with_costs(target, acceptance: float, encode_rate: float, suffix: bool = False):
    """A batch whose controller has measured costs (a plain step 10 ms, a drafted position 1 ms
    to draft and 1 ms to verify), drafter ``d``'s acceptance and its cost of encoding a text."""
    drafter = HFDrafter(perturbed(target, 0.1, seed=3), "d")
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(), suffix=SuffixCache() if suffix else None)
    costs = engine.k_controller.at(2)
    costs.t_plain, costs.t_draft, costs.v = 0.010, 0.001, 0.001
    engine.k_controller.start_version("d", acceptance)
    engine.k_controller.encode_rate["d"] = encode_rate
    return engine, drafter, Batch(engine, slots=2, prefill_tokens=256)


def test_a_drafter_encodes_only_rows_that_earn_the_encoding_back(target):
    """Encoding a joining row's text is paid once: a row with 3 tokens left would spend more on
    it than its drafts save (it takes copies only); one with 100 left joins. A probe (a step
    speculating where the estimates say it does not pay) encodes one row, the shortest, and only
    where the drafter holds none: it must draft to measure anything (at one row every request is
    new to the drafter, and probes that encoded nobody never drafted again), but encoding every
    row would make it cost several steps."""
    engine, drafter, batch = _batch_with_costs(target, acceptance=0.8, encode_rate=1e-3)
    text = [[(7 * i + 3) % VOCAB for i in range(30)], [(5 * i + 1) % VOCAB for i in range(30)]]  # 29 tokens to encode
    long, short = (engine.start(p, SamplingParams(max_new_tokens=n)) for p, n in zip(text, (100, 3)))
    batch.add(long)
    batch.add(short)
    batch.step()
    assert batch.last.k > 0
    group = batch.drafters[id(drafter)]
    assert group.joined(long) and not group.joined(short)
    assert long.stats.own_steps == 1 and short.stats.own_steps == 0  # the drafter drafted for the long row only

    engine, drafter, batch = _batch_with_costs(target, acceptance=0.05, encode_rate=1e-6)
    costs = engine.k_controller.at(2)
    copies = engine.k_controller.proposer(engine.k_controller.rows_key(None))
    copies.accepted, copies.rejected = 1.0, 19.0  # copies do not pay either
    costs.plain_streak = 4 * costs.probe_every  # plain for long: the next step probes, every drafter drafting
    longer, shorter = (engine.start(p, SamplingParams(max_new_tokens=100)) for p in (text[0], text[1][:20]))
    batch.add(longer)
    batch.add(shorter)
    batch.step()
    assert engine.k_controller.probing(2) and batch.last.k > 0
    group = batch.drafters[id(drafter)]
    assert group.gens == [shorter] and shorter.stats.own_steps == 1 and longer.stats.own_steps == 0
    engine.k_controller.start_version("d", 0.05)  # the next probe: the drafter holds a row, nobody joins
    costs.plain_streak = 4 * costs.probe_every * costs.backoff
    batch.step()
    assert engine.k_controller.probing(2) and group.gens == [shorter] and longer.stats.own_steps == 0


@pytest.mark.parametrize("context", [None, 10], ids=["whole-text", "window"])
def test_a_drafters_rows_draft_what_the_drafter_alone_drafts(target, monkeypatch, context):
    """Rows joining a drafter together (text of different lengths, encoded in one forward, in
    chunks) and later ones draft exactly what the drafter drafts alone from the same text (with
    ``drafter_context``, from the last tokens of the text when the row joined, as a text of its
    own): a broken encoding stays lossless (verification catches it) but would draft wrong."""
    import onlinespec.decode.proposers as proposers_mod

    monkeypatch.setattr(proposers_mod, "ENCODE_CHUNK", 7)  # texts of up to 39 tokens: several chunks, ragged
    model = perturbed(target, 0.3, seed=5)
    engine = SpeculativeEngine(target, HFDrafter(model, "d"), config=EngineConfig(k=3, drafter_context=context))
    batch = Batch(engine, slots=3, prefill_tokens=256)  # the first three prompts join at once
    seen: list[tuple[list[int], list[int]]] = []
    propose = Batch._propose

    def recording(self, k_rows, muted=frozenset()):
        texts = [list(g.tokens) for g in self.rows]
        drafts, qs, copied = propose(self, k_rows, muted)
        group = next(iter(self.drafters.values()))
        seen.extend((text[group.skipped[g]:], d) for g, text, d in zip(self.rows, texts, drafts))
        return drafts, qs, copied

    monkeypatch.setattr(Batch, "_propose", recording)
    gens = [engine.start(p, SamplingParams(max_new_tokens=6 + 3 * i)) for i, p in enumerate(prompts(5, seed=11))]
    drive(batch, list(gens))

    def alone(text: list[int], k: int) -> list[int]:
        out = []
        with torch.no_grad():
            for _ in range(k):
                out.append(int(model(torch.tensor([text + out])).logits[0, -1].argmax()))
        return out

    assert len(seen) > 10
    if context:  # the window (and the newest token) when they joined, what was generated since
        assert {len(t) for t, _ in seen[:3]} == {context + 1} and max(len(t) for t, _ in seen) < context + 30
    else:
        assert len({len(t) for t, _ in seen[:3]}) > 1  # ragged texts encoded together
    for text, drafts in seen:
        assert drafts == alone(text, len(drafts)), text


def test_copies_alone_speculate_where_a_weak_drafter_would_make_the_batch_plain(target):
    """A drafter whose rows' blocks are accepted at 0.2 prices the batch plain; copy-only blocks
    accepted at 0.8 pay. The step mutes the drafter and speculates with the copies (at 8 rows of
    SmolLM2 edit traffic the batch went plain in 93% of steps and the copies went unused)."""
    engine, drafter, batch = _batch_with_costs(target, acceptance=0.2, encode_rate=1e-6, suffix=True)
    ctl = engine.k_controller
    ctl.at(2).v = 0.003  # a drafted position costs 1 + 3 ms: k = 1 at 0.2 does not pay, k = 2 at 0.8 does
    for key, a in ((ctl.rows_key("d"), 0.2), ("d", 0.2), (ctl.rows_key(None), 0.8)):
        ctl.proposer(key).accepted, ctl.proposer(key).rejected = 200 * a, 200 * (1 - a)
    text = [list(range(3, 13)) * 3, list(range(20, 28)) * 4]  # repetitive: copies match
    gens = [engine.start(p, SamplingParams(max_new_tokens=50)) for p in text]
    for gen in gens:
        batch.add(gen)
    batch.step()
    assert batch.last.k == 2
    assert all(g.stats.own_steps == 0 for g in gens)  # the drafter drafted for nobody
    assert all(g.stats.copied == g.stats.drafted == 2 for g in gens)  # each row drafted two copies
