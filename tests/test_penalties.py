"""Penalties and logit biases (OpenAI's frequency_penalty, presence_penalty, logit_bias; vLLM's and
Hugging Face's repetition_penalty): the speculative engine and the batch give exactly what the target
alone gives under them, position by position through drafted blocks (each draft counts for the
positions after it), against independent references: Hugging Face ``generate`` for repetition, a
plain loop written out here for the others."""

import pytest
import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams, penalize
from onlinespec.decode.suffix import SuffixCache
from onlinespec.drafters.hf import HFDrafter
from onlinespec.errors import InvalidRequestError
from tests.test_batch import drive
from tests.test_engine_greedy import hf_greedy, prompts
from tests.tiny import perturbed


@torch.inference_mode()
def plain_greedy(target, prompt, n, frequency=0.0, presence=0.0, bias=(), ignore_eos=False):
    """The target alone, one token at a time, OpenAI's formula applied to its last logits."""
    tokens = list(prompt)
    for _ in range(n):
        logits = target(torch.tensor([tokens])).logits[0, -1].float()
        for token in set(tokens[len(prompt):]):
            count = tokens[len(prompt):].count(token)
            logits[token] -= frequency * count + presence
        for token, b in bias:
            logits[token] += b
        tokens.append(int(logits.argmax()))
        if tokens[-1] == 0 and not ignore_eos:  # EOS of the tiny models
            break
    return tokens[len(prompt):]


def test_penalize_counts_each_draft_for_the_positions_after_it():
    logits = torch.zeros(3, 6)
    logits[:, 4] = 2.0
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0,
                            logit_bias=((1, 3.0),))
    out = penalize(logits, params, prompt=[4], generated=[2, 2], drafts=[3, 2])
    # position 0: generated 2 twice; position 1: and draft 3; position 2: and draft 2 again
    assert out[0, 2] == pytest.approx(-(0.5 * 2 + 0.25)) and out[0, 3] == 0.0
    assert out[1, 3] == pytest.approx(-(0.5 + 0.25)) and out[2, 2] == pytest.approx(-(0.5 * 3 + 0.25))
    assert out[0, 4] == pytest.approx(1.0)  # a prompt token, positive: divided by the repetition penalty
    neg = penalize(torch.full((1, 6), -1.0), SamplingParams(repetition_penalty=2.0), [5], [], [])
    assert neg[0, 5] == -2.0 and neg[0, 0] == -1.0  # a negative one is multiplied by it, where seen
    assert torch.all(out[:, 1] == 3.0) and torch.all(out[:, 5] == 0.0)
    assert torch.equal(logits[:, 4], torch.full((3,), 2.0)), "the raw logits are left as they were"


@pytest.mark.parametrize("k", [4, None], ids=["k4", "adaptive"])
def test_repetition_penalty_gives_what_hugging_face_gives(target, k):
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=k),
                               suffix=SuffixCache())
    changed = 0
    for prompt in prompts(4, seed=11):
        params = SamplingParams(max_new_tokens=24, repetition_penalty=1.3)
        expected = target.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=0,
                                   pad_token_id=0, repetition_penalty=1.3)[0, len(prompt):].tolist()
        assert engine.generate(prompt, params).tokens == expected
        changed += expected != hf_greedy(target, prompt, 24)
    assert changed >= 2  # the penalty changed the texts


def test_frequency_presence_and_bias_through_the_batch_give_the_target_alone(target):
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=4),
                               suffix=SuffixCache())
    ps = prompts(5, seed=12)
    settings = [dict(frequency=0.8), dict(presence=1.5), dict(frequency=0.3, presence=0.3, bias=((7, 5.0),)),
                dict(frequency=-0.5), dict()]
    gens = [engine.start(p, SamplingParams(max_new_tokens=20, frequency_penalty=s.get("frequency", 0.0),
                                            presence_penalty=s.get("presence", 0.0), logit_bias=s.get("bias", ())))
            for p, s in zip(ps, settings)]
    drive(Batch(engine, slots=3, prefill_tokens=16), list(gens))
    changed = 0
    for p, s, gen in zip(ps, settings, gens):
        assert gen.generated == plain_greedy(target, p, 20, **s)
        changed += gen.generated != hf_greedy(target, p, 20)
    assert changed >= 3  # the penalties did change the texts (else this test proves nothing)
    assert sum(g.stats.accepted for g in gens) > 0  # and drafts were accepted under them


def test_a_logit_bias_outside_the_vocabulary_is_refused(target):
    engine = SpeculativeEngine(target, None)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.start([1, 2], SamplingParams(logit_bias=((10**6, 1.0),)))
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)


@torch.inference_mode()
def test_a_seeded_sample_under_penalties_is_the_target_alone_s_with_the_same_noise(target):
    """Sampling with a seed: each token is the Gumbel-max draw from the penalized distribution at
    its position, drafted or not (the drafts count for the positions after them)."""
    from onlinespec.decode.sampling import PositionNoise, noisy_argmax

    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=4),
                               suffix=SuffixCache())
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=5, frequency_penalty=0.7,
                            repetition_penalty=1.2, ignore_eos=True)
    prompt = prompts(1, seed=13)[0]
    noise = PositionNoise(5, engine.vocab_size)
    tokens = list(prompt)
    for _ in range(20):
        logits = target(torch.tensor([tokens])).logits[0, -1:]
        judged = penalize(logits, params, prompt, tokens[len(prompt):], [])
        tokens.append(int(noisy_argmax(judged, params, noise.at(len(tokens)))[0]))
    gen = engine.start(prompt, params)
    drive(Batch(engine, slots=2, prefill_tokens=16), [gen])
    assert gen.generated == tokens[len(prompt):]
    assert gen.stats.accepted > 0


