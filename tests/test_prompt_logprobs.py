"""Prompt log-probs (vLLM's ``prompt_logprobs``; OpenAI's ``echo`` with ``logprobs``): each prompt
token from the second on, scored by the target as the batch reads the prompt, in chunks, beside
other requests, past a prefix cache: equal to the target's own log-softmax over the whole prompt."""

import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from onlinespec.drafters.hf import HFDrafter
from tests.test_batch import drive
from tests.test_engine_greedy import prompts
from tests.tiny import perturbed


@torch.inference_mode()
def reference(target, prompt, n):
    lp = torch.log_softmax(target(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    return chosen, lp.topk(n, dim=-1) if n else None


def test_prompt_logprobs_are_the_target_s_over_the_prompt_read_in_chunks_beside_others(target):
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=4))
    ps = [p * 3 for p in prompts(3, seed=31)]  # long enough to be read in several chunks
    wanted = [2, None, 0]
    gens = [engine.start(p, SamplingParams(max_new_tokens=6, prompt_logprobs=n)) for p, n in zip(ps, wanted)]
    drive(Batch(engine, slots=3, prefill_tokens=8), list(gens))
    for p, n, gen in zip(ps, wanted, gens):
        if n is None:
            assert gen.prompt_logprobs == []
            continue
        chosen, top = reference(target, p, n)
        assert [x.token for x in gen.prompt_logprobs] == p[1:]
        assert torch.allclose(torch.tensor([x.logprob for x in gen.prompt_logprobs]), chosen, atol=1e-4)
        if n:
            assert [[t for t, _ in x.top] for x in gen.prompt_logprobs] == top.indices.tolist()
        else:
            assert all(x.top == () for x in gen.prompt_logprobs)


def test_a_request_that_scores_its_prompt_reads_it_whole_past_the_prefix_cache(target):
    """What the prefix cache holds left no logits: a scoring request reads its prompt itself."""
    engine = SpeculativeEngine(target, None, config=EngineConfig(k=4))
    prompt = prompts(1, seed=32)[0] * 2
    batch = Batch(engine, slots=2, prefill_tokens=64, prefix_tokens=256)
    first = engine.start(prompt, SamplingParams(max_new_tokens=4))
    drive(batch, [first])
    plain = engine.start(prompt, SamplingParams(max_new_tokens=4))
    scored = engine.start(prompt, SamplingParams(max_new_tokens=4, prompt_logprobs=1))
    drive(batch, [plain, scored])
    assert plain.cached_tokens > 0 and scored.cached_tokens == 0
    chosen, _ = reference(target, prompt, 1)
    assert len(scored.prompt_logprobs) == len(prompt) - 1
    assert torch.allclose(torch.tensor([x.logprob for x in scored.prompt_logprobs]), chosen, atol=1e-4)
    assert scored.generated == plain.generated == first.generated
