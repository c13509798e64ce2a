"""A reduced head's unexpanded logits (onlinespec.drafters.logits) read exactly as its full-vocabulary
ones: the learners' log-probabilities, argmax, losses and gradients are the same from either."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from onlinespec.drafters.cut import ReducedHead
from onlinespec.drafters.logits import argmax, dense, log_softmax_at
from onlinespec.feedback.record import FeedbackRecord
from onlinespec.learn.batch import collate
from onlinespec.learn.losses import LossConfig, acceptance, compute_loss

V, H = 40, 8


def head(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = ReducedHead(torch.randn(len(ids), H, generator=g), torch.tensor(ids), V, rest=-1.0)
    with torch.no_grad():
        out.bias.copy_(torch.randn(len(ids), generator=g) * 0.5)
    return out


SHUFFLED = [31, 3, 17, 0, 22, 9, 38, 5, 12, 27]  # not in id order; 1 is the lowest id outside


def test_log_probabilities_at_any_ids_are_the_full_softmaxs():
    h = head(SHUFFLED)
    hidden = torch.randn(6, H, generator=torch.Generator().manual_seed(1))
    compact, full = h.compact(hidden), h(hidden)
    assert torch.equal(compact.dense(), full)
    ids = torch.tensor([[31, 1, 39, 0], [3, 2, 17, 38], [5, 5, 6, 7], [0, 1, 2, 3], [39, 38, 37, 36], [9, 12, 27, 22]])
    t = torch.tensor([1.0, 0.5, 0.25, 2.0, 1.0, 0.1])
    torch.testing.assert_close(log_softmax_at(compact, ids), torch.log_softmax(full, -1).gather(1, ids))
    torch.testing.assert_close(log_softmax_at(compact, ids, t),
                               torch.log_softmax(full / t[:, None], -1).gather(1, ids))
    # the dense form reads the same through the same functions
    torch.testing.assert_close(log_softmax_at(full, ids, t), log_softmax_at(compact, ids, t))
    assert dense(full) is full


def test_argmax_is_the_full_argmax_ties_included():
    h = head(SHUFFLED)
    small = torch.tensor([
        [0.0] * 10,                                   # all tie, rest below: the lowest id (0)
        [2.0, 2.0, 0, 0, 0, 0, 0, 0, 0, 0],           # ids 31 and 3 tie: 3
        [-3.0] * 10,                                  # rest (-1) above all: the lowest rest id, 1
        [-1.0, 0, 0.5, 0, 0, 0, 0, 0, 0, 0],          # one maximum, id 17
        [-1.0] + [-2.0] * 9,                          # rest ties with id 31: 1 < 31, rest wins
        [-2.0, -2.0, -2.0, -1.0] + [-2.0] * 6,        # rest ties with id 0: 0 < 1, id 0 wins
    ])
    with torch.no_grad():
        compact = replace(h.compact(torch.zeros(len(small), H)), small=small)
    want = compact.dense().argmax(-1)
    assert want.tolist() == [0, 3, 1, 17, 1, 0]
    assert torch.equal(argmax(compact), want)
    everything = head(list(range(V))[::-1])  # a head over the whole vocabulary: no rest token
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(2))
    assert everything.first_rest == V
    assert torch.equal(argmax(everything.compact(hidden)), everything(hidden).argmax(-1))


def _records(n, g=12, k=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tokens = rng.integers(0, V, 5 + g).astype(np.int32)
        logp = np.sort(rng.dirichlet(np.ones(V), g), -1)[:, ::-1][:, :k]
        ids = np.stack([rng.permutation(V)[:k] for _ in range(g)]).astype(np.int32)
        drafted = rng.random(g) < 0.7
        out.append(FeedbackRecord(
            request_id=f"r{i}", target_id="t", drafter_id="d", drafter_version=1, created=0.0,
            temperature=[0.0, 0.7, 1.0][i % 3], top_p=1.0, top_k=0, tokens=tokens, prompt_len=5,
            topk_ids=ids, topk_logprobs=np.log(logp).astype(np.float16), drafted=drafted,
            accepted=drafted & (rng.random(g) < 0.5), block_index=np.zeros(g, np.int16),
            draft_tokens=np.where(drafted, ids[:, 0], -1).astype(np.int32)))
    return out


@pytest.mark.parametrize("cfg", [LossConfig(), LossConfig(kl=0.5, tv=1.0, chain=0.5, focal=0.5, temperature_floor=0.5)],
                         ids=["kl", "every-term"])
def test_losses_and_gradients_are_the_dense_ones(cfg):
    batch = collate(_records(4))
    h = head(SHUFFLED)
    hidden = torch.randn(batch.positions, H, generator=torch.Generator().manual_seed(3), requires_grad=True)
    outs = []
    for form in ("compact", "dense"):
        logits = h.compact(hidden) if form == "compact" else h(hidden)
        out = compute_loss(logits, batch, cfg)
        grads = torch.autograd.grad(out.total, [hidden, h.bias, h.rest])
        outs.append((out, grads, acceptance(logits, batch)))
    (a, ga, acc_a), (b, gb, acc_b) = outs
    torch.testing.assert_close(a.total, b.total)
    assert (a.kl, a.prequential, a.chain, a.focal) == pytest.approx((b.kl, b.prequential, b.chain, b.focal), rel=1e-5)
    for x, y in zip(ga, gb):
        assert float(y.abs().max()) > 0
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(acc_a, acc_b)
    assert 0 < float(acc_a.mean()) < 1
