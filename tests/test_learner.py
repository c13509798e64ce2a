"""The learner improves a drafter from engine feedback alone, and its state round-trips."""

import numpy as np
import pytest
import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.learn.learner import DrafterLearner, LearnerConfig
from onlinespec.learn.losses import LossConfig
from onlinespec.learn.optim import OptimConfig
from onlinespec.decode.sampling import SamplingParams
from tests.tiny import perturbed, tiny_llama

V = 64


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(layers=2, hidden=48, heads=4, vocab=V, seed=7)
    drafter = perturbed(target, 0.8, seed=8)  # a poor start: room to learn
    return target, drafter


def records(target, drafter, n, seed):
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=4, feedback_topk=16))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, V, (6,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed * 1000 + i, ignore_eos=True)
        out.append(engine.generate(prompt, params).record)
    return out


@pytest.mark.parametrize(
    "config",
    [
        LearnerConfig(optim=OptimConfig(lr=0.5, hint="last", max_grad_norm=1.0)),
        LearnerConfig(optim=OptimConfig(lr=0.5, max_grad_norm=1.0), ensemble_size=3),
        LearnerConfig(optim=OptimConfig(lr=0.02, adaptive=True), loss=LossConfig(kl=0.5, tv=1.0, chain=0.5, focal=0.2, positional_decay=0.8)),
    ],
    ids=["optimistic", "ensemble", "adaptive-mixed-losses"],
)
def test_rounds_raise_heldout_acceptance(pair, config):
    target, drafter = pair
    learner = DrafterLearner(drafter, config)
    heldout = records(target, drafter, 6, seed=99)
    before = learner.evaluate(heldout)["mean_alpha"]
    for r in range(8):
        metrics = learner.round(records(target, learner.served_model(), 6, seed=r))
        assert np.isfinite(metrics.served_loss) and metrics.param_change_norm > 0
        assert abs(sum(metrics.weights) - 1) < 1e-9
    after = learner.evaluate(heldout)["mean_alpha"]
    assert after > before + 0.05, (before, after)


def test_state_round_trip_continues_identically(pair):
    target, drafter = pair
    config = LearnerConfig(optim=OptimConfig(lr=0.3, hint="ema", adaptive=True), ensemble_size=2)
    batch1, batch2 = records(target, drafter, 4, seed=1), records(target, drafter, 4, seed=2)
    a = DrafterLearner(drafter, config)
    a.round(batch1)
    tensors, meta = a.state()
    b = DrafterLearner(a.served_model(), config)
    b.load_state(tensors, meta)
    ma, mb = a.round(batch2), b.round(batch2)
    assert ma.served_loss == pytest.approx(mb.served_loss, abs=1e-6)
    assert ma.weights == pytest.approx(mb.weights)
    for n in a.names:
        assert torch.allclose(a.served_params()[n], b.served_params()[n], atol=1e-6)


def test_zero_step_size_changes_nothing(pair):
    target, drafter = pair
    learner = DrafterLearner(drafter, LearnerConfig(optim=OptimConfig(lr=0.0)))
    m = learner.round(records(target, drafter, 3, seed=5))
    assert m.param_change_norm == 0.0
