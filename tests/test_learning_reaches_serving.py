"""What the drafters learn reaches the served speed, and what they do is seen apart from copies.

Through the real server (HTTP, engine loop, hot-swap watcher, Redis registry): a better version
published behind the server's back is drafting within a few requests; a version that degrades is
muted by the draft-length controller long before the rollback guard has seen enough drafts; the
drafters' own drafts and suffix copies add up to the totals in responses and in /metrics.

The target here has six layers of which the last five add nothing (their output projections are
zero), so a one-layer cut of it drafts exactly its distribution at a fraction of its cost: the
best drafter there can be, and a random one-layer model, the worst.
"""

import re
import time

import httpx
import pytest
import torch
from transformers import LlamaForCausalLM

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from serving.hotswap import SwapWatcher
from onlinespec.learn.registry import Registry
from onlinespec.decode.suffix import SuffixCache
from serving.server import BackgroundServer, build_state
from tests.tiny import tiny_llama

MODEL = "deep-target"
PROMPTS = ["abcdef", "hello world", "XYZ123", "qrstuv", "0123456789", "zyxwvu", "lmnop", "ghijk"]


def deep_target_and_cut():
    target = tiny_llama(layers=6, hidden=64, seed=0)
    with torch.no_grad():
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    config = target.config.__class__(**{**target.config.to_dict(), "num_hidden_layers": 1})
    cut = LlamaForCausalLM(config).eval()
    missing, unexpected = cut.load_state_dict(target.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.layers.") for k in unexpected)
    return target, cut


def random_cut(cut):
    bad = tiny_llama(layers=1, hidden=64, seed=99)
    assert {k: v.shape for k, v in bad.state_dict().items()} == {k: v.shape for k, v in cut.state_dict().items()}
    return bad


def serve(redis_client, tmp_path, drafter_model, tokenizer, suffix=False, **watch):
    target, _ = deep_target_and_cut()
    registry = Registry(str(tmp_path / "registry"), redis_client)
    registry.set_spec("d", drafter_model)
    version = registry.publish("d", drafter_model, parent=None, note="base").version
    handle = HFDrafter(registry.load_model("d", version)[0], "d", version=version)
    engine = SpeculativeEngine(target, handle, tokenizer=tokenizer,
                               config=EngineConfig(k_max=4, target_id=MODEL),  # adaptive k
                               suffix=SuffixCache() if suffix else None)
    watcher = SwapWatcher(redis_client, registry, {"d": handle}, poll_seconds=0.05, **watch).start()
    state = build_state(engine, tokenizer, MODEL, watcher=watcher, max_tokens=200, max_prompt_tokens=300,
                        drafters={"d": handle})
    return BackgroundServer(state).start(), registry, watcher, handle


def ask(srv, i: int, max_tokens: int = 40) -> dict:
    r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)] + str(i), "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["speculative"]


def wait_validated(watcher, version: int, seconds: float = 20.0) -> None:
    """Until the watcher has loaded and validated ``version``: it swaps in at the next engine step."""
    deadline = time.time() + seconds
    while watcher.status("d", version).startswith("validating") and time.time() < deadline:
        time.sleep(0.05)
    assert watcher.status("d", version) in ("", "validated: swapping in at the next step"), watcher.status("d", version)


def test_a_better_version_published_behind_the_servers_back_is_drafting_within_a_few_requests(
        redis_client, tmp_path, tokenizer):
    target, cut = deep_target_and_cut()
    srv, registry, watcher, handle = serve(redis_client, tmp_path, random_cut(cut), tokenizer)
    try:
        bad = [ask(srv, i)["own"] for i in range(12)]
        late = bad[-4:]
        assert sum(o["accepted_tokens"] for o in bad) <= 0.1 * max(1, sum(o["drafted_tokens"] for o in bad))
        assert sum(o["drafted_tokens"] for o in late) <= 8, f"a useless drafter kept drafting: {late}"
        # an operator registers a drafter distilled elsewhere: no acceptance estimate comes with it
        better = registry.publish("d", cut, parent=registry.latest("d"), note="distilled offline").version
        wait_validated(watcher, better)
        after = [ask(srv, 100 + i)["own"] for i in range(8)]
        assert handle.version == better
        first_use = next((i for i, o in enumerate(after) if o["accepted_tokens"] > 0), None)
        assert first_use is not None and first_use <= 3, f"the better version was not used: {after}"
        tail = after[-4:]
        assert all(o["mean_accepted_length"] is not None and o["mean_accepted_length"] >= 3 for o in tail), tail
    finally:
        srv.stop()
        watcher.stop()


