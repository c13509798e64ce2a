"""Feature drafters (onlinespec.drafters.feature, EAGLE-style): one layer reading the target's own
hidden states. They store only what they train, draft in a batch exactly what they draft alone
from the target's true features, keep the output exactly the target's, load through the user's
path and the registry's, and their training-time unrolling is what drafting sees."""

import json

import numpy as np
import pytest
import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import SuffixCache, SuffixConfig
from onlinespec.drafters.feature import FeatureDrafter, feature_from, unrolled_logits
from onlinespec.drafters.hf import HFDrafter
from onlinespec.models import load_model
from tests.test_batch import drive
from tests.tiny import tiny_llama

V = 96
HEAD = list(range(0, 80))


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    target = tiny_llama(layers=3, hidden=48, heads=4, vocab=V, seed=21)
    path = tmp_path_factory.mktemp("feature") / "target"
    target.save_pretrained(str(path))
    return target, str(path)


@pytest.fixture(scope="module")
def drafter(saved_target):
    target, path = saved_target
    model = feature_from(target, path, HEAD)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # not the target's last layer: drafts that are sometimes right, sometimes not
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * (p.std() if p.numel() > 1 else 1))
    return model


def prompts(n, seed, low=3, high=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 48, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def features_of(target, tokens: list[int]) -> torch.Tensor:
    """The target's last hidden state at every position of ``tokens`` (one forward, no cache)."""
    return target.model(torch.tensor([tokens])).last_hidden_state[0]


@torch.no_grad()
def draft_alone(target, drafter, text: list[int], before: list[int]) -> int:
    """The drafter's next draft after the settled ``text`` and the drafts ``before`` (its own or
    copied), by the definition: pairs (h_i, x_{i+1}) with the target's features up to the last
    settled token, then each draft paired with the drafter's own output feature of the pair
    before it; recomputed from scratch."""
    h = features_of(target, text)[:-1]  # h_0 .. h_{n-1}
    ids, feats = list(text[1:]), list(h)
    for token in [*before, None]:
        res = drafter(torch.tensor([ids]), features=torch.stack(feats)[None])
        if token is None:
            return int(res.logits[0, -1].argmax())
        ids.append(token)
        feats.append(res.hidden_states[-1][0, -1])


def test_a_feature_drafter_stores_only_what_it_trains(saved_target, drafter):
    target, _ = saved_target
    stored = drafter.state_dict()
    assert set(stored) == {n for n, _ in drafter.named_parameters()}
    assert not any("embed_tokens" in k or k in ("lm_head.rows", "lm_head.ids") for k in stored)
    assert "fc.weight" in stored and stored["fc.weight"].shape == (48, 96)
    assert {k for k in stored if k.startswith("model.layers.")} == {f"model.layers.0.{k}" for k in
                                                                     target.model.layers[0].state_dict()}
    with pytest.raises(ValueError, match="features"):
        drafter(torch.tensor([[1, 2, 3]]))


def test_the_unrolled_training_forward_is_what_drafting_computes(saved_target, drafter):
    """Level 0 of the training-time unrolling is the teacher-forced forward; level 1 at pair i is
    the drafter's second draft after a text ending at token i: its own feature of pair i - 1."""
    target, _ = saved_target
    text = prompts(1, 4, low=14, high=15)[0]
    h = features_of(target, text)
    ids, feats = torch.tensor([text[1:]]), h[:-1][None]  # pairs (h_i, x_{i+1}), i = 0 .. n-1
    with torch.no_grad():
        levels = unrolled_logits(drafter, ids, feats, levels=3)
        plain = drafter(ids, features=feats)
    assert torch.allclose(levels[0][0], plain.logits, atol=1e-5)
    for i in (3, 8, 12):
        for depth in (1, 2):  # the depth-th draft after the text x_0 .. x_{i - depth + 1}
            end = i - depth + 1  # the last settled pair
            with torch.no_grad():
                pid, pf = list(text[1:end + 1]), list(h[:end])
                for _ in range(depth):
                    res = drafter(torch.tensor([pid]), features=torch.stack(pf)[None])
                    pf.append(res.hidden_states[-1][0, -1])
                    pid.append(text[len(pid) + 1])  # training pairs carry the true token
                res = drafter(torch.tensor([pid]), features=torch.stack(pf)[None])
            assert torch.allclose(levels[depth][0][0, i], res.logits[0, -1], atol=1e-4), (i, depth)


def captured_records(target):
    """(records, their captured features): three records of different lengths whose captures
    start at different tokens, each generated position's target top-K made up."""
    from onlinespec.feedback.codec import CapturedFeatures
    from onlinespec.feedback.record import FeedbackRecord

    records, captures = [], []
    for i, (text, p, start) in enumerate(zip(prompts(3, 9, low=10, high=26), (6, 4, 9), (2, 0, 7))):
        g = len(text) - p
        records.append(FeedbackRecord(
            request_id=f"r{i}", target_id="t", drafter_id="d", drafter_version=1, created=0.0, temperature=0.0,
            top_p=1.0, top_k=0, tokens=np.asarray(text, np.int32), prompt_len=p,
            topk_ids=np.tile(np.arange(4, dtype=np.int32), (g, 1)), topk_logprobs=np.full((g, 4), -2.0, np.float16),
            drafted=np.zeros(g, bool), accepted=np.zeros(g, bool), block_index=np.zeros(g, np.int16),
            draft_tokens=np.full(g, -1, np.int32)))
        captures.append(CapturedFeatures(start, features_of(target, text)[start:len(text) - 2].numpy()))
    return records, captures


def test_the_learners_logits_are_the_unrolled_ones_at_the_scored_positions(saved_target, drafter):
    """A learning round scores a feature drafter through one unrolled pass with the head only at
    its records' generated positions (``feature_logits``): level 0 is the teacher-forced forward
    (``drafter_logits``), level 1 the unrolled second draft, row for row, over records of different
    lengths whose captures start at different tokens."""
    from onlinespec.learn.batch import collate
    from onlinespec.drafters.logits import dense
    from onlinespec.learn.forward import drafter_logits, feature_logits

    target, _ = saved_target
    records, captures = captured_records(target)
    batch = collate(records, features=captures)
    with torch.no_grad():
        (first, every), (second, valid) = feature_logits(drafter, batch, levels=2)
        first, second, plain = (dense(x) for x in (first, second, drafter_logits(drafter, batch)))
        unrolled = unrolled_logits(drafter, batch.input_ids[:, 1:], batch.features[:, :-1], levels=2)
    assert every.all() and first.shape == plain.shape == (batch.positions, V)
    assert torch.allclose(first, plain, atol=1e-5)
    assert 0 < int(valid.sum()) < batch.positions  # a capture starting at its prompt's end: no second draft at its first position
    want = unrolled[1][0][batch.row[valid], batch.col[valid] - 1]
    assert torch.allclose(second, want, atol=1e-5)
    assert not torch.allclose(second, first[valid], atol=1e-3)  # its own features: a different draft


@pytest.mark.parametrize("depth,decay", [(1, 1.0), (2, 1.0), (3, 1.0), (3, 0.8)])
def test_a_round_learns_as_deep_as_its_feature_depth(saved_target, drafter, depth, decay):
    """``feature_depth`` L: a round's loss is the mean over block positions 1 .. L of the loss there,
    position j (from 0) weighted by ``feature_depth_decay ** j``, each past the first drafted on the
    drafter's own features (checked against the unrolled definition), and the reported
    second-position figure is position 2's whatever L (>= 2)."""
    from dataclasses import replace
    from onlinespec.learn.batch import collate
    from onlinespec.learn.learner import _POSITIONAL, DrafterLearner, LearnerConfig
    from onlinespec.learn.losses import LossConfig, compute_loss

    target, _ = saved_target
    records, captures = captured_records(target)
    batch = collate(records, features=captures)
    learner = DrafterLearner(drafter, LearnerConfig(feature_depth=depth, feature_depth_decay=decay))
    out, grads, deeper = learner._loss(learner.served_params(), batch, grad=True)
    with torch.no_grad():
        unrolled = unrolled_logits(drafter, batch.input_ids[:, 1:], batch.features[:, :-1], levels=3)
        want = []
        for level, (logits, _) in enumerate(unrolled[:depth]):
            valid = batch.col - 1 >= level
            sub = replace(batch, **{f: getattr(batch, f)[valid] for f in _POSITIONAL})
            want.append(compute_loss(logits[batch.row[valid], batch.col[valid] - 1], sub, LossConfig()))
    weights = [decay ** j for j in range(depth)]
    expected = sum(w * x.total for w, x in zip(weights, want)) / sum(weights)
    assert float(out.total) == pytest.approx(float(expected), rel=1e-5)
    assert (deeper is None) == (depth == 1)
    if deeper is not None:
        assert torch.allclose(deeper.alpha, want[1].alpha, atol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    with pytest.raises(ValueError, match="feature_depth"):
        LearnerConfig(feature_depth=0)
    with pytest.raises(ValueError, match="feature_depth_decay"):
        LearnerConfig(feature_depth_decay=0)


@pytest.mark.parametrize("suffix", [False, True], ids=["drafter", "drafter+suffix"])
def test_rows_draft_what_the_drafter_drafts_alone(saved_target, drafter, monkeypatch, suffix):
    """Rows of different lengths joining, drafting and settling together draft exactly what the
    drafter drafts alone from the target's features of the same text (with a copy at the second
    position, the drafter skips a forward and feeds two pairs before its third draft): a wrong
    feature anywhere stays lossless but would draft differently."""
    import onlinespec.decode.proposers as proposers_mod

    target, _ = saved_target
    monkeypatch.setattr(proposers_mod, "ENCODE_CHUNK", 5)
    cache = SuffixCache(SuffixConfig(scope="shared")) if suffix else None
    if suffix:  # copies at the second draft position of every row (random text rarely repeats)
        def copy_second(self, rows, need, drafts, position, room):
            return {b: [proposers_mod.Draft(1 + len(rows[b].tokens) % 40, copied=True)] for b in need
                    if position == 1}

        monkeypatch.setattr(proposers_mod.Copies, "propose", copy_second)
    engine = SpeculativeEngine(target, HFDrafter(drafter, "f"), config=EngineConfig(k=3), suffix=cache)
    batch = Batch(engine, slots=3, prefill_tokens=256)
    seen = []
    propose = Batch._propose

    def recording(self, k_rows, muted=frozenset()):
        texts = [list(g.tokens) for g in self.rows]
        drafts, qs, copied = propose(self, k_rows, muted)
        seen.extend(zip(texts, drafts, copied))
        return drafts, qs, copied

    monkeypatch.setattr(Batch, "_propose", recording)
    gens = [engine.start(p * (2 if suffix else 1), SamplingParams(max_new_tokens=8 + 3 * i))
            for i, p in enumerate(prompts(5, seed=11))]
    drive(batch, gens)
    assert len(seen) > 10
    mixed = 0
    for text, drafts, copied in seen:
        # each own draft is the drafter's after the text and the drafts before it (copies included)
        for j, (token, was_copied) in enumerate(zip(drafts, copied)):
            if not was_copied:
                assert token == draft_alone(target, drafter, text, drafts[:j]), (text, drafts, j)
                mixed += any(copied[:j])
    assert any(not any(c) for _, d, c in seen if d)
    if suffix:
        assert mixed, "no own draft followed a copy: the catch-up path went untested"


@pytest.mark.parametrize("config", [EngineConfig(k=4), EngineConfig()], ids=["k4", "adaptive"])
def test_greedy_output_is_the_targets_through_joins_and_leaves(saved_target, drafter, config):
    target, _ = saved_target
    engine = SpeculativeEngine(target, HFDrafter(drafter, "f"), config=config)
    ps = prompts(6, seed=2)
    gens = [engine.start(p, SamplingParams(max_new_tokens=5 + 4 * i)) for i, p in enumerate(ps)]
    streamed = drive(Batch(engine, slots=3, prefill_tokens=7), list(gens))
    for gen, p in zip(gens, ps):
        assert streamed[id(gen)] == hf_greedy(target, p, gen.params.max_new_tokens)
    assert sum(g.stats.drafted for g in gens) > 0


def test_saved_and_loaded_through_the_users_path_and_the_registry(saved_target, drafter, tmp_path):
    from onlinespec.cpu_linear import plain_linears
    from onlinespec.weights import build_model

    drafter.save_pretrained(str(tmp_path / "d"))
    loaded = load_model(str(tmp_path / "d"))
    assert isinstance(loaded, FeatureDrafter)
    ids, feats = torch.tensor([[3, 4, 5, 85, 90]]), torch.randn(1, 5, 48)
    # the fixture may have served (its linears swapped): compare the same products, bit for bit
    with torch.no_grad(), plain_linears():
        assert torch.equal(loaded(ids, features=feats).logits, drafter(ids, features=feats).logits)
    rebuilt = build_model(tmp_path / "d", dict(drafter.state_dict()), "test")
    assert isinstance(rebuilt, FeatureDrafter)
    with torch.no_grad(), plain_linears():
        assert torch.equal(rebuilt(ids, features=feats).logits, drafter(ids, features=feats).logits)


def test_records_without_captured_features_teach_it_nothing_and_the_pool_weighs_it_on_those_with(
        saved_target, drafter, tmp_path, redis_client):
    """A record without captured features teaches a feature drafter nothing (counted, acknowledged,
    no version) and cannot score it, so the pool's Hedge skips such records; the same records teach
    the other drafters as usual. Records with captured features put it in the pool's weights."""
    from onlinespec.feedback import keys
    from onlinespec.feedback.codec import encode
    from onlinespec.feedback.stream import FeedbackWriter
    from onlinespec.learn.registry import Registry
    from onlinespec.learn.round import PoolUpdater, Updater
    from tests.tiny import perturbed

    target, _ = saved_target
    name = f"feature-test-{id(tmp_path)}"
    registry = Registry(tmp_path / "registry", redis_client, keep=3)
    registry.bootstrap(f"{name}-f", drafter)
    for other in ("a", "b"):
        registry.bootstrap(f"{name}-{other}", perturbed(target, 0.3, seed=len(other)))
    for d in ("f", "a", "b"):
        redis_client.sadd(keys.drafters_set(name), f"{name}-{d}")

    def engine(capture):
        return SpeculativeEngine(target, HFDrafter(drafter, f"{name}-f", version=1),
                                 config=EngineConfig(k=3, feedback_topk=8, target_id=name, capture_features=capture))

    plain = engine(0.0)
    for p in prompts(4, seed=9):
        record = plain.generate(p, SamplingParams(max_new_tokens=10)).record
        redis_client.xadd(keys.feedback_stream(name), {"r": encode(record)})
    result = Updater(redis_client, registry, name, consumer="w1", round_records=10).run_round(f"{name}-f")
    assert (result.status, result.records, registry.latest(f"{name}-f")) == ("skipped", 4, 1)
    assert int(redis_client.hget(keys.health_key(f"{name}-f"), "without_features")) == 4
    learned = Updater(redis_client, registry, name, consumer="w1", round_records=10).run_round(f"{name}-a")
    assert learned.status == "published" and registry.latest(f"{name}-a") == 2
    assert PoolUpdater(redis_client, registry, name, "p1", round_records=10).run_round().status == "skipped"
    assert redis_client.hget(keys.pool_key(name), "weights") is None
    captured, writer = engine(1.0), FeedbackWriter(redis_client, name)
    for p in prompts(3, seed=10):
        gen = captured.start(p, SamplingParams(max_new_tokens=10))
        while not gen.finished:
            gen.step()
        writer.submit(gen.record(), gen.captured_features())
    writer.close()
    pool = PoolUpdater(redis_client, registry, name, "p1", round_records=10).run_round()
    assert pool.status == "published" and pool.records == 3
    weights = json.loads(redis_client.hget(keys.pool_key(name), "weights"))
    assert set(weights) == {f"{name}-{d}" for d in ("f", "a", "b")}


def test_it_learns_online_from_the_features_serving_captured(saved_target, drafter, tmp_path, redis_client):
    """The whole path: requests served with capture on write their target features beside their
    records (the real writer, a real Redis); the worker's rounds read both and publish versions;
    the last version's acceptance on held-out requests (their captured features, teacher forced)
    beats the first's by a margin. Features that do not fit their record are skipped and counted."""
    from onlinespec.feedback import keys
    from onlinespec.feedback.codec import CapturedFeatures, decode, decode_features, encode_features
    from onlinespec.feedback.stream import FeedbackWriter
    from onlinespec.learn.learner import DrafterLearner, LearnerConfig
    from onlinespec.learn.optim import OptimConfig
    from onlinespec.learn.registry import Registry
    from onlinespec.learn.round import Updater

    target, _ = saved_target
    name, did = f"feature-learn-{id(tmp_path)}", f"feature-learn-{id(tmp_path)}-f"
    registry = Registry(tmp_path / "registry", redis_client, keep=3)
    registry.bootstrap(did, drafter)
    config = LearnerConfig(optim=OptimConfig(lr=0.03, adaptive=True))
    redis_client.set(keys.learner_config(did), json.dumps(config.to_dict()))
    engine = SpeculativeEngine(target, HFDrafter(drafter, did, version=1),
                               config=EngineConfig(k=3, feedback_topk=16, target_id=name, capture_features=1.0,
                                                   feature_window=8))
    writer = FeedbackWriter(redis_client, name, features_ttl=60)

    def serve(p, seed):
        gen = engine.start(p, SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, ignore_eos=True))
        while not gen.finished:
            gen.step()
        return gen

    train = prompts(48, seed=31)
    for i, p in enumerate(train):
        gen = serve(p, i)
        writer.submit(gen.record(), gen.captured_features())
    writer.flush()
    writer.close()
    held = [serve(p, 1000 + i) for i, p in enumerate(prompts(8, seed=77))]
    held = ([g.record() for g in held], [g.captured_features() for g in held])
    assert writer.stats.features_written == len(train) and writer.stats.features_bytes > 0
    rid = gen.request_id
    f = decode_features(redis_client.get(keys.features_key(name, rid)), 48)
    assert f.start == max(0, len(train[-1]) - 8) and len(f.values) == len(gen.tokens) - 2 - f.start
    assert 0 < redis_client.ttl(keys.features_key(name, rid)) <= 60
    # one capture that does not fit its record: skipped and counted, the others learned
    updater = Updater(redis_client, registry, name, consumer="w1", round_records=8)
    victim = decode(redis_client.xrange(keys.feedback_stream(name), count=1)[0][1][b"r"]).request_id
    redis_client.set(keys.features_key(name, victim), encode_features(CapturedFeatures(0, np.zeros((999, 48)))))
    before = DrafterLearner(drafter, config).evaluate(*held)
    statuses = [updater.run_round(did).status for _ in range(len(train) // 8)]
    assert statuses.count("published") == len(train) // 8, statuses
    assert int(redis_client.hget(keys.health_key(did), "bad_features")) == 1
    learned, _ = registry.load_model(did, registry.latest(did))
    after = DrafterLearner(learned, config).evaluate(*held)
    print(f"feature drafter online: held-out acceptance {before['mean_alpha']:.3f} -> {after['mean_alpha']:.3f}, "
          f"at the second position {before['mean_alpha_deeper']:.3f} -> {after['mean_alpha_deeper']:.3f}")
    assert after["mean_alpha"] > before["mean_alpha"] + 0.025, (before, after)  # measured: 0.505 -> 0.545
    # it learns where it drafts on its own features too, and its rounds say how it stands there
    assert after["mean_alpha_deeper"] > before["mean_alpha_deeper"] + 0.02, (before, after)  # measured: 0.504 -> 0.552
    rounds = [json.loads(f[b"m"]) for _, f in redis_client.xrange(keys.learner_metrics_stream(did))]
    assert rounds and all(0.0 < m["mean_alpha_deeper"] < 1.0 for m in rounds)


def test_bench_engine_measures_a_feature_drafter(saved_target, drafter):
    """``bench engine``'s figures for a feature drafter: the engine's speed, acceptance and bound,
    lossless; no Hugging Face assisted run (it cannot pass the target's features to a drafter)."""
    from onlinespec.ops.bench.engine import measure
    from tests.tiny import tiny_tokenizer

    target, _ = saved_target
    out = measure(target, drafter, tiny_tokenizer(V), prompts(3, seed=5), 12, 3)
    assert out["lossless"] and out["suffix_lossless"]
    assert out["hf_assisted_tokens_per_s"] is None and out["ratio_vs_hf"] is None
    assert out["engine_tokens_per_s"] > 0 and 0 <= out["acceptance_rate"] <= 1 and out["mean_accepted_length"] >= 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_replay_of_a_feature_drafter_is_what_the_engine_serves(saved_target, drafter, k):
    """``bench adapt`` and tuning replay serving from teacher forcing: for a feature drafter each
    block position is a level deeper on its own features, and the replay must equal the engine,
    block by block (a replay that used its first-draft argmax everywhere overstates it)."""
    from onlinespec.decode.engine import GenerationStats
    from onlinespec.learn.replay import predictions, replay_greedy, trace_target

    target, _ = saved_target
    engine = SpeculativeEngine(target, HFDrafter(drafter, "f"), config=EngineConfig(k=k, feedback_topk=8))
    ps = prompts(6, seed=40 + k)
    traces = [trace_target(target, p, 30, topk=8, ignore_eos=True, features=True) for p in ps]
    records, stats = replay_greedy(drafter, traces, k)
    real = [engine.generate(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in ps]
    served = GenerationStats.combine(r.stats for r in real)
    assert 0 < served.accepted < served.drafted
    for name in ("steps", "drafted", "accepted", "accepted_hist", "accepted_per_pos"):
        assert getattr(stats, name) == getattr(served, name), name
    for rec, r in zip(records, real):
        assert rec.tokens.tolist() == r.record.tokens.tolist()
        for name in ("drafted", "accepted", "block_index", "draft_tokens"):
            assert np.array_equal(getattr(rec, name), getattr(r.record, name)), name
    if k > 1:  # its deeper drafts are not its first ones
        levels = predictions(drafter, traces, levels=k)
        assert any((g[0] != g[1]).any() for g, _ in levels)
    with pytest.raises(ValueError, match="features=True"):
        replay_greedy(drafter, [trace_target(target, ps[0], 5, topk=8)], k)


def test_bench_adapt_replays_and_teaches_a_feature_drafter_beside_another(saved_target, drafter, tmp_path, capsys):
    """``bench adapt`` with a feature drafter: the traces keep the target's features, it learns
    from them in the replayed stream (its acceptance on repeated traffic rises, alone and in a
    pool beside a plain drafter), and ``bench adapt --config`` runs every method over such a pool."""
    from onlinespec.cli import main
    from onlinespec.decode.chat import chat_prompts, render
    from onlinespec.learn.replay import trace_target
    from onlinespec.ops.bench.adapt import _method_configs, simulate
    from tests.test_bench import last_json
    from tests.tiny import tiny_tokenizer

    target, path = saved_target
    tok = tiny_tokenizer(V)
    traces = [trace_target(target, render(tok, m)[-48:], 24, 32, "edit", ignore_eos=True, features=True)
              for m in chat_prompts("edit", 2)]
    for method, pool in (("ogd", {"f": drafter}), ("pool", {"f": drafter, "t": target})):
        torch.manual_seed(0)
        out = simulate(method, _method_configs(0.003)[method][0], pool, traces, [[0, 1]] * 12, 3,
                       {"verify": 1.0, "draft": 0.1})
        # measured: ogd 0.958 -> 0.29, with the first round's loss before any update
        assert out["loss"][0] > 0.8 and max(out["loss"][-3:]) < 0.6, (method, out["loss"])
        assert out["mal"][-1] > out["mal"][0], (method, out["mal"])

    tok.save_pretrained(path)
    drafter.save_pretrained(tmp_path / "f")
    config = tmp_path / "service.yaml"
    config.write_text(f"target: {{id: tinyf, model: {path}}}\n"
                      f"drafters: [{{id: f, model: {tmp_path / 'f'}}}, {{id: t, model: {path}}}]\n")
    with pytest.raises(SystemExit) as done:
        main(["bench", "adapt", "--quick", "--json", "--threads", "1", "--config", str(config), "--k", "3",
              "--schedule", "edit,explain", "--rounds-per-phase", "2", "--per-round", "2", "--max-new-tokens", "12",
              "--prompt-tokens", "48", "--methods", "static", "ogd", "pool", "pool+suffix"])
    out = last_json(capsys)
    assert done.value.code == 0
    assert set(out["methods"]) == {"static", "ogd", "pool", "pool+suffix"}
    for m in out["methods"].values():
        assert len(m["per_round_mean_accepted_length"]) == 4 and m["mean_accepted_length"] >= 1


def test_a_service_serves_it_captures_features_and_swaps_in_what_its_worker_learned(tmp_path, redis_url):
    """The server as `onlinespec serve` builds it, with a feature drafter as its drafter: greedy
    answers over HTTP are the target's own; every request's features go beside its record
    (``capture_features: 1``, counted in /metrics); an RQ worker process learns from them and
    the server swaps the new versions in."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from serving.__main__ import build
    from serving.server import BackgroundServer
    from tests.tiny import tiny_tokenizer

    target = tiny_llama(layers=2, hidden=48, heads=4, seed=7)
    tok = tiny_tokenizer()
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    feature_from(target, str(tmp_path / "target"), list(range(100))).save_pretrained(tmp_path / "f")
    (tmp_path / "learner.yaml").write_text("optim: {lr: 0.03, adaptive: true}\n")
    config = tmp_path / "service.yaml"
    config.write_text(f"""
target: {{id: tinyf, model: {tmp_path / 'target'}}}
drafters:
  - {{id: f1, model: {tmp_path / 'f'}}}
serving: {{k: 3, max_tokens: 64, threads: 1, capture_features: 1.0, features_ttl: 120}}
registry: {tmp_path / 'registry'}
learner: {tmp_path / 'learner.yaml'}
""")
    os.environ["REDIS_URL"] = redis_url
    try:
        app, state, cfg, cleanup = build(str(config))
    finally:
        del os.environ["REDIS_URL"]
    srv = BackgroundServer(state, app=app).start()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = subprocess.Popen([sys.executable, "-m", "workers", "--target", "tinyf", "--registry", cfg.registry,
                               "--round-records", "4", "--period", "1", "--learner-config", cfg.learner],
                              env={**os.environ, "PYTHONPATH": root, "REDIS_URL": redis_url},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        prompt = "abcabd"
        got = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "tinyf", "prompt": prompt, "max_tokens": 16, "temperature": 0}).json()
        ids = tok.encode(prompt)
        want = tok.decode(hf_greedy(target, ids, 16))
        assert got["choices"][0]["text"] == want[: len(got["choices"][0]["text"])] and got["choices"][0]["text"]
        assert got["speculative"]["own"]["drafted_tokens"] > 0
        deadline, version, i = time.time() + 90, 1, 0
        while time.time() < deadline and version < 3:
            httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": "tinyf", "prompt": f"ab{i % 5}cd", "max_tokens": 20, "temperature": 1.0, "seed": i})
            i += 1
            version = state.loop.drafters["f1"].version
        metrics = httpx.get(srv.url + "/metrics", timeout=30).text
    finally:
        worker.send_signal(signal.SIGTERM)
        log = worker.communicate(timeout=30)[0]
        srv.stop()
        cleanup()
    assert version >= 3, log[-2000:]
    written = [line for line in metrics.splitlines() if line.startswith("onlinespec_feedback_features_written_total")]
    assert written and float(written[0].split()[-1]) >= i, written
    assert 'onlinespec_learner_records_without_features_total{drafter="f1"} 0' in metrics
