"""min_tokens (vLLM's): no EOS or stop token id among the first ``min_tokens`` generated tokens
(the target's logits for them are held at -inf, at every position of a drafted block), and no
stop string ending within their text. Checked against Hugging Face ``generate(min_new_tokens=)``
and against the target alone with the mask written out."""

import pytest
import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams, penalize
from onlinespec.decode.stops import FinishReason
from onlinespec.decode.suffix import SuffixCache
from onlinespec.drafters.hf import HFDrafter
from onlinespec.errors import InvalidRequestError
from tests.test_batch import drive
from tests.test_engine_greedy import hf_greedy, prompts
from tests.tiny import perturbed

PROMPT = [9, 40, 33, 12, 5]


def test_penalize_holds_stop_ids_only_before_min_tokens():
    logits = torch.zeros(4, 6)
    out = penalize(logits, SamplingParams(min_tokens=4), [1], generated=[2, 3], drafts=[4, 5, 1],
                   stop_ids=frozenset({0, 5}))
    # rows 0 and 1 follow 2 and 3 generated tokens (< 4): held; rows 2 and 3 follow 4 and 5
    assert torch.all(out[:2, [0, 5]] == float("-inf")) and torch.all(out[2:] == 0.0)
    assert torch.all(out[:2, 1:5] == 0.0) and torch.all(logits == 0.0)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_new_tokens=8, min_tokens=9)


@pytest.mark.parametrize("k", [4, None], ids=["k4", "adaptive"])
def test_min_tokens_gives_what_hugging_face_gives(target, k):
    """An EOS the target would emit early is held back until min_tokens, through drafted blocks."""
    held = 0
    for prompt in prompts(3, seed=21):
        ref = hf_greedy(target, prompt, 40)
        eos = ref[2]  # pretend the target's third token is its EOS
        engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"),
                                   config=EngineConfig(k=k), suffix=SuffixCache(), eos_token_ids={eos})
        for min_tokens in (0, 5, 12):
            expected = target.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=min_tokens,
                                       do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(prompt):].tolist()
            result = engine.generate(prompt, SamplingParams(max_new_tokens=40, min_tokens=min_tokens))
            assert result.tokens == expected, (prompt, min_tokens)
            assert eos not in result.tokens[:min_tokens]
            held += min_tokens > 0 and result.tokens != ref[:3]
    assert held >= 4  # min_tokens changed the texts it could change


def test_min_tokens_through_the_batch_with_a_stop_token_id_and_ignore_eos(target):
    """In one batch: a stop token id held back; and EOS held back under ignore_eos too (vLLM's rule)."""
    ref = hf_greedy(target, PROMPT, 40)
    eos, stop = ref[1], ref[3]
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), config=EngineConfig(k=4),
                               eos_token_ids={eos})
    held_stop = SamplingParams(max_new_tokens=30, min_tokens=8, stop_token_ids=(stop,), ignore_eos=True)
    held_eos = SamplingParams(max_new_tokens=30, min_tokens=8, ignore_eos=True)
    gens = [engine.start(PROMPT, held_stop), engine.start(PROMPT, held_eos), engine.start(PROMPT, SamplingParams(
        max_new_tokens=30))]
    drive(Batch(engine, slots=3, prefill_tokens=16), list(gens))
    expected_stop = masked_greedy(target, PROMPT, 30, 8, {eos, stop}, ends={stop})
    assert gens[0].generated == expected_stop and stop not in gens[0].generated[:8]
    assert gens[1].generated == masked_greedy(target, PROMPT, 30, 8, {eos}, ends=set())
    assert gens[2].generated == ref[:2]  # the plain request in the same batch still ends at its EOS
    assert gens[0].generated != ref[:4] and eos not in gens[1].generated[:8]


@torch.inference_mode()
def masked_greedy(target, prompt, n, min_tokens, held, ends):
    """The target alone, with ``held`` ids at -inf while fewer than ``min_tokens`` are generated."""
    tokens = list(prompt)
    for i in range(n):
        logits = target(torch.tensor([tokens])).logits[0, -1].float()
        if i < min_tokens:
            logits[list(held)] = float("-inf")
        tokens.append(int(logits.argmax()))
        if tokens[-1] in ends:
            break
    return tokens[len(prompt):]


def test_drafts_are_made_under_min_tokens(target):
    """A drafter that is the target itself drafts what the held-back target chooses: every draft is
    accepted (drafting unmasked, it would propose the EOS the target may not take)."""
    ref = hf_greedy(target, PROMPT, 30)
    eos = ref[2]
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.0, seed=1), "same"), config=EngineConfig(k=4),
                               eos_token_ids={eos})
    result = engine.generate(PROMPT, SamplingParams(max_new_tokens=20, min_tokens=10))
    assert result.tokens == masked_greedy(target, PROMPT, 20, 10, {eos}, ends={eos})
    assert result.stats.drafted > 0 and result.stats.accepted == result.stats.drafted


def test_no_stop_string_ends_within_the_first_min_tokens(target, tokenizer):
    engine = SpeculativeEngine(target, HFDrafter(target, "self"), tokenizer=tokenizer, config=EngineConfig(k=8))
    ref = engine.generate(PROMPT, SamplingParams(max_new_tokens=60, ignore_eos=True)).tokens
    texts = [tokenizer.decode(ref[:i], skip_special_tokens=True) for i in range(len(ref) + 1)]
    text = texts[-1]
    for stop in dict.fromkeys(text[i:i + 2] for i in range(3, len(text) - 1)):  # one that recurs
        first_end = text.find(stop) + len(stop)
        ends_at = next(i for i, t in enumerate(texts) if len(t) >= first_end)  # tokens that complete it
        min_tokens = ends_at + 1  # that occurrence ends within the first min_tokens tokens
        later = text.find(stop, len(texts[min_tokens]) - len(stop) + 1)  # the first that ends after them
        if later >= 0:
            break
    assert later >= 0, "the reference text repeats a stop string"
    result = engine.generate(PROMPT, SamplingParams(max_new_tokens=60, stop=(stop,), ignore_eos=True,
                                                    min_tokens=min_tokens))
    assert result.finish_reason is FinishReason.STOP
    assert result.text == text[:later]
    plain = engine.generate(PROMPT, SamplingParams(max_new_tokens=60, stop=(stop,), ignore_eos=True))
    assert plain.text == text[: first_end - len(stop)]