def test_a_degrading_version_is_muted_by_the_controller_before_the_rollback_guard_fires(
        redis_client, tmp_path, tokenizer):
    target, cut = deep_target_and_cut()
    srv, registry, watcher, handle = serve(redis_client, tmp_path, cut, tokenizer, min_drafted=2000)
    try:
        good = [ask(srv, i)["own"] for i in range(6)]
        assert sum(o["accepted_tokens"] for o in good) >= 0.9 * sum(o["drafted_tokens"] for o in good) > 50
        # a learner's round went wrong: the version carries its parent's (good) estimate
        worse = registry.publish("d", random_cut(cut), parent=registry.latest("d"),
                                 metrics={"acceptance_estimate": {"all": {"acceptance": 0.95, "positions": 500}}}).version
        wait_validated(watcher, worse)
        after = [ask(srv, 100 + i)["own"] for i in range(16)]
        drafted = sum(o["drafted_tokens"] for o in after)
        assert drafted < 300, f"the degraded version drafted {drafted} tokens"
        assert sum(o["drafted_tokens"] for o in after[-6:]) <= 8, after[-6:]
        assert watcher.stats.rollbacks == 0 and handle.version == worse  # the guard never needed to fire
        stats = watcher.stats.versions.get(("d", worse))
        assert stats is None or stats.drafted < watcher.min_drafted
    finally:
        srv.stop()
        watcher.stop()


def test_versions_their_learners_overstate_stay_muted_across_swaps(redis_client, tmp_path, tokenizer):
    """The learners' estimate is not what served blocks meet (they score the first position of
    the true text): a useless drafter whose every version comes with a high estimate, and no
    change between versions, stays muted from one version to the next on what its served drafts
    showed (started afresh from the estimate, each version drafted again until its rejections
    outweighed it)."""
    target, cut = deep_target_and_cut()
    useless = random_cut(cut)
    overstated = {"acceptance_estimate": {"all": {"acceptance": 0.9, "positions": 500}}}
    srv, registry, watcher, handle = serve(redis_client, tmp_path, useless, tokenizer)
    watcher.estimates["d"] = overstated["acceptance_estimate"]  # as the server starts: v1's estimate
    try:
        before = [ask(srv, i)["own"] for i in range(12)]
        assert sum(o["drafted_tokens"] for o in before[-4:]) <= 8, f"a useless drafter kept drafting: {before}"
        after = []
        for n in range(6):
            version = registry.publish("d", useless, parent=registry.latest("d"), metrics=overstated).version
            wait_validated(watcher, version)
            after += [ask(srv, 100 + 10 * n + i)["own"] for i in range(3)]
            assert handle.version == version
        drafted = sum(o["drafted_tokens"] for o in after)
        assert drafted <= 20, f"versions estimated alike drafted {drafted} tokens after their swaps: {after}"
    finally:
        srv.stop()
        watcher.stop()


def counters(metrics: str, name: str) -> dict[str, float]:
    return {labels: float(v) for labels, v in re.findall(rf"^onlinespec_{name}(\{{[^}}]*\}}) (\S+)$", metrics, re.M)}


@pytest.mark.parametrize("adaptive", [False, True])
def test_own_drafts_and_copies_add_up_to_the_totals(redis_client, tmp_path, tokenizer, adaptive):
    target, cut = deep_target_and_cut()
    srv, registry, watcher, handle = serve(redis_client, tmp_path, cut, tokenizer, suffix=True)
    try:
        specs = []
        for i in range(6):
            body = {"model": MODEL, "prompt": "ab ab ab ab cd cd cd " * 2 + str(i), "max_tokens": 48,
                    "temperature": 0, **({} if adaptive else {"k": 4})}
            r = httpx.post(srv.url + "/v1/completions", timeout=120, json=body)
            assert r.status_code == 200, r.text
            specs.append(r.json()["speculative"])
        for s in specs:
            assert s["own"]["drafted_tokens"] + s["copied"]["drafted_tokens"] == s["drafted_tokens"]
            assert s["own"]["accepted_tokens"] + s["copied"]["accepted_tokens"] == s["accepted_tokens"]
            assert s["copied"]["drafted_tokens"] == s["copied_tokens"]
        assert sum(s["copied"]["accepted_tokens"] for s in specs) > 0 and sum(s["own"]["accepted_tokens"] for s in specs) > 0
        metrics = httpx.get(srv.url + "/metrics").text
        total, copied = counters(metrics, "spec_decode_num_draft_tokens_total"), counters(metrics, "spec_decode_num_copied_tokens_total")
        own = counters(metrics, "spec_decode_num_own_draft_tokens_total")
        assert total and set(own) | set(copied) <= set(total)
        for labels, n in total.items():
            assert own.get(labels, 0) + copied.get(labels, 0) == n, labels
        acc, acc_copied = counters(metrics, "spec_decode_num_accepted_tokens_total"), counters(metrics, "spec_decode_num_copied_accepted_tokens_total")
        acc_own = counters(metrics, "spec_decode_num_own_accepted_tokens_total")
        for labels, n in acc.items():
            assert acc_own.get(labels, 0) + acc_copied.get(labels, 0) == n, labels
        assert sum(own.values()) == sum(s["own"]["drafted_tokens"] for s in specs)
    finally:
        srv.stop()
        watcher.stop()
