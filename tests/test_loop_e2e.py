"""The whole learning loop through real components: engine -> Redis Stream -> RQ worker process
-> registry -> hot swap, and the fault cases (malformed feedback, a worker dying mid-round)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from onlinespec.feedback import keys
from onlinespec.feedback.codec import encode
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from serving.hotswap import SwapWatcher
from onlinespec.learn.learner import LearnerConfig
from onlinespec.learn.optim import OptimConfig
from onlinespec.learn.registry import Registry
from onlinespec.decode.sampling import SamplingParams
from onlinespec.feedback.stream import FeedbackReader, FeedbackWriter
from onlinespec.learn.round import Updater
from tests.tiny import perturbed, tiny_llama

V = 64
TARGET = "tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def domain_prompts(n, seed):
    """One 'domain': prompts drawn from the low token ids."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 16, (6,), generator=g).tolist() for _ in range(n)]


def mean_accepted_length(target, drafter_model, prompts):
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "eval"), config=EngineConfig(k=4, capture_feedback=False))
    accepted = steps = 0
    for p in prompts:
        stats = engine.generate(p, SamplingParams(max_new_tokens=32, ignore_eos=True)).stats
        accepted += stats.accepted
        steps += stats.spec_steps
    return (accepted + steps) / steps


def start_worker(redis_url, registry_root, round_records=8):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--redis-url", redis_url, "--registry", str(registry_root),
         "--target", TARGET, "--round-records", str(round_records), "--period", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture()
def setup(tmp_path, redis_client):
    target = tiny_llama(layers=2, hidden=48, heads=4, vocab=V, seed=7)
    registry = Registry(tmp_path / "registry", redis_client)
    # The drafter shares the target's body but has a noisy output head: a start with room to
    # learn, and a convex problem for the head, so a few rounds show a clear gain.
    base = copy.deepcopy(target)
    torch.manual_seed(3)
    with torch.no_grad():
        base.lm_head.weight.add_(torch.randn_like(base.lm_head.weight) * 1.5 * base.lm_head.weight.std())
    learned = LearnerConfig(optim=OptimConfig(lr=0.05, hint="last", adaptive=True, max_grad_norm=1.0),
                            trainable="lm_head", steps_per_round=2)
    frozen = LearnerConfig(optim=OptimConfig(lr=0.0), trainable="lm_head")  # a learner that does nothing
    for name, config in (("learned", learned), ("frozen", frozen)):
        registry.bootstrap(name, base)
        redis_client.sadd(keys.drafters_set(TARGET), name)
        redis_client.set(keys.learner_config(name), json.dumps(config.to_dict()))
    return target, registry


@pytest.mark.slow
def test_learning_loop_raises_accepted_length_end_to_end(setup, redis_client, redis_url):
    target, registry = setup
    served = HFDrafter(registry.load_model("learned", 1)[0], "learned", version=1)
    engine = SpeculativeEngine(target, served, config=EngineConfig(k=4, feedback_topk=16, target_id=TARGET))
    writer = FeedbackWriter(redis_client, TARGET, batch=8, flush_seconds=0.01)
    watcher = SwapWatcher(redis_client, registry, {"learned": served}, poll_seconds=0.2, rollback=False).start()
    heldout = domain_prompts(8, seed=999)
    before = mean_accepted_length(target, served.model, heldout)
    worker = start_worker(redis_url, registry.root)
    swaps, versions_seen = 0, set()
    try:
        deadline = time.time() + 150
        seed = 0
        while time.time() < deadline and served.version < 14:
            for prompt in domain_prompts(8, seed=seed):
                gen = engine.start(prompt, SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, ignore_eos=True))
                while not gen.finished:
                    out = gen.step()
                    watcher.observe("learned", served.version, out.drafted, out.accepted)
                    swaps += len(watcher.apply())  # between steps, as the server's engine loop does
                writer.submit(gen.record())
                versions_seen.add(gen.record().drafter_version)
                seed += 1
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            log, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            log, _ = worker.communicate()
        watcher.stop()
        writer.close()
    assert served.version >= 10, f"few versions were swapped in (v{served.version});\nworker log:\n{log[-3000:]}"
    assert swaps >= 4 and len(versions_seen) >= 3  # records carry the version that served them
    assert writer.stats.dropped == 0
    after = mean_accepted_length(target, served.model, heldout)
    frozen_latest = registry.latest("frozen")
    assert frozen_latest > 1  # the do-nothing learner ran rounds on the same stream too...
    frozen_after = mean_accepted_length(target, registry.load_model("frozen", frozen_latest)[0], heldout)
    assert abs(frozen_after - before) < 0.05  # ...and, as expected, gained nothing
    assert after > before + 0.3, (before, after)
    # prequential metrics were published for monitoring
    latest = json.loads(redis_client.hget(keys.learner_latest("learned"), "metrics"))
    assert latest["version"] == registry.latest("learned") and 0 <= latest["served_loss"] <= 1
    assert 0 < latest["lag_seconds"] < 150  # how long its oldest record waited for it: within the run


