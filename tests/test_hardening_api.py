"""No request can hurt other requests: hostile inputs get 400 with an OpenAI-style body, an
exception inside the engine fails one request, a crashed loop comes back, suffix speculation
never copies across API keys, admin auth is strict."""

import json
import re
import time

import httpx
import pytest
import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.suffix import SuffixCache
from onlinespec.errors import InvalidRequestError
from serving.server import BackgroundServer, build_state
from tests.services import pause_admission
from tests.tiny import perturbed

MODEL = "tiny-target"


@pytest.fixture(scope="module")
def server(target, tokenizer):
    # a weak drafter: what is accepted is mostly what suffix speculation copies
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 3.0, seed=5), "weak", version=1),
                               tokenizer=tokenizer, config=EngineConfig(k=4, target_id=MODEL), suffix=SuffixCache())
    state = build_state(engine, tokenizer, MODEL, max_queue=8, max_tokens=200, max_prompt_tokens=300,
                        prefix_cache_tokens=512)
    srv = BackgroundServer(state).start()
    yield srv
    srv.stop()


def post(srv, body, path="/v1/completions", key="k-default", timeout=60, **kw):
    """JSON as a client may send it: escapes (\\ud800) and a key in any bytes."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}".encode()
    return httpx.post(srv.url + path, content=json.dumps({"model": MODEL, **body}), headers=headers, timeout=timeout, **kw)


def ok(srv, **extra):
    r = post(srv, {"prompt": "abc", "max_tokens": 8, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**30])
def test_out_of_range_seed_is_a_400_and_the_engine_keeps_serving(server, seed):
    r = post(server, {"prompt": "abc", "max_tokens": 4, "temperature": 1.0, "seed": seed})
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
    ok(server)
    assert ok(server, seed=2**63 - 1, temperature=1.0)["choices"][0]["text"]


@pytest.mark.parametrize("field,value", [("temperature", 1e-300), ("top_p", 1e-300), ("temperature", 1e-6)])
def test_tiny_temperature_or_top_p_is_served_greedily_not_a_500(server, field, value):
    greedy = ok(server)["choices"][0]["text"]
    body = {"temperature": 1.0, "seed": 3, field: value}
    assert ok(server, **body)["choices"][0]["text"] == greedy


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "ab\ud800cd"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udfffy"}]}),
    ("/v1/completions", {"prompt": "abc", "stop": ["\ud800"]}),
    ("/v1/completions", {"prompt": "abc", "user": "\ud800"}),
])
def test_lone_surrogates_are_a_400_with_a_json_body(server, path, body):
    r = post(server, {"max_tokens": 4, **body}, path=path)
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]["message"]
    assert "surrogate" in message or "unicode" in message


def test_logprobs_are_the_targets_own_log_softmax(server, target, tokenizer):
    """Served, not ignored: each generated token's log-prob is the target's raw log-softmax there
    (from the verification forward), with the n most likely alternatives."""
    r = post(server, {"prompt": "abcab", "max_tokens": 12, "temperature": 0, "logprobs": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in lp["tokens"]]
    prompt = tokenizer.encode("abcab")
    with torch.no_grad():
        ref = torch.log_softmax(target(torch.tensor([prompt + ids])).logits[0].float(), -1)
    for j, (tok, value) in enumerate(zip(ids, lp["token_logprobs"])):
        row = ref[len(prompt) + j - 1]
        assert value == pytest.approx(float(row[tok]), abs=1e-4)
        assert int(row.argmax()) == tok and max(lp["top_logprobs"][j].values()) == pytest.approx(value, abs=1e-6)
        assert len(lp["top_logprobs"][j]) == 3  # greedy: the chosen token is one of the top 3
    assert lp["text_offset"] == list(range(len(ids)))  # one character per token here
    chat = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
                         "logprobs": True, "top_logprobs": 2}, path="/v1/chat/completions").json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode()) for c in content)
    bad = post(server, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
               path="/v1/chat/completions")
    assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.json()["error"]["message"]
    assert post(server, {"prompt": "abc", "logprobs": 21}).status_code == 400


def test_streamed_logprobs_cover_every_token(server):
    headers = {"Authorization": "Bearer k-default"}
    body = {"model": MODEL, "prompt": "xyzxyz", "max_tokens": 16, "temperature": 0, "logprobs": 1, "stream": True,
            "ignore_eos": True}
    tokens = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
    assert len(tokens) == 16


def _start_raises(server, monkeypatch, exc: Exception) -> None:
    """The engine's start raises ``exc`` for requests of max_tokens 7 (others start as ever)."""
    engine = server.state.loop.engine
    real = engine.start

    def start(prompt, params, **kw):
        if params.max_new_tokens == 7:
            raise exc
        return real(prompt, params, **kw)

    monkeypatch.setattr(engine, "start", start)


