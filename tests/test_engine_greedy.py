"""Greedy speculative decoding returns exactly the target's own greedy output."""

import pytest
import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.drafters.ngram import NGramDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from tests.tiny import VOCAB, perturbed, tiny_llama


def hf_greedy(model, prompt, n):
    """Independent reference: Hugging Face generate, greedy, with the same stop settings (EOS=0)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0
    )
    return out[0, len(prompt):].tolist()


def prompts(n, seed=0, max_len=40):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1, VOCAB, (int(torch.randint(1, max_len, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16])
def test_greedy_equals_target_alone_hf_drafter(target, close_drafter_model, k):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=k, k_max=16))
    params = SamplingParams(max_new_tokens=48)
    total_accepted = 0
    for prompt in prompts(12, seed=k):
        result = engine.generate(prompt, params)
        assert result.tokens == hf_greedy(target, prompt, 48), f"k={k} prompt={prompt}"
        total_accepted += result.stats.accepted
    assert total_accepted > 0, "the drafter never got a token accepted: the test exercises nothing"


@pytest.mark.parametrize("noise", [0.0, 0.2, 1.0])
def test_greedy_equals_target_for_good_and_bad_drafters(target, noise):
    # noise 0: the drafter is the target (every draft accepted, bonus tokens every step);
    # noise 1: it mostly disagrees (corrections every step).
    drafter = HFDrafter(perturbed(target, noise, seed=3), "d")
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(k=4))
    for prompt in prompts(8, seed=11):
        assert engine.generate(prompt, SamplingParams(max_new_tokens=40)).tokens == hf_greedy(target, prompt, 40)


def test_greedy_equals_target_with_ngram_drafter(target):
    engine = SpeculativeEngine(target, NGramDrafter(VOCAB), config=EngineConfig(k=4))
    accepted = 0
    for prompt in prompts(10, seed=5):
        result = engine.generate(prompt * 2, SamplingParams(max_new_tokens=60))
        assert result.tokens == hf_greedy(target, prompt * 2, 60)
        accepted += result.stats.accepted
    assert accepted > 0


def test_greedy_equals_target_with_adaptive_k(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=None))
    for prompt in prompts(10, seed=7):
        assert engine.generate(prompt, SamplingParams(max_new_tokens=50)).tokens == hf_greedy(target, prompt, 50)


def test_plain_decoding_equals_hf_generate(target):
    engine = SpeculativeEngine(target, None)
    for prompt in prompts(6, seed=9):
        result = engine.generate(prompt, SamplingParams(max_new_tokens=30))
        assert result.tokens == hf_greedy(target, prompt, 30)
        assert result.stats.spec_steps == 0


def test_other_seeds_of_the_target(close_drafter_model):
    # Several target weights, same check: nothing depends on one lucky model.
    for seed in (1, 2, 3):
        target = tiny_llama(layers=1, hidden=32, heads=2, seed=seed)
        drafter = HFDrafter(perturbed(target, 0.1, seed=seed + 10), "d")
        engine = SpeculativeEngine(target, drafter, config=EngineConfig(k=3))
        for prompt in prompts(5, seed=seed):
            assert engine.generate(prompt, SamplingParams(max_new_tokens=32)).tokens == hf_greedy(target, prompt, 32)


def test_prompt_of_one_token_and_one_new_token(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=4))
    assert engine.generate([7], SamplingParams(max_new_tokens=1)).tokens == hf_greedy(target, [7], 1)
    assert engine.generate([7], SamplingParams(max_new_tokens=20)).tokens == hf_greedy(target, [7], 20)


def test_drafter_swap_mid_request_keeps_output(target, close_drafter_model):
    drafter = HFDrafter(close_drafter_model, "close")
    engine = SpeculativeEngine(target, drafter, config=EngineConfig(k=4))
    prompt = prompts(1, seed=21)[0]
    gen = engine.start(prompt, SamplingParams(max_new_tokens=40))
    gen.step()
    gen.step()
    drafter.swap(perturbed(target, 0.5, seed=9), version=1)  # new weights between steps
    gen.step()
    engine.set_drafter(NGramDrafter(VOCAB))  # another drafter altogether
    while not gen.finished:
        gen.step()
    assert gen.generated == hf_greedy(target, prompt, 40)