def _submit_records(target, drafter_model, client, n, seed=0):
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "learned", version=1),
                               config=EngineConfig(k=4, feedback_topk=16, target_id=TARGET))
    pipe = client.pipeline()
    for prompt in domain_prompts(n, seed=seed):
        rec = engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)).record
        pipe.xadd(keys.feedback_stream(TARGET), {"r": encode(rec)})
    pipe.execute()


def test_malformed_feedback_goes_to_the_dead_letter_stream(setup, redis_client):
    target, registry = setup
    _submit_records(target, registry.load_model("learned", 1)[0], redis_client, 3)
    stream = keys.feedback_stream(TARGET)
    redis_client.xadd(stream, {"r": b"\x93not msgpack"})
    redis_client.xadd(stream, {"x": b"no r field"})
    updater = Updater(redis_client, registry, TARGET, consumer="w1", round_records=10)
    result = updater.run_round("learned")
    assert result.status == "published" and result.records == 3 and result.dead == 2
    dead = redis_client.xrange(keys.dead_letter_stream(TARGET))
    assert len(dead) == 2 and all(d[1][b"reason"] for d in dead)
    assert dead[0][1][b"payload"] == b"\x93not msgpack"  # kept aside as it came
    pending = redis_client.xpending(stream, keys.learner_group("learned"))
    assert pending["pending"] == 0  # good ones acknowledged after publish, bad ones put aside


def test_a_drafter_learning_only_what_it_served_skips_the_others_records(setup, redis_client):
    """learn_from=served: records served by another drafter are acknowledged without a new
    version; its own records are learned from as usual."""
    target, registry = setup
    config = LearnerConfig.from_dict({**json.loads(redis_client.get(keys.learner_config("frozen"))),
                                      "learn_from": "served"})
    redis_client.set(keys.learner_config("frozen"), json.dumps(config.to_dict()))
    _submit_records(target, registry.load_model("learned", 1)[0], redis_client, 4)  # served by "learned"
    updater = Updater(redis_client, registry, TARGET, consumer="w1", round_records=10)
    result = updater.run_round("frozen")
    assert result.status == "skipped" and result.records == 4
    assert registry.latest("frozen") == 1
    assert redis_client.xpending(keys.feedback_stream(TARGET), keys.learner_group("frozen"))["pending"] == 0
    assert updater.run_round("learned").status == "published"  # learn_from=all: learns from them


