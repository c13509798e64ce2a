"""Replaying greedy speculative decoding from teacher forcing matches the real engine exactly."""

import numpy as np
import pytest

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, GenerationStats, SpeculativeEngine
from onlinespec.learn.replay import replay_greedy, trace_target
from onlinespec.decode.sampling import SamplingParams
from tests.test_engine_greedy import prompts


@pytest.mark.parametrize("k", [1, 3, 6])
def test_replay_matches_the_engine(target, close_drafter_model, k):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "c"), config=EngineConfig(k=k, feedback_topk=8))
    ps = prompts(6, seed=k)
    traces = [trace_target(target, p, 40, topk=8, ignore_eos=True) for p in ps]
    records, stats = replay_greedy(close_drafter_model, traces, k)
    real = [engine.generate(p, SamplingParams(max_new_tokens=40, ignore_eos=True)) for p in ps]
    served = GenerationStats.combine(r.stats for r in real)
    assert served.accepted > 0
    for name in ("steps", "spec_steps", "drafted", "accepted", "rejections", "accepted_hist", "accepted_per_pos"):
        assert getattr(stats, name) == getattr(served, name), name
    assert stats.mean_accepted_length == served.mean_accepted_length
    for rec, r in zip(records, real):
        rec.validate()
        assert rec.tokens.tolist() == r.record.tokens.tolist()
        for name in ("drafted", "accepted", "block_index", "draft_tokens", "topk_ids"):
            assert np.array_equal(getattr(rec, name), getattr(r.record, name)), name
