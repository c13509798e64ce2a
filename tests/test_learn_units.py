"""Losses, online updates and Hedge on small, checkable problems."""

import numpy as np
import pytest
import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.learn.batch import collate
from onlinespec.learn.forward import drafter_logits
from onlinespec.learn.hedge import Hedge
from onlinespec.learn.losses import LossConfig, acceptance, compute_loss, position_terms, sharpened_log_p
from onlinespec.learn.optim import OnlineOptimizer, OptimConfig
from onlinespec.decode.sampling import SamplingParams, probs
from onlinespec.decode.verify import verify
from tests.tiny import tiny_llama

V = 16


def test_tv_is_one_minus_the_engines_acceptance_probability():
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=1)
    drafter = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=2)
    # K = V: no rest bucket, so TV is exact
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=3, feedback_topk=V))
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    record = engine.generate([1, 2, 3], params).record
    batch = collate([record])
    with torch.no_grad():
        _, alpha = position_terms(drafter_logits(drafter, batch), batch)
        seq = torch.tensor([record.tokens.tolist()])
        p = probs(target(seq).logits[0], params)[record.prompt_len - 1 : -1]
        q = probs(drafter(seq).logits[0], params)[record.prompt_len - 1 : -1]
    engine_acceptance = torch.minimum(p, q).sum(-1)  # P(accept) = sum_x q(x) min(1, p(x)/q(x))
    assert torch.allclose(alpha, engine_acceptance, atol=2e-3)
    # and the verifier accepts at that rate: one position, many trials
    i = 0
    logits_p = target(seq).logits[0, record.prompt_len - 1 : record.prompt_len + 1].detach()
    g = torch.Generator().manual_seed(0)
    trials = 4000
    accepted = sum(
        verify(logits_p, torch.multinomial(q[i], 1, generator=g), q[i : i + 1], params, g).accepted
        for _ in range(trials)
    )
    se = (alpha[i] * (1 - alpha[i]) / trials).sqrt()
    assert abs(accepted / trials - float(alpha[i])) < 5 * se + 1e-3


def test_greedy_acceptance_is_exactly_what_the_engine_accepted():
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=1)
    drafter = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=2)
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=3, feedback_topk=4))
    records = [engine.generate([1 + s, 2, 3], SamplingParams(max_new_tokens=30, ignore_eos=True)).record
               for s in range(4)]
    batch = collate(records)
    with torch.no_grad():
        served = acceptance(drafter_logits(drafter, batch), batch)
    drafted = batch.drafted
    assert set(served.tolist()) <= {0.0, 1.0}
    assert 0 < int(batch.accepted[drafted].sum()) < int(drafted.sum())  # both outcomes occur
    assert served[drafted].bool().tolist() == batch.accepted[drafted].tolist()
    # the prequential loss of a greedy round is the share of positions whose argmax differs
    out = compute_loss(drafter_logits(drafter, batch), batch, LossConfig())
    assert out.prequential == pytest.approx(float(1 - served.mean()))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.2])
def test_acceptance_and_sharpened_target_are_exact_when_every_id_is_logged(temperature):
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=1)
    drafter = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=2)
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=3, feedback_topk=V))
    params = SamplingParams(max_new_tokens=16, temperature=temperature, seed=4, ignore_eos=True)
    record = engine.generate([1, 2, 3], params).record
    batch = collate([record])
    with torch.no_grad():
        seq = torch.tensor([record.tokens.tolist()])
        p = probs(target(seq).logits[0], params)[record.prompt_len - 1: -1]
        q = probs(drafter(seq).logits[0], params)[record.prompt_len - 1: -1]
        served = acceptance(drafter_logits(drafter, batch), batch)
        p_t = sharpened_log_p(batch.p_log, batch.temperature).exp()
    assert torch.allclose(served, torch.minimum(p, q).sum(-1), atol=2e-3)
    # K = V: the rest bucket is empty and p_T is the target at T, in logged-id order
    assert torch.allclose(p_t[:, :V], p.gather(1, batch.p_ids), atol=2e-3)
    assert float(p_t[:, V].max()) < 1e-3  # fp16 log-probs leave a little mass unaccounted


