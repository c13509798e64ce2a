"""Sampling verification is lossless: the output is distributed exactly as the target's.

Two levels: ``verify`` alone against a known ``p`` (many samples, exact first-token law), and
the whole engine on a tiny model against the exact marginals of the first generated tokens.
Each test also runs deliberately broken verifiers through the same statistic and requires it
to reject them, so the statistic has the power to catch those bugs.
"""

import numpy as np
import pytest
import torch

import onlinespec.decode.engine as engine_mod
import onlinespec.decode.verify as verify_mod
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams, probs
from onlinespec.decode.verify import Verdict, verify
from tests.stats import chi2_pvalue
from tests.tiny import tiny_llama

V = 12


def verify_without_residual(logits, drafts, q, params, generator):
    """Bug: on rejection, resample from p instead of norm(max(0, p - q))."""
    p = probs(logits, params)
    m = drafts.numel()
    for i in range(m):
        qd = q[i, drafts[i]] if q is not None else 1.0
        if torch.rand(1, generator=generator) * qd >= p[i, drafts[i]]:
            return Verdict(i, int(torch.multinomial(p[i], 1, generator=generator)))
    return Verdict(m, int(torch.multinomial(p[m], 1, generator=generator)))


def verify_wrong_ratio(logits, drafts, q, params, generator):
    """Bug: accept with probability min(1, q/p) instead of min(1, p/q)."""
    p = probs(logits, params)
    m = drafts.numel()
    for i in range(m):
        d = drafts[i]
        if torch.rand(1, generator=generator) * p[i, d] >= q[i, d]:
            residual = (p[i] - q[i]).clamp_min(0)
            return Verdict(i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
    return Verdict(m, int(torch.multinomial(p[m], 1, generator=generator)))


def first_token_counts(verifier, p_logits, q_probs, params, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(p_logits.shape[-1])
    for _ in range(n):
        d = torch.multinomial(q_probs[0], 1, generator=g)
        verdict = verifier(p_logits, d, q_probs[:1], params, g)
        counts[int(d) if verdict.accepted else verdict.token] += 1
    return counts


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6, top_p=0.9)]
)
def test_verify_first_token_follows_p(params):
    g = torch.Generator().manual_seed(1)
    p_logits = torch.randn(2, V, generator=g)
    # A drafter that roughly agrees with the target: overlapping supports after the cuts.
    q_probs = probs(p_logits + torch.randn(2, V, generator=g), params)
    target = probs(p_logits, params)[0].numpy()
    n = 6000
    good = first_token_counts(verify, p_logits, q_probs, params, n)
    assert chi2_pvalue(good, target) > 1e-3
    for broken in (verify_without_residual, verify_wrong_ratio):
        bad = first_token_counts(broken, p_logits, q_probs, params, n)
        assert chi2_pvalue(bad, target) < 1e-6, f"the statistic cannot tell {broken.__name__} from a lossless verifier"


def exact_marginals(model, prompt, params, steps=3):
    """Exact distribution of each of the first ``steps`` generated tokens (small vocabulary)."""
    with torch.no_grad():
        dist = {tuple(): 1.0}
        marginals = []
        for _ in range(steps):
            nxt, marginal = {}, np.zeros(V)
            for seq, w in dist.items():
                logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1]
                p = probs(logits, params).numpy()
                marginal += w * p
                for t in np.nonzero(p > 1e-9)[0]:
                    nxt[seq + (int(t),)] = w * p[t]
            marginals.append(marginal)
            dist = nxt
    return marginals


def engine_marginal_counts(engine, prompt, params, n, steps=3, coupled=False):
    counts = [np.zeros(V) for _ in range(steps)]
    for i in range(n):
        result = engine.generate(prompt, SamplingParams(**{**params.__dict__, "seed": 1000 + i, "max_new_tokens": steps, "ignore_eos": True}), coupled=coupled)
        for j, t in enumerate(result.tokens[:steps]):
            counts[j][t] += 1
    return counts


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=8, top_p=0.95)]
)
def test_engine_sampling_matches_target_marginals(params, monkeypatch):
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=4)
    drafter_model = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=5)  # an unrelated drafter
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "other"), config=EngineConfig(k=2))
    prompt = [3, 7, 1]
    exact = exact_marginals(target, prompt, params)
    n = 1500
    counts = engine_marginal_counts(engine, prompt, params, n)
    for j in range(3):
        assert chi2_pvalue(counts[j], exact[j]) > 1e-3, f"position {j}: {counts[j]} vs {exact[j] * n}"
    # The same statistic rejects an engine whose verifier skips the residual step.
    monkeypatch.setattr(engine_mod, "verify", verify_without_residual)
    bad = engine_marginal_counts(engine, prompt, params, n)
    assert min(chi2_pvalue(bad[j], exact[j]) for j in range(3)) < 1e-4


def verify_coupled_accepting_every_draft(logits, drafts, params, noise):
    """Bug: a seeded request's drafts accepted without comparing them with the target's draw."""
    m = drafts.numel()
    return Verdict(m, int(verify_mod.noisy_argmax(logits[m:], params, noise[m:])[0]))


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=8, top_p=0.95)]
)
def test_seeded_requests_sample_exactly_from_the_target_too(params, monkeypatch):
    """Seeded requests draw each token by Gumbel-max with noise fixed by seed and position."""
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=4)
    drafter_model = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=5)
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "other"), config=EngineConfig(k=2))
    prompt = [3, 7, 1]
    exact = exact_marginals(target, prompt, params)
    n = 1500
    counts = engine_marginal_counts(engine, prompt, params, n, coupled=True)
    for j in range(3):
        assert chi2_pvalue(counts[j], exact[j]) > 1e-3, f"position {j}: {counts[j]} vs {exact[j] * n}"
    monkeypatch.setattr(engine_mod, "verify_coupled", verify_coupled_accepting_every_draft)
    bad = engine_marginal_counts(engine, prompt, params, n, coupled=True)
    assert min(chi2_pvalue(bad[j], exact[j]) for j in range(3)) < 1e-4


def test_a_seeded_text_does_not_depend_on_the_drafts_or_the_draft_length(target, close_drafter_model):
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=77, ignore_eos=True)
    texts = {tuple(SpeculativeEngine(target, drafter, config=EngineConfig(k=k)).generate([5, 6, 7], params).tokens)
             for drafter, k in ((HFDrafter(close_drafter_model, "close"), 3), (HFDrafter(close_drafter_model, "c"), 7),
                                (HFDrafter(tiny_llama(seed=11), "unrelated"), 2), (None, None))}
    assert len(texts) == 1


def test_seed_makes_sampling_reproducible(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=3))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=123)
    a = engine.generate([5, 6, 7], params).tokens
    b = engine.generate([5, 6, 7], params).tokens
    c = engine.generate([5, 6, 7], SamplingParams(max_new_tokens=40, temperature=1.0, seed=124)).tokens
    assert a == b
    assert a != c


def test_verify_greedy_rule():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert verify(logits, torch.tensor([1, 0]), None, SamplingParams(), None) == Verdict(2, 2)
    assert verify(logits, torch.tensor([1, 2]), None, SamplingParams(), None) == Verdict(1, 0)
    assert verify(logits, torch.tensor([0, 0]), None, SamplingParams(), None) == Verdict(0, 1)
    assert verify_mod.verify(logits[:1], torch.zeros(0, dtype=torch.long), None, SamplingParams(), None) == Verdict(0, 1)