def test_an_exception_inside_the_engine_fails_that_request_alone(server, monkeypatch):
    _start_raises(server, monkeypatch, RuntimeError("boom in start"))
    r = post(server, {"prompt": "abc", "max_tokens": 7})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    ok(server)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'onlinespec_request_errors_total{kind="internal"} 1' in metrics


def test_a_crash_outside_any_request_restarts_the_loop_and_is_reported(server, monkeypatch):
    loop = server.state.loop
    crashes = [RuntimeError("swap exploded")]

    class Watcher:
        choice = None

        def apply(self):
            if crashes:
                raise crashes.pop()
            return []

        def observe(self, *a):
            pass

    for _ in range(2):  # the second reads the first's prompt from the prefix cache
        ok(server, prompt="a prompt the prefix cache keeps")
    cached = prefix_metrics(server)
    assert cached["prefix_cache_hit_tokens_total"] > 0 and cached["prefix_cache_tokens"] > 0
    monkeypatch.setattr(loop, "watcher", Watcher())
    before = loop.restarts
    r = post(server, {"prompt": "abc", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 500  # the request held by the crashed pass gets an error, not a hang
    after = prefix_metrics(server)  # the cache starts afresh (a store may have stopped half-way) ...
    assert after["prefix_cache_tokens"] == 0 and after["prefix_cache_bytes"] == 0
    for counter in ("prefix_cache_lookup_tokens_total", "prefix_cache_hit_tokens_total"):  # ... its counters go on
        assert after[counter] >= cached[counter]
    assert ok(server)["choices"][0]["text"]  # the loop came back
    assert loop.restarts == before + 1 and loop.alive
    assert "swap exploded" in httpx.get(server.url + "/ready").json()["last_crash"]
    assert "onlinespec_engine_loop_restarts_total 1" in httpx.get(server.url + "/metrics").text


def prefix_metrics(srv) -> dict:
    return {line.split()[0].removeprefix("onlinespec_"): float(line.split()[1])
            for line in httpx.get(srv.url + "/metrics").text.splitlines() if line.startswith("onlinespec_prefix_cache_")}


def test_suffix_speculation_never_copies_across_api_keys(server):
    body = {"prompt": "kqzkqzkqz wvu", "max_tokens": 48, "temperature": 0, "ignore_eos": True}

    def copied(key, user=None):
        r = post(server, {**body, **({"user": user} if user else {})}, key=key)
        assert r.status_code == 200
        return r.json()["speculative"]["copied_accepted_tokens"], r.json()["choices"][0]["text"]

    alone, text = copied(None)
    assert copied(None) == (alone, text)  # no key: copies only from its own text, learns nothing
    first, _ = copied("key-one")
    assert first == alone  # nothing from the requests without a key
    again, same = copied("key-one")
    assert again > first and same == text  # its own past output: copied, output unchanged
    assert copied("key-two")[0] == alone  # another key learns nothing of key-one's text
    assert copied("key-two", user="someone")[0] == alone


def test_tenant_derives_from_the_key_and_bearer_parsing_is_strict():
    from serving.auth import bearer_token, tenant_of

    assert tenant_of(None, "bob") is None
    t = tenant_of("sk-1", None)
    assert t.startswith("key:") and "sk-1" not in t and tenant_of("sk-1", "bob") == t + "/user:bob"
    assert tenant_of("sk-2", None) != t
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer abc") == "abc"
    assert bearer_token("abc") is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None


def test_api_keys_when_configured_are_required(target, tokenizer):
    engine = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(target_id=MODEL))
    state = build_state(engine, tokenizer, MODEL, api_keys=("good-key",))
    srv = BackgroundServer(state).start()
    try:
        for key in (None, "bad-key", "gööd"):
            r = post(srv, {"prompt": "abc", "max_tokens": 2}, key=key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(srv, {"prompt": "abc", "max_tokens": 2}, key="good-key").status_code == 200
        # /tokenize and /detokenize too (each costs the server tokenizing)
        assert post(srv, {"prompt": "abc"}, path="/tokenize", key=None).status_code == 401
        assert post(srv, {"tokens": [1, 2]}, path="/detokenize", key="bad-key").status_code == 401
        assert post(srv, {"prompt": "abc"}, path="/tokenize", key="good-key").json()["count"] > 0
    finally:
        srv.stop()


def test_redis_urls_are_printed_without_their_password():
    from onlinespec.ops.up import redact

    assert redact("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("rediss://user:hunter2@host/0") == "rediss://user:***@host/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_prompt_token_ids_beyond_int32_are_a_400(server):
    r = post(server, {"prompt": [1, 2, 10**30], "max_tokens": 2})
    assert r.status_code == 400
    torch.manual_seed(0)
    ok(server)


def test_a_body_over_the_limit_is_a_413_before_it_is_read_and_the_server_serves_on(target, tokenizer):
    engine = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(target_id=MODEL))
    srv = BackgroundServer(build_state(engine, tokenizer, MODEL, max_request_bytes=4096)).start()
    try:
        big = json.dumps({"model": MODEL, "prompt": "a" * 5000, "max_tokens": 2}).encode()
        r = httpx.post(srv.url + "/v1/completions", content=big, headers={"Content-Type": "application/json"},
                       timeout=30)  # Content-Length says it
        assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"], r.text

        def chunks():  # no Content-Length: refused once the bytes read pass the bound
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"], r.text
        assert ok(srv)["usage"]["completion_tokens"] == 8
    finally:
        srv.stop()


def test_tokenizing_a_prompt_does_not_hold_the_server(server, monkeypatch):
    """While a prompt is being tokenized (held here until the test lets it go), the server answers
    other requests: tokenizing runs off the event loop."""
    import threading

    tokenizer = server.state.tokenizer
    holding, release = threading.Event(), threading.Event()
    encode = tokenizer.encode

    def slow_encode(text, *a, **kw):
        if text == "hold me":
            holding.set()
            release.wait(90)  # longer than the checks below wait: on the event loop, they would time out
        return encode(text, *a, **kw)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    result = {}
    held = threading.Thread(target=lambda: result.setdefault("r", post(server, {"prompt": "hold me", "max_tokens": 2})))
    held.start()
    try:
        assert holding.wait(30)
        r = httpx.post(server.url + "/v1/completions", timeout=20,
                       json={"model": MODEL, "prompt": "abc", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8  # served meanwhile
        assert httpx.get(server.url + "/v1/models", timeout=20).status_code == 200
    finally:
        release.set()
        held.join(60)
    assert result["r"].status_code == 200


def _stream_lines(srv, body, path="/v1/completions"):
    headers = {"Authorization": "Bearer k-default"}
    with httpx.stream("POST", srv.url + path, json={"model": MODEL, "stream": True, **body}, headers=headers,
                      timeout=60) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


def test_what_the_engine_would_refuse_is_a_400_before_a_stream_starts(server):
    """Checked before queueing, so a streamed request gets a 400 with a message, not a 200 and an
    error event (found by a fuzzer: k past k_max was a 200 stream holding only an error)."""
    engine = server.state.loop.engine
    vocab, context = engine.vocab_size, engine.max_context()
    cases = [({"prompt": "abc", "k": engine.config.k_max + 1}, "k_max"),
             ({"prompt": [1, vocab], "max_tokens": 2}, "out of range"),
             ({"prompt": "abc", "max_tokens": 2, "stop_token_ids": [vocab + 3]}, "stop_token_ids"),
             ({"prompt": "abc", "max_tokens": 2, "logit_bias": {str(vocab): 1}}, "logit_bias")]
    limits = server.state
    if context is not None and context < limits.max_prompt_tokens + limits.max_tokens:
        cases.append(({"prompt": [1] * limits.max_prompt_tokens, "max_tokens": limits.max_tokens}, "context"))
    for body, words in cases:
        for path, shaped in (("/v1/completions", body),
                             ("/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                                       "messages": [{"role": "user", "content": "hi"}]})):
            if path.endswith("chat/completions") and isinstance(body["prompt"], list):
                continue  # token ids: completions only
            code, lines = _stream_lines(server, shaped, path)
            assert code == 400, (body, lines)
            assert words in json.loads(lines[0])["error"]["message"], lines
    ok(server)


def test_an_error_found_after_a_stream_started_is_an_event_then_done(server, monkeypatch):
    """What only the engine finds (here: its start refuses the request) arrives as an error event,
    and the stream still ends with [DONE], as vLLM's does: clients read to it."""
    _start_raises(server, monkeypatch, InvalidRequestError("refused late"))
    code, lines = _stream_lines(server, {"prompt": "abc", "max_tokens": 7})
    assert code == 200
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["message"] == "refused late", lines
    ok(server)


def test_one_client_cannot_take_every_place_in_the_queue(target, tokenizer, monkeypatch):
    """serving.max_requests_per_tenant: a tenant (its API key) with that many requests waiting or
    running gets 429 for more, while another tenant is served; its places come back as its
    requests end (here: its client leaves). The engine admits nothing while this is checked, so
    what is in flight stays in flight."""
    engine = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(target_id=MODEL))
    srv = BackgroundServer(build_state(engine, tokenizer, MODEL, max_queue=16, max_requests_per_tenant=2)).start()
    loop = srv.state.loop
    resume = pause_admission(loop, monkeypatch)  # requests wait in the queue

    def stream(key, **extra):
        return httpx.stream("POST", srv.url + "/v1/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True, **extra})

    try:
        with stream("a") as a1, stream("a") as a2:
            assert a1.status_code == a2.status_code == 200
            r = post(srv, {"prompt": "abc", "max_tokens": 8}, key="a")
            assert r.status_code == 429 and "max_requests_per_tenant" in r.json()["error"]["message"], r.text
            assert post(srv, {"prompt": "abc", "max_tokens": 8, "n": 3}, key="b").status_code == 400  # never fits
            with stream("b") as b1:
                assert b1.status_code == 200  # another client is not held back
        deadline = time.time() + 15  # a's client left both streams: its places come back
        while True:  # (a request let in waits in the paused queue: the client gives up on it)
            try:
                r = post(srv, {"prompt": "abc", "max_tokens": 2}, key="a", timeout=1.0)
            except httpx.TimeoutException:
                break
            assert r.status_code == 429 and time.time() < deadline, "a tenant's places never came back"
            time.sleep(0.2)
        resume()
        assert post(srv, {"prompt": "abc", "max_tokens": 4, "temperature": 0}, key="a").status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        assert re.search(r'onlinespec_requests_rejected_total\{reason="tenant_limit"\} [1-9]', metrics), metrics
    finally:
        resume()
        srv.stop()