def test_worker_dying_mid_round_publishes_nothing_and_records_are_redelivered(setup, redis_client, monkeypatch):
    target, registry = setup
    _submit_records(target, registry.load_model("learned", 1)[0], redis_client, 4)
    dying = Updater(redis_client, registry, TARGET, consumer="dying", round_records=10)
    real_publish = Registry.publish

    def crash_while_writing(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing the version")  # not an Exception: like a kill

    monkeypatch.setattr(Registry, "publish", crash_while_writing)
    with pytest.raises(KeyboardInterrupt):
        dying.run_round("learned")
    monkeypatch.setattr(Registry, "publish", real_publish)
    assert registry.latest("learned") == 1 and registry.versions("learned") == [1]
    assert not [p for p in (registry.root / "learned").iterdir() if p.name.startswith(".")]
    stream, group = keys.feedback_stream(TARGET), keys.learner_group("learned")
    assert redis_client.xpending(stream, group)["pending"] == 4  # delivered, not acknowledged
    # another worker reclaims them once the dead consumer has been idle long enough
    time.sleep(0.05)
    survivor = Updater(redis_client, registry, TARGET, consumer="survivor", round_records=10, min_idle_ms=10)
    result = survivor.run_round("learned")
    assert result.status == "published" and result.records == 4 and result.version == 2
    assert redis_client.xpending(stream, group)["pending"] == 0
    manifest = registry.manifest("learned", 2)
    assert manifest.parent == 1 and manifest.watermark is not None


def test_refused_version_keeps_the_old_one_serving(setup, redis_client):
    target, registry = setup
    served = HFDrafter(registry.load_model("learned", 1)[0], "learned", version=1)
    watcher = SwapWatcher(redis_client, registry, {"learned": served}, rollback=False)
    broken = perturbed(target, 0.8, seed=8)
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    registry.publish("learned", broken, parent=1)
    assert not watcher.check("learned")
    assert watcher.apply() == [] and served.version == 1
    assert watcher.stats.refusals == 1 and "non-finite" in watcher.stats.last_refusal
    events = [e[1] for e in redis_client.xrange(keys.events_stream)]
    assert events[-1][b"type"] == b"refused"


def test_a_damaged_latest_version_is_repaired_by_the_worker(setup, redis_client):
    """The latest version's files are damaged after it was published: the next round goes back to
    the newest version that loads (a rollback event says why) and learns on from there."""
    target, registry = setup
    updater = Updater(redis_client, registry, TARGET, consumer="w1", round_records=10)
    _submit_records(target, registry.load_model("learned", 1)[0], redis_client, 4)
    assert updater.run_round("learned").version == 2
    weights = registry.path("learned", 2) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # a disk fault: the file is cut short
    fresh = Updater(redis_client, registry, TARGET, consumer="w2", round_records=10)  # no learner cached
    _submit_records(target, registry.load_model("learned", 1)[0], redis_client, 4, seed=1)
    result = fresh.run_round("learned")
    assert result.status == "published" and result.parent == 1 and result.records == 4
    assert registry.latest("learned") == result.version and registry.manifest("learned", result.version).parent == 1
    rollback = [e[1] for e in redis_client.xrange(keys.events_stream) if e[1][b"type"] == b"rollback"]
    assert rollback and b"latest unloadable" in rollback[-1][b"reason"] and rollback[-1][b"from"] == b"2"


def test_startup_survives_a_registry_lost_beside_a_redis_that_kept_its_pointer(setup, redis_client):
    """Redis points at versions whose files are gone (the registry volume was reset): bootstrap
    goes back to the newest version that still loads, or registers the base model again."""
    import shutil

    target, registry = setup
    base = registry.load_model("frozen", 1)[0]
    parent = 1
    for _ in range(2):
        parent = registry.publish("frozen", base, parent=parent).version
    shutil.rmtree(registry.path("frozen", 3))
    assert registry.bootstrap("frozen", base) == 2 and registry.latest("frozen") == 2
    shutil.rmtree(registry.root / "frozen")  # every version gone
    version = registry.bootstrap("frozen", base)
    assert version == 4 and registry.latest("frozen") == 4  # numbers never reused
    model, manifest = registry.load_model("frozen", 4)
    assert manifest.parent == 2 and "base model" in manifest.note
    for a, b in zip(base.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_regressing_version_is_rolled_back(setup, redis_client):
    target, registry = setup
    served = HFDrafter(registry.load_model("learned", 1)[0], "learned", version=1)
    watcher = SwapWatcher(redis_client, registry, {"learned": served}, min_drafted=100, margin=0.05)
    watcher.observe("learned", 1, 200, 150)  # v1 accepted 75%
    watcher.estimates["learned"] = {"all": {"acceptance": 0.7}}  # as the server starts: v1's estimate
    registry.publish("learned", perturbed(target, 2.0, seed=3), parent=1,
                     metrics={"acceptance_estimate": {"all": {"acceptance": 0.72, "positions": 300}}})
    assert watcher.check("learned") and watcher.apply() == [("learned", 2)]
    # a later version: the controller moves what v1's drafts showed by the learners' change
    assert watcher.acceptance("learned") == (0.72, 0.7)
    watcher.observe("learned", 2, 200, 60)  # v2 accepts 30%: a regression
    assert registry.latest("learned") == 2  # the engine thread only counts
    assert watcher.judge() == [("learned", 2)]  # the watcher thread judges the sums in Redis
    assert watcher.stats.rollbacks == 1 and registry.latest("learned") == 1
    assert watcher.check("learned") and watcher.apply() == [("learned", 1)]
    assert served.version == 1
    assert watcher.acceptance("learned")[1] is None  # a rollback: nothing carried from the version that hurt


def test_pool_weights_move_to_the_drafter_that_fits_the_traffic(setup, redis_client):
    target, registry = setup
    # "good" is the target itself (every draft accepted); "learned" and "frozen" are noisy heads.
    registry.bootstrap("good", target)
    redis_client.sadd(keys.drafters_set(TARGET), "good")
    _submit_records(target, registry.load_model("learned", 1)[0], redis_client, 12)  # served by "learned"
    from onlinespec.learn.round import PoolUpdater

    pool = PoolUpdater(redis_client, registry, TARGET, consumer="w", round_records=4, discount=0.5)
    for _ in range(3):
        assert pool.run_round().status == "published"
    assert json.loads(redis_client.hget(keys.pool_key(TARGET), "state"))["hedge"]["discount"] == 0.5
    weights = json.loads(redis_client.hget(keys.pool_key(TARGET), "weights"))
    losses = json.loads(redis_client.hget(keys.pool_key(TARGET), "losses"))
    assert redis_client.hget(keys.pool_key(TARGET), "serving") == b"good"
    assert losses["good"] < 1e-3 < losses["learned"]  # scored on records it never served
    assert weights["good"] > 0.9