def test_drafts_are_made_under_the_request_s_penalties(target):
    """A drafter that is the target itself drafts what the penalized target chooses: every draft
    is accepted (unpenalized, it would draft the repeats the penalty rules out)."""
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.0, seed=1), "same"), config=EngineConfig(k=4))
    params = SamplingParams(max_new_tokens=24, frequency_penalty=1.0, presence_penalty=0.5, ignore_eos=True)
    gens = [engine.start(p, params) for p in prompts(3, seed=14)]
    drive(Batch(engine, slots=3, prefill_tokens=16), list(gens))
    for p, gen in zip(prompts(3, seed=14), gens):
        assert gen.generated == plain_greedy(target, p, 24, frequency=1.0, presence=0.5, ignore_eos=True)
    drafted, accepted = sum(g.stats.drafted for g in gens), sum(g.stats.accepted for g in gens)
    assert drafted > 0 and accepted == drafted, (accepted, drafted)


def test_a_feature_drafter_drafts_penalized_requests_too():
    from onlinespec.drafters.feature import feature_from
    from tests.test_feature_drafter import HEAD
    from tests.tiny import tiny_llama

    t = tiny_llama(layers=3, hidden=48, heads=4, vocab=96, seed=21)
    engine = SpeculativeEngine(t, HFDrafter(feature_from(t, "penalty-test-target", HEAD), "f"),
                               config=EngineConfig(k=3))
    ps = [[5, 6, 7, 8, 9, 10 + i] for i in range(3)]
    gens = [engine.start(p, SamplingParams(max_new_tokens=12, frequency_penalty=0.9, logit_bias=((40, 2.0),)))
            for p in ps]
    drive(Batch(engine, slots=2, prefill_tokens=16), list(gens))
    for p, gen in zip(ps, gens):
        assert gen.generated == plain_greedy(t, p, 12, frequency=0.9, bias=((40, 2.0),))
    assert sum(g.stats.drafted for g in gens) > 0


@torch.inference_mode()
def test_allowed_token_ids_through_the_batch_give_the_target_alone_within_them(target):
    """vLLM's allowed_token_ids: every token of the text is one of them, and the text is the
    target's greedy choice among them at every position, drafted or not; a drafter that is the
    target itself drafts within them too (all accepted)."""
    allowed = tuple(range(3, 40, 3))

    def alone(prompt, n):
        tokens = list(prompt)
        for _ in range(n):
            logits = target(torch.tensor([tokens])).logits[0, -1].float()
            tokens.append(allowed[int(logits[list(allowed)].argmax())])
        return tokens[len(prompt):]

    params = SamplingParams(max_new_tokens=20, allowed_token_ids=allowed)
    for drafter, all_accepted in ((perturbed(target, 0.1, seed=3), False), (perturbed(target, 0.0, seed=1), True)):
        engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=4),
                                   suffix=None if all_accepted else SuffixCache())  # copies may miss
        ps = prompts(3, seed=15)
        gens = [engine.start(p, params) for p in ps] + [engine.start(ps[0], SamplingParams(max_new_tokens=20))]
        drive(Batch(engine, slots=4, prefill_tokens=16), list(gens))
        for p, gen in zip(ps, gens):
            assert gen.generated == alone(p, 20) and set(gen.generated) <= set(allowed)
        assert not set(gens[-1].generated) <= set(allowed)  # the request beside them is free
        drafted, accepted = sum(g.stats.drafted for g in gens[:3]), sum(g.stats.accepted for g in gens[:3])
        assert accepted > 0 and (accepted == drafted) == all_accepted, (accepted, drafted)
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        engine.start([1, 2], SamplingParams(allowed_token_ids=(5, 10**6)))
    with pytest.raises(InvalidRequestError, match="no token could come"):
        engine.start([1, 2], SamplingParams(allowed_token_ids=(0,), min_tokens=2))


@torch.inference_mode()
def test_min_p_cuts_what_the_target_finds_unlikely_drafted_or_not(target):
    """vLLM's min_p: a seeded sample is the target alone's Gumbel-max draw from its distribution
    cut at min_p x its likeliest token's probability, position by position through drafted
    blocks; min_p = 1 leaves only the argmax (the greedy text)."""
    from onlinespec.decode.sampling import PositionNoise, noisy_argmax, probs

    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=4),
                               suffix=SuffixCache())
    prompt = prompts(1, seed=16)[0]
    params = SamplingParams(max_new_tokens=24, temperature=1.5, seed=9, min_p=0.2, ignore_eos=True)
    noise = PositionNoise(9, engine.vocab_size)
    tokens = list(prompt)
    for _ in range(24):
        logits = target(torch.tensor([tokens])).logits[0, -1:]
        p = probs(logits, params)[0]
        assert 1 < int((p > 0).sum()) < engine.vocab_size  # the cut keeps a few tokens, not all
        tokens.append(int(noisy_argmax(logits, params, noise.at(len(tokens)))[0]))
    gen = engine.start(prompt, params)
    drive(Batch(engine, slots=2, prefill_tokens=16), [gen])
    assert gen.generated == tokens[len(prompt):] and gen.stats.accepted > 0
    uncut = engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=1.5, seed=9, ignore_eos=True))
    assert uncut.tokens != gen.generated  # without the cut the same noise draws another text
    greedy = engine.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)).tokens
    assert engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=1.0, seed=3, min_p=1.0,
                                                  ignore_eos=True)).tokens == greedy