def test_temperature_floor_trains_greedy_requests_toward_the_argmax_only():
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=1)
    engine = SpeculativeEngine(target, None, config=EngineConfig(feedback_topk=V))
    greedy = collate([engine.generate([1, 2, 3], SamplingParams(max_new_tokens=12, ignore_eos=True)).record])
    sampled = collate([engine.generate([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=1.0, seed=1,
                                                                 ignore_eos=True)).record])

    def copy_and_sharp(batch):  # a drafter that copies the logged p, one that is p at temperature 0.05
        copy = torch.full((batch.positions, V), -30.0).scatter_(1, batch.p_ids, batch.p_log)
        sharp = torch.full((batch.positions, V), -30.0).scatter_(1, batch.p_ids, batch.p_log / 0.05)
        return copy, sharp

    def kl(logits, batch, cfg):
        return compute_loss(logits, batch, cfg).kl

    floored = LossConfig(temperature_floor=0.05)
    copy, sharp = copy_and_sharp(greedy)
    # the logged target (temperature 1) prefers the copy ...
    assert kl(copy, greedy, LossConfig()) < 1e-3 < kl(sharp, greedy, LossConfig())
    # ... a greedy request verifies against the argmax: with a low floor the target is sharp too
    assert kl(sharp, greedy, floored) < 1e-3 < kl(copy, greedy, floored)
    # requests sampled at temperature 1 keep the logged target whatever the floor
    copy, sharp = copy_and_sharp(sampled)
    assert kl(copy, sampled, floored) < 1e-3 < kl(sharp, sampled, floored)


def test_loss_terms_vanish_when_q_equals_p():
    model = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=1)
    engine = SpeculativeEngine(model, HFDrafter(model, "same"), config=EngineConfig(k=4, feedback_topk=V))
    record = engine.generate([4, 5], SamplingParams(max_new_tokens=20, ignore_eos=True)).record
    batch = collate([record])
    cfg = LossConfig(kl=1, tv=1, chain=1, focal=1)
    with torch.no_grad():
        out = compute_loss(drafter_logits(model, batch), batch, cfg)
    assert out.kl < 1e-3 and out.prequential < 1e-3 and out.chain < 1e-2


def test_osd_positions_use_only_rejected_drafts():
    target = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=1)
    drafter = tiny_llama(layers=1, hidden=32, heads=2, vocab=V, seed=2)
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=3, feedback_topk=8))
    record = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=30, ignore_eos=True)).record
    batch = collate([record])
    out = compute_loss(drafter_logits(drafter, batch), batch, LossConfig(positions="rejected"))
    assert out.positions == int((record.drafted & ~record.accepted).sum()) > 0


def run_stream(config, rounds=400, seed=0):
    """Quadratic losses 0.5 ||x - c_t||^2 with a smoothly drifting centre."""
    opt = OnlineOptimizer({"x": torch.zeros(2)}, config)
    total = 0.0
    centres = []
    for t in range(rounds):
        c = torch.tensor([np.cos(t / 15), np.sin(t / 15)], dtype=torch.float32)
        centres.append(c)
        x = opt.play()["x"]
        total += 0.5 * float(((x - c) ** 2).sum())
        opt.step({"x": x - c})
    best_fixed = torch.stack(centres).mean(0)
    best = sum(0.5 * float(((best_fixed - c) ** 2).sum()) for c in centres)
    return total - best  # regret against the best fixed point in hindsight


def test_optimistic_ogd_has_lower_regret_with_good_hints():
    ogd = run_stream(OptimConfig(lr=0.3, hint="none"))
    oogd = run_stream(OptimConfig(lr=0.3, hint="last"))
    ema = run_stream(OptimConfig(lr=0.3, hint="ema", hint_decay=0.5))
    assert oogd < 0.5 * ogd, (oogd, ogd)
    assert ema < ogd


