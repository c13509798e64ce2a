"""Stops inside accepted blocks, feedback record consistency, and bad input."""

import numpy as np
import pytest
import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.drafters.ngram import NGramDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.errors import InvalidRequestError, VocabMismatchError
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.stops import FinishReason
from tests.tiny import VOCAB, tiny_llama


@pytest.fixture()
def perfect_engine(target, tokenizer):
    """The drafter is the target: every draft is accepted, so every stop falls inside a block."""
    return SpeculativeEngine(target, HFDrafter(target, "self"), tokenizer=tokenizer, config=EngineConfig(k=8))


PROMPT = [9, 40, 33, 12, 5]


def reference(target, tokenizer, n=60):
    engine = SpeculativeEngine(target, None, tokenizer=tokenizer)
    return engine.generate(PROMPT, SamplingParams(max_new_tokens=n, ignore_eos=True)).tokens


def test_stop_token_inside_block(perfect_engine, target, tokenizer):
    ref = reference(target, tokenizer)
    # a token whose first occurrence is well inside the output, not at a block boundary
    pos = next(i for i in range(3, len(ref)) if ref[i] not in ref[:i] and i % 9 not in (0, 8))
    result = perfect_engine.generate(PROMPT, SamplingParams(max_new_tokens=60, stop_token_ids=(ref[pos],), ignore_eos=True))
    assert result.tokens == ref[: pos + 1]
    assert result.finish_reason is FinishReason.STOP
    assert result.record.generated == pos + 1  # nothing past the stop is logged
    assert result.record.tokens.tolist() == PROMPT + ref[: pos + 1]


def test_eos_inside_block_and_ignore_eos(target, tokenizer):
    ref = reference(target, tokenizer, n=80)
    eos = ref[6]  # pretend this token is the model's EOS
    engine = SpeculativeEngine(target, HFDrafter(target, "self"), tokenizer=tokenizer, config=EngineConfig(k=8),
                               eos_token_ids={eos})
    first = ref.index(eos)
    assert engine.generate(PROMPT, SamplingParams(max_new_tokens=80)).tokens == ref[: first + 1]
    assert engine.generate(PROMPT, SamplingParams(max_new_tokens=80, ignore_eos=True)).tokens == ref


def test_stop_string_inside_block(perfect_engine, target, tokenizer):
    ref = reference(target, tokenizer)
    text = tokenizer.decode(ref)
    stop = text[10:12]
    cut = text.find(stop)
    result = perfect_engine.generate(PROMPT, SamplingParams(max_new_tokens=60, stop=(stop,), ignore_eos=True))
    assert result.text == text[:cut]
    assert result.finish_reason is FinishReason.STOP
    # tokens up to the one that completed the stop string, and nothing after it
    assert result.tokens == ref[: cut + len(stop)]
    assert result.record.generated == len(result.tokens)


def test_streamed_text_never_shows_a_stop_string(perfect_engine, target, tokenizer):
    ref = reference(target, tokenizer)
    text = tokenizer.decode(ref)
    stop = text[20:23]
    pieces = [out.text for out in perfect_engine.stream(PROMPT, SamplingParams(max_new_tokens=60, stop=(stop,), ignore_eos=True))]
    assert "".join(pieces) == text[: text.find(stop)]
    assert all(stop not in "".join(pieces[: i + 1]) for i in range(len(pieces)))


def test_max_new_tokens_inside_block(perfect_engine, target, tokenizer):
    ref = reference(target, tokenizer)
    for n in (1, 2, 7, 13):
        result = perfect_engine.generate(PROMPT, SamplingParams(max_new_tokens=n, ignore_eos=True))
        assert result.tokens == ref[:n]
        assert result.finish_reason is FinishReason.LENGTH
        assert result.record.generated == n


