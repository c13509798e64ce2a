"""Cut drafters (onlinespec.drafters.cut): a target's first layers, its frozen embedding and a
reduced head. They load, publish and swap like any drafter, store only what they train, keep the
output exactly the target's, and learn."""

import numpy as np
import pytest
import torch

from onlinespec.drafters.cut import CutDrafter, cut_from
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.learn.learner import DrafterLearner, LearnerConfig
from onlinespec.learn.optim import OptimConfig
from onlinespec.models import load_model
from onlinespec.decode.sampling import SamplingParams
from tests.tiny import tiny_llama

V = 96
HEAD = list(range(0, 80))  # the head scores ids 0..79; 80..95 share the rest logit


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    target = tiny_llama(layers=3, hidden=48, heads=4, vocab=V, seed=21)
    path = tmp_path_factory.mktemp("cut") / "target"
    target.save_pretrained(str(path))
    return target, str(path)


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 48, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_a_cut_drafter_is_the_targets_first_layers_with_a_reduced_head(saved_target):
    target, path = saved_target
    drafter = cut_from(target, path, 1, HEAD)
    # what it stores is what it trains: no embedding, no head rows
    stored = drafter.state_dict()
    assert not any("embed_tokens" in k or k in ("lm_head.rows", "lm_head.ids") for k in stored)
    assert set(stored) == {n for n, _ in drafter.named_parameters()}
    assert {k for k in stored if k.startswith("model.layers.")} == {f"model.layers.0.{k}" for k in
                                                                     target.model.layers[0].state_dict()}
    ids = torch.tensor([prompts(1, 0)[0]])
    with torch.no_grad():
        logits = drafter(ids).logits
        # its head rows are the target's head rows; every other token gets the one `rest` logit
        hidden = drafter.model(ids).last_hidden_state
        assert torch.allclose(logits[..., :80], hidden @ target.lm_head.weight[:80].t(), atol=1e-5)
    assert logits.shape == (1, ids.shape[1], V)
    assert torch.all(logits[..., 80:] == drafter.lm_head.rest)
    # its layer and norm compute what the target's first layer and final norm do
    with torch.no_grad():
        want = target.model.norm(target.model(ids, output_hidden_states=True).hidden_states[1])
        got = drafter.model(ids).last_hidden_state
    assert torch.allclose(want, got, atol=1e-5)


def test_saved_and_loaded_through_the_users_path(saved_target, tmp_path):
    target, path = saved_target
    drafter = cut_from(target, path, 2, HEAD)
    with torch.no_grad():
        drafter.lm_head.bias.add_(torch.linspace(-1, 1, 80))
    drafter.save_pretrained(str(tmp_path / "d"))
    loaded = load_model(str(tmp_path / "d"))
    assert isinstance(loaded, CutDrafter)
    ids = torch.tensor([[3, 4, 5, 85, 90]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, drafter(ids).logits)
    # a drafter whose target's embedding does not fit is refused with the reason
    other = tiny_llama(layers=1, hidden=32, heads=4, vocab=V, seed=1)
    other.save_pretrained(str(tmp_path / "other"))
    config = loaded.config
    config.target = str(tmp_path / "other")
    with pytest.raises(Exception, match="embedding of shape"):
        CutDrafter(config)


def test_publish_and_swap_keep_only_the_trained_weights(saved_target, tmp_path, redis_client):
    from onlinespec.learn.registry import Registry
    target, path = saved_target
    drafter = cut_from(target, path, 1, HEAD)
    registry = Registry(tmp_path / "registry", redis_client)
    name = f"cut-{np.random.default_rng().integers(1 << 30)}"
    registry.bootstrap(name, drafter, base=str(tmp_path))
    with torch.no_grad():
        drafter.model.layers[0].mlp.up_proj.weight.mul_(1.1)
    version = registry.publish(name, drafter, parent=registry.latest(name)).version
    model, _ = registry.load_model(name, version)
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, drafter(ids).logits)
    stored = (registry.path(name, version) / "model.safetensors").stat().st_size
    params = sum(p.numel() for p in drafter.parameters())
    assert stored < 4 * params + 4096  # the trained parameters, nothing of the target's


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_output_is_the_targets_own(saved_target, k):
    target, path = saved_target
    engine = SpeculativeEngine(target, HFDrafter(cut_from(target, path, 2, HEAD), "cut"), config=EngineConfig(k=k))
    drafted = 0
    for prompt in prompts(8, seed=k):
        result = engine.generate(prompt, SamplingParams(max_new_tokens=32))
        assert result.tokens == hf_greedy(target, prompt, 32)
        drafted += result.stats.drafted
    assert drafted > 0


def test_learning_raises_the_cut_drafters_acceptance(saved_target):
    target, path = saved_target
    drafter = cut_from(target, path, 2, HEAD)
    torch.manual_seed(5)
    with torch.no_grad():  # an untrained start: the cut layers with noise (a cut of a random target drafts well)
        for p in drafter.model.layers.parameters():
            p.add_(torch.randn_like(p) * p.std())

    def records(model, n, seed):
        engine = SpeculativeEngine(target, HFDrafter(model, "cut"), config=EngineConfig(k=4, feedback_topk=16))
        g = torch.Generator().manual_seed(seed)
        return [engine.generate(torch.randint(1, 48, (6,), generator=g).tolist(),
                                SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed * 100 + i,
                                               ignore_eos=True)).record for i in range(n)]

    learner = DrafterLearner(drafter, LearnerConfig(optim=OptimConfig(lr=0.1, adaptive=True)))
    heldout = records(drafter, 6, seed=99)
    before = learner.evaluate(heldout)["mean_alpha"]
    for r in range(12):
        learner.round(records(learner.served_model(), 6, seed=r))
    after = learner.evaluate(heldout)["mean_alpha"]
    assert after > before + 0.03, (before, after)  # measured: 0.49 -> 0.55
    # what it learnt includes the logit of the tokens outside its head
    assert float(learner.served_model().lm_head.rest) != -10.0
