"""The server batches: concurrent requests share engine steps, each still gets exactly the target's
own greedy output, and the key/value budget makes requests wait instead of overcommitting."""

import re
import threading

import httpx
import pytest

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.suffix import SuffixCache
from onlinespec.ops.bench.live import engine_profile
from serving.server import BackgroundServer, build_state
from tests.test_serving_api import target_greedy_text

MODEL = "tiny-target"
PROMPTS = ["abcdef", "hello world", "XYZ123", "a b c a b c a b c", "qrstuv", "mnmnmnmn", "0123456789", "zyx"]


def serve(target, drafter_model, tokenizer, **kw):
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "close", version=1), tokenizer=tokenizer,
                               config=EngineConfig(k_max=4, target_id=MODEL), suffix=SuffixCache())
    return BackgroundServer(build_state(engine, tokenizer, MODEL, max_tokens=200, max_prompt_tokens=300, **kw)).start()


def concurrently(srv, bodies):
    results = [None] * len(bodies)

    def one(i):
        results[i] = httpx.post(srv.url + "/v1/completions", json=bodies[i], timeout=120)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def histogram(metrics: str, name: str) -> dict[str, float]:
    return {le: float(v) for le, v in re.findall(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', metrics)}


def test_concurrent_requests_share_steps_and_each_equals_the_target_alone(target, close_drafter_model, tokenizer):
    srv = serve(target, close_drafter_model, tokenizer, max_active=8)
    try:
        bodies = [{"model": MODEL, "prompt": p, "max_tokens": 20 + 4 * i, "temperature": 0}
                  for i, p in enumerate(PROMPTS)]
        responses = concurrently(srv, bodies)
        for body, r in zip(bodies, responses):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == target_greedy_text(target, tokenizer, body["prompt"],
                                                                        body["max_tokens"])
        metrics = httpx.get(srv.url + "/metrics").text
        rows = histogram(metrics, "onlinespec_engine_batch_rows")
        assert rows["+Inf"] > rows["1"], "no step ever served more than one request"
        assert "onlinespec_kv_cache_bytes" in metrics and "onlinespec_engine_steps_total" in metrics
        # where the engine's time went: every generated token settled in a step of some draft length
        settled = sum(map(float, re.findall(r'^onlinespec_engine_step_tokens_total{k="\d+"} (\S+)$', metrics, re.M)))
        generated = float(re.search(r"^onlinespec_generated_tokens_total (\S+)$", metrics, re.M).group(1))
        assert settled == generated == sum(r.json()["usage"]["completion_tokens"] for r in responses)
        profile = engine_profile(srv.url)
        assert profile["plain_steps"] + profile["spec_steps"] == float(
            re.search(r"^onlinespec_engine_steps_total (\S+)$", metrics, re.M).group(1))
        assert all(profile["seconds"].get(phase, 0) > 0 for phase in ("prefill", "verify", "settle"))
        assert profile["spec_steps"] and profile["spec_ms_per_token"] > 0
    finally:
        srv.stop()


def test_the_key_value_budget_makes_requests_wait_and_refuses_what_can_never_fit(target, close_drafter_model,
                                                                                   tokenizer):
    # each request reserves prompt (6) + max_tokens (24) + k_max + 1 (5) = 35 positions: two fit in 70
    srv = serve(target, close_drafter_model, tokenizer, max_active=8, kv_cache_tokens=70)
    try:
        bodies = [{"model": MODEL, "prompt": p, "max_tokens": 24, "temperature": 0}
                  for p in ["abcdef", "ghijkl", "mnopqr", "stuvwx", "yzabcd"]]
        for body, r in zip(bodies, concurrently(srv, bodies)):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == target_greedy_text(target, tokenizer, body["prompt"], 24)
        rows = histogram(httpx.get(srv.url + "/metrics").text, "onlinespec_engine_batch_rows")
        assert rows["2"] == rows["+Inf"] > rows["1"], rows  # two at a time, never more
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "abcdef", "max_tokens": 100},
                       timeout=60)
        assert r.status_code == 400 and "kv_cache_tokens" in r.json()["error"]["message"]
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,  # streamed: refused before its 200
                          json={"model": MODEL, "prompt": "abcdef", "max_tokens": 100, "stream": True}) as r:
            r.read()
        assert r.status_code == 400 and "kv_cache_tokens" in r.json()["error"]["message"]
    finally:
        srv.stop()


@pytest.mark.parametrize("seed", [7])
def test_seeded_sampling_over_http_does_not_depend_on_the_other_requests(target, close_drafter_model, tokenizer,
                                                                         seed):
    srv = serve(target, close_drafter_model, tokenizer, max_active=8)
    try:
        mine = {"model": MODEL, "prompt": "seeded", "max_tokens": 30, "temperature": 1.0, "seed": seed,
                "ignore_eos": True}
        alone = concurrently(srv, [mine])[0].json()["choices"][0]["text"]
        crowd = [{"model": MODEL, "prompt": p, "max_tokens": 25, "temperature": 0.9, "seed": i}
                 for i, p in enumerate(PROMPTS[:5])]
        together = concurrently(srv, crowd[:2] + [mine] + crowd[2:])[2].json()["choices"][0]["text"]
        assert together == alone
    finally:
        srv.stop()