def test_stream_yields_incremental_tokens(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "c"), config=EngineConfig(k=4))
    steps = list(engine.stream(PROMPT, SamplingParams(max_new_tokens=30, ignore_eos=True)))
    assert sum(len(s.tokens) for s in steps) == 30
    assert [s.finished for s in steps] == [False] * (len(steps) - 1) + [True]
    assert any(len(s.tokens) > 1 for s in steps)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_feedback_logprobs_match_a_separate_target_forward(target, close_drafter_model, temperature):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close", version=3),
                               config=EngineConfig(k=4, feedback_topk=16, target_id="tiny"))
    result = engine.generate(PROMPT, SamplingParams(max_new_tokens=40, temperature=temperature, seed=5, ignore_eos=True))
    record = result.record
    record.validate()
    assert (record.target_id, record.drafter_id, record.drafter_version) == ("tiny", "close", 3)
    assert record.prompt_len == len(PROMPT) and record.tokens.tolist() == PROMPT + result.tokens
    with torch.no_grad():
        full = torch.log_softmax(target(torch.tensor([record.tokens.tolist()])).logits[0].float(), -1)
    # position prompt_len + i is predicted from the logits at prompt_len + i - 1
    ref = full[record.prompt_len - 1 : -1]  # [G, V]
    logged = torch.from_numpy(record.topk_logprobs.astype(np.float32))
    again = ref.gather(1, torch.from_numpy(record.topk_ids).long())
    assert torch.allclose(logged, again, atol=2e-2, rtol=1e-2)  # float16 storage
    top = ref.topk(16, dim=-1)
    assert torch.allclose(logged, top.values, atol=2e-2, rtol=1e-2)
    assert np.all(record.rest_mass >= 0) and np.all(record.rest_mass <= 1)


def test_feedback_flags_agree_with_the_output(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=4))
    result = engine.generate(PROMPT, SamplingParams(max_new_tokens=60, ignore_eos=True))
    r = result.record
    out = np.asarray(result.tokens)
    assert r.accepted.sum() == result.stats.accepted
    assert np.all(r.draft_tokens[r.accepted] == out[r.accepted])
    rejected = r.drafted & ~r.accepted
    assert np.all(r.draft_tokens[rejected] != out[rejected])  # greedy: a rejected draft differs
    # block_index restarts at 0 on every step, and each step has exactly one target-produced token
    starts = np.flatnonzero(r.block_index == 0)
    assert len(starts) == result.stats.steps
    produced_by_target = ~r.accepted
    assert produced_by_target.sum() == result.stats.steps
    # a step drafts m tokens; the record has a drafted position for each accepted one and the rejected one
    assert r.drafted.sum() <= result.stats.drafted
    assert (~r.drafted).sum() == result.stats.steps - rejected.sum()  # bonus (or plain) tokens
    assert result.stats.accepted > 0 and rejected.sum() > 0


def test_histogram_of_accepted_lengths(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=4))
    stats = engine.generate(PROMPT, SamplingParams(max_new_tokens=60, ignore_eos=True)).stats
    assert sum(stats.accepted_hist) == stats.spec_steps
    assert sum(n * c for n, c in enumerate(stats.accepted_hist)) == stats.accepted
    assert stats.accepted_per_pos[0] == stats.spec_steps - stats.accepted_hist[0]
    assert stats.mean_accepted_length == pytest.approx((stats.accepted + stats.spec_steps) / stats.spec_steps)


def test_bad_input_is_refused_with_clear_errors(target, close_drafter_model):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close"), config=EngineConfig(k=4))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate([], SamplingParams())
    for bad in (0, -3):
        with pytest.raises(InvalidRequestError, match="max_new_tokens"):
            SamplingParams(max_new_tokens=bad)
    with pytest.raises(InvalidRequestError, match="k"):
        SamplingParams(k=0)
    with pytest.raises(InvalidRequestError, match="k"):
        EngineConfig(k=0)
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.generate([1, VOCAB + 5], SamplingParams())
    with pytest.raises(InvalidRequestError, match="context"):
        engine.generate([1, 2], SamplingParams(max_new_tokens=10_000))
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        engine.generate([1, 2], SamplingParams(stop=("x",)))


def test_vocab_mismatch_names_both_models(target):
    other = tiny_llama(layers=1, hidden=32, heads=2, vocab=VOCAB // 2, seed=3)
    with pytest.raises(VocabMismatchError, match=r"'small-drafter'.*'tiny-target'"):
        SpeculativeEngine(target, HFDrafter(other, "small-drafter"), config=EngineConfig(target_id="tiny-target"))
    with pytest.raises(VocabMismatchError):
        SpeculativeEngine(target, NGramDrafter(VOCAB + 1))