def test_adaptive_variant_keeps_its_state_across_rounds():
    opt = OnlineOptimizer({"x": torch.zeros(3)}, OptimConfig(lr=0.1, adaptive=True, hint="last"))
    opt.step({"x": torch.tensor([1.0, 2.0, 0.0])})
    tensors, rounds = opt.state_tensors(), opt.rounds
    again = OnlineOptimizer({"x": torch.zeros(3)}, OptimConfig(lr=0.1, adaptive=True, hint="last"))
    again.load_state_tensors(tensors, rounds)
    g = {"x": torch.tensor([0.5, -1.0, 1.0])}
    opt.step(g)
    again.step(g)
    assert torch.equal(opt.play()["x"], again.play()["x"])


def test_rmsprop_preconditioner_keeps_its_step_size_where_adagrad_shrinks():
    """With a constant gradient AdaGrad's t-th step is lr / sqrt(t); the averaged squares
    (sq_decay < 1, bias-corrected) keep every step at lr, so the learner still moves late in a
    long stream, after a shift."""
    moves = {}
    for decay in (1.0, 0.99):
        opt = OnlineOptimizer({"x": torch.zeros(1)}, OptimConfig(lr=0.1, adaptive=True, sq_decay=decay))
        steps = []
        for _ in range(100):
            before = opt.play()["x"].clone()
            opt.step({"x": torch.tensor([3.0])})
            steps.append(float((before - opt.play()["x"]).abs()))
        moves[decay] = steps
    assert moves[1.0][0] == pytest.approx(0.1) and moves[1.0][-1] == pytest.approx(0.01, rel=1e-3)
    assert all(m == pytest.approx(0.1, rel=1e-4) for m in moves[0.99])
    with pytest.raises(ValueError, match="sq_decay"):
        OptimConfig(sq_decay=0.0)


def test_discounted_hedge_switches_after_a_shift_where_plain_hedge_stays():
    """Expert 0 is best for 200 rounds, then expert 1. Plain Hedge carries the whole history
    and keeps expert 0 for about as long again; a discounted one follows within a few rounds."""
    losses = [[0.2, 0.6]] * 200 + [[0.6, 0.2]] * 10
    plain, discounted = Hedge(2, eta=4.0), Hedge(2, eta=4.0, discount=0.5)
    for ell in losses:
        plain.update(ell)
        discounted.update(ell)
    assert plain.weights[0] > 0.999
    assert discounted.weights[1] > 0.95  # steady state: exp(-eta * 0.4 / (1 - 0.5)) against 1
    again = Hedge.from_state(discounted.state())
    assert again.discount == 0.5 and np.allclose(again.weights, discounted.weights)
    with pytest.raises(ValueError, match="discount"):
        Hedge(2, discount=1.5)


@pytest.mark.parametrize("optimistic", [False, True])
def test_hedge_stays_finite_and_normalized_over_a_million_updates(optimistic):
    rng = np.random.default_rng(0)
    h = Hedge(n=5, eta=0.5, optimistic=optimistic)
    means = np.array([0.5, 0.45, 0.3, 0.6, 0.55])  # expert 2 is best
    losses = np.clip(means + rng.normal(0, 0.2, size=(1_000_000, 5)), 0, 1)
    for t in range(losses.shape[0]):
        h.update(losses[t])
        if t % 250_000 == 0:
            w = h.weights
            assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-9
    w = h.weights
    assert np.all(np.isfinite(h.log_weights)) and abs(w.sum() - 1) < 1e-9
    assert w.argmax() == 2 and w[2] > 0.999


def test_hedge_refuses_non_finite_losses():
    with pytest.raises(ValueError):
        Hedge(3).update([0.1, float("nan"), 0.2])


def test_the_shipped_learner_config_loads_and_unknown_keys_are_refused(tmp_path):
    from pathlib import Path

    from onlinespec.learn.learner import LearnerConfig

    root = Path(__file__).resolve().parents[1]
    config = LearnerConfig.from_yaml(root / "configs" / "learner.yaml")
    assert config.optim.hint == "none" and config.optim.sq_decay == 0.99 and config.loss.kl == 1.0
    assert LearnerConfig.from_dict(config.to_dict()) == config
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 0.1}\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        LearnerConfig.from_yaml(bad)
    with pytest.raises(ValueError):
        LearnerConfig.from_dict({"optim": {"hint": "future"}})
