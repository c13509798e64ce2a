"""Acceptance known without drafting, Hedge weights per traffic group, the drafter router, and the
draft-length controller's sources kept apart."""

import json

import numpy as np
import pytest
import torch

from onlinespec.decode.adaptive import SUFFIX, BatchK
from onlinespec.feedback.codec import decode, encode
from onlinespec.feedback.record import RecordBuilder
from onlinespec.learn.estimate import ALL, AcceptanceEstimate, group_of
from onlinespec.learn.learner import DrafterLearner, LearnerConfig
from onlinespec.learn.pool import DrafterPool
from onlinespec.decode.routing import DrafterRouter
from tests.tiny import perturbed, tiny_llama


def greedy_records(target, n: int, domain: str | None = None, tenant: str | None = None, seed: int = 0,
                   length: int = 24):
    """Records of the target's own greedy decoding (what serving logs), with top-32 log-probs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 128, (6,), generator=g).tolist()
        tokens = list(prompt)
        b = RecordBuilder(prompt=prompt, target_id="t", drafter_id="d", drafter_version=1,
                          sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 0}, tenant=tenant, domain=domain)
        with torch.no_grad():
            for _ in range(length):
                lp = torch.log_softmax(target(torch.tensor([tokens])).logits[0, -1], -1)
                top = lp.topk(32)
                b.add_block(top.indices[None].numpy().astype(np.int32), top.values[None].numpy().astype(np.float16),
                            [], 0, 1)
                tokens.append(int(top.indices[0]))
        out.append(b.build(tokens[len(prompt):]))
    return out


def test_group_of_prefers_the_declared_domain_and_drops_the_user():
    assert group_of("key:abc/user:bob") == "key:abc"
    assert group_of("key:abc/user:bob", "code") == "domain:code"
    assert group_of(None) is None and group_of(None, "x") == "domain:x"


def test_the_estimate_is_kept_per_group_with_enough_data_and_decays():
    est = AcceptanceEstimate(decay=0.9, min_positions=8)
    est.update(torch.ones(20), ["domain:a"] * 10 + [None] * 10)
    est.update(torch.zeros(4), ["domain:b"] * 4)
    d = est.to_dict()
    assert "domain:a" in d and "domain:b" not in d  # b has 4 positions: too little to report
    assert d["domain:a"]["acceptance"] == 1.0 and 0 < d[ALL]["acceptance"] < 1
    assert est.acceptance("domain:b") == est.acceptance() == pytest.approx(18 / 22)  # b falls back to all
    assert d["domain:a"]["positions"] == 9.0  # 10 positions, one round ago
    again = AcceptanceEstimate()
    again.load_state(json.loads(json.dumps(est.state())))
    assert again.to_dict()[ALL] == d[ALL]


def test_a_learners_published_estimate_is_the_served_drafters_acceptance_before_it_learned():
    target = tiny_llama(seed=0)
    records = greedy_records(target, 4, domain="code") + greedy_records(target, 4, seed=1)
    good = DrafterLearner(perturbed(target, 0.02), LearnerConfig(trainable="lm_head"))
    bad = DrafterLearner(tiny_llama(seed=5), LearnerConfig(trainable="lm_head"))
    g, b = good.round(records), bad.round(records)
    assert g.acceptance_estimate[ALL]["acceptance"] == pytest.approx(g.mean_alpha)  # one round: the prequential alpha
    assert g.acceptance_estimate[ALL]["acceptance"] > 0.8 > 0.2 > b.acceptance_estimate[ALL]["acceptance"]
    assert "domain:code" in g.acceptance_estimate and len(g.acceptance_estimate["by_position"]) == 1
    tensors, meta = good.state()
    again = DrafterLearner(perturbed(target, 0.02), LearnerConfig(trainable="lm_head"))
    again.load_state(tensors, json.loads(json.dumps(meta)))
    assert again.estimate.to_dict() == good.estimate.to_dict()


def test_the_pool_keeps_hedge_weights_per_domain():
    """Each of two drafters is the copy of one target: on each domain's records, the weights of
    that domain go to its own drafter, while the overall weights split."""
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    records = greedy_records(a, 3, domain="a") + greedy_records(b, 3, domain="b", seed=2)
    pool = DrafterPool(["A", "B"], eta=4.0, min_positions=32)
    for _ in range(3):
        result = pool.round({"A": a, "B": b}, records)
    w = result.group_weights
    assert w["domain:a"]["A"] > 0.9 and w["domain:b"]["B"] > 0.9
    assert 0.2 < result.weights[0] < 0.8
    kept = DrafterPool(["A", "B"], groups=json.loads(json.dumps(pool.group_state())), min_positions=32)
    for g, w in pool.group_weights().items():
        assert kept.group_weights()[g] == pytest.approx(w)


def test_the_router_draws_from_the_groups_weights_with_a_bounded_exploration_share():
    router = DrafterRouter(["A", "B"], explore=0.1, seed=0)
    assert router.probabilities() == {"A": 0.5, "B": 0.5}  # no weights yet: uniform
    router.update({"A": 0.5, "B": 0.5}, {"domain:x": {"A": 1.0, "B": 0.0}, "domain:y": {"A": 0.0, "B": 1.0}})
    assert router.probabilities("domain:x") == pytest.approx({"A": 0.95, "B": 0.05})
    picks = [router.pick("domain:y") for _ in range(2000)]
    assert 0.02 < picks.count("A") / len(picks) < 0.09  # only exploration sends y to A
    assert router.pick("domain:unknown") in ("A", "B")
    router.update({"A": 1.0, "B": 0.0, "gone": 3.0}, None)
    assert router.heaviest() == "A"


def test_the_controller_keeps_copies_and_a_drafters_own_drafts_apart():
    ctl = BatchK(thompson=False)
    # copy, copy, own (rejected): the suffix is credited 2, the drafter charged the rejection
    ctl.observe_row("d", [True, True, False, False], 2)
    ctl.observe_step(1, 4, 0.001, 0.01)
    assert ctl.proposer(SUFFIX).accepted > ctl.proposer(SUFFIX).rejected
    before = ctl.proposer("d").accepted
    ctl.observe_row("d", [False, True], 0)  # own rejected first: the copy after it was never judged
    ctl.observe_step(1, 2, 0.001, 0.01)
    assert ctl.proposer("d").accepted < before + 1e-9
    ctl.start_version("d", 0.9)
    assert ctl.proposer("d").acceptance == pytest.approx(0.9)
    ctl.start_version("d", None)  # a version without an estimate: the uninformed prior
    assert ctl.proposer("d").acceptance == pytest.approx(0.6)


def _serve_blocks(ctl: BatchK, key: str, accepted: int, steps: int = 60, k: int = 3) -> None:
    for _ in range(steps):
        ctl.observe_row(key, [False] * k, accepted)
        ctl.observe_step(1, k, 0.001, 0.01)


def test_a_later_version_keeps_what_the_served_drafts_showed_moved_by_the_learners_change():
    """The learners' level is not what served blocks meet (they score the first position of the
    true text); their change between versions is carried: a later version starts where the
    served drafts left its predecessor, moved by that change; a rollback starts afresh."""
    ctl = BatchK(thompson=False)
    ctl.start_version("d", 0.6)  # v1, published with 0.6
    _serve_blocks(ctl, "d", accepted=1)  # its blocks: one draft kept, then a rejection
    served = ctl.proposer("d").acceptance
    assert served == pytest.approx(0.5, abs=0.02)
    rows = ctl.rows_key("d")
    assert rows in ctl.lengths
    ctl.start_version("d", 0.65, previous=0.6)  # v2: the learners measured +0.05
    p = ctl.proposer("d")
    assert p.acceptance == pytest.approx(served + 0.05)
    assert p.accepted + p.rejected == pytest.approx(ctl.prior_weight)  # no surer than a published estimate
    assert rows in ctl.lengths  # its blocks' lengths carry over too
    ctl.start_version("d", 0.3)  # a rollback (no predecessor given): from the estimate alone
    assert ctl.proposer("d").acceptance == pytest.approx(0.3) and rows not in ctl.lengths
    fresh = BatchK(thompson=False)  # a drafter this controller never served: from the estimate
    fresh.start_version("e", 0.65, previous=0.6)
    assert fresh.proposer("e").acceptance == pytest.approx(0.65)


def test_a_muted_drafter_is_drafting_again_once_its_learners_measured_enough_gain():
    """A drafter whose served drafts were rejected is muted and its later drafts never seen:
    versions the learners found no better keep it muted (restarting each from the learners'
    level, 0.5, drafted them again at every swap), a measured gain brings it back."""
    ctl = BatchK(thompson=False)
    costs = ctl.at(1)
    costs.t_plain, costs.t_draft = 0.010, 0.001
    ctl.start_version("d", 0.5)
    _serve_blocks(ctl, "d", accepted=0)
    assert not ctl.drafts_pay("d", 3, 1)
    for version in range(5):  # five versions, estimated alike
        ctl.start_version("d", 0.5, previous=0.5)
        assert not ctl.drafts_pay("d", 3, 1), version
    # the learners' estimate rises by 0.4 over five versions
    for previous, estimate in zip((0.5, 0.55, 0.6, 0.7, 0.8), (0.55, 0.6, 0.7, 0.8, 0.9)):
        ctl.start_version("d", estimate, previous)
    assert ctl.proposer("d").acceptance > 0.4
    assert ctl.drafts_pay("d", 3, 1)


def test_a_drafter_whose_drafts_do_not_pay_is_muted_while_a_good_one_drafts():
    ctl = BatchK(thompson=False)
    costs = ctl.at(4)
    costs.t_plain, costs.t_draft = 0.010, 0.002  # a drafted position costs a fifth of a step
    ctl.start_version("good", 0.8)
    ctl.start_version("bad", 0.05)
    ctl.choose(["good", "bad"], batch=4)
    assert ctl.drafts_pay("good", 4, 4) and not ctl.drafts_pay("bad", 4, 4)


def test_a_muted_drafters_rows_size_their_blocks_as_copy_blocks():
    """On edit prompts a weak drafter used to shorten every block of its rows, copies included
    (0.99x against 1.85x for suffix speculation alone): muted, its rows are sized by what
    copy-only blocks yield."""
    ctl = BatchK(thompson=False)
    for _ in range(40):
        ctl.observe_row("bad", [False, False], 0)  # its own blocks: rejected at once
        ctl.observe_row(None, [True] * 6, 6, asked=6)  # copy-only blocks (a muted row): all accepted
        ctl.observe_step(1, 2, 0.002, 0.012)
        ctl.observe_step(1, 0, 0.0, 0.010)
    k_mixed = ctl.choose(["bad"], batch=1)
    k_copies = ctl.rechoose([None], batch=1)
    assert k_mixed <= 1 and k_copies >= 4


def test_records_keep_their_domain_on_the_wire():
    target = tiny_llama(seed=0)
    record = greedy_records(target, 1, domain="code", length=3)[0]
    assert decode(encode(record)).domain == "code"
    assert decode(encode(greedy_records(target, 1, length=3)[0])).domain is None
