"""The HTTP API with the official openai client, against a live server on loopback."""

import asyncio
import copy
import logging
import threading

import httpx
import openai
import pytest
import torch

from onlinespec.decode.chat import render_text
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from serving.server import BackgroundServer, build_state
from tests.services import pause_admission, slow_steps

MODEL = "tiny-target"


@pytest.fixture(scope="module")
def server(target, close_drafter_model, tokenizer):
    engine = SpeculativeEngine(target, HFDrafter(close_drafter_model, "close", version=1), tokenizer=tokenizer,
                               config=EngineConfig(k=4, target_id=MODEL))
    state = build_state(engine, tokenizer, MODEL, max_queue=4, max_tokens=200, max_prompt_tokens=300,
                        prefix_cache_tokens=512)
    srv = BackgroundServer(state).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def target_greedy_text(target, tokenizer, prompt, n):
    ids = tokenizer.encode(prompt)
    out = target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_greedy_completion_equals_the_targets_own_output(client, target, tokenizer):
    for prompt in ("abcdef", "hello world", "XYZ123"):
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        assert resp.choices[0].text == target_greedy_text(target, tokenizer, prompt, 40)
        assert resp.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert resp.usage.completion_tokens <= 40
        spec = resp.model_extra["speculative"]
        assert spec["drafter_id"] == "close" and spec["drafter_version"] == 1
        assert spec["mean_accepted_length"] >= 1 and spec["accepted_tokens"] <= spec["drafted_tokens"]
        steps = spec["draft_steps"]
        assert steps >= 1 and spec["mean_accepted_length"] == pytest.approx((spec["accepted_tokens"] + steps) / steps)


def test_streaming_completion_concatenates_to_the_same_text(client, target, tokenizer):
    stream = client.completions.create(model=MODEL, prompt="stream me", max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == target_greedy_text(target, tokenizer, "stream me", 30)
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def test_chat_and_chat_streaming(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    text = resp.choices[0].message.content
    assert resp.choices[0].message.role == "assistant" and resp.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_content_parts_are_read_as_their_text_joined(server, client):
    """OpenAI's SDK and most agent frameworks send a message's content as a list of parts: its
    text parts are the text, joined with newlines (as vLLM joins them); an image is refused."""
    parts = [{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}]
    as_parts = [{"role": "system", "content": parts}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    as_text = [{"role": "system", "content": "be\nbrief"}, {"role": "user", "content": "hi"}]
    out = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=12, temperature=0) for m in
           (as_parts, as_text)]
    assert out[0].choices[0].message.content == out[1].choices[0].message.content
    assert out[0].usage.prompt_tokens == out[1].usage.prompt_tokens
    r = httpx.post(server.url + "/tokenize", json={"messages": as_parts}, timeout=30)
    assert r.status_code == 200 and r.json()["count"] == out[0].usage.prompt_tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for content, words in (([{"type": "text", "text": "x"}, image], "image_url"),
                           ([{"type": "text"}], "text"), ([{"type": "text", "text": 5}], "text")):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_a_chat_template_that_refuses_the_messages_is_a_400_that_says_why(target, tokenizer):
    """Many models' templates raise on a conversation they do not take (roles that do not
    alternate, a system message): the client's error, not a 500."""
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ tail | default('') }}assistant:")
    engine = SpeculativeEngine(target, None, tokenizer=strict, config=EngineConfig(target_id=MODEL))
    srv = BackgroundServer(build_state(engine, strict, MODEL, max_tokens=16)).start()
    try:
        refused = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        for path, extra in (("/v1/chat/completions", {"max_tokens": 4}), ("/tokenize", {})):
            r = httpx.post(srv.url + path, json={"model": MODEL, "messages": refused, **extra}, timeout=30)
            assert r.status_code == 400, r.text
            assert "System role not supported" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": refused[1:], "max_tokens": 4})
        assert r.status_code == 200, r.text
        # chat_template_kwargs: the template's own variables, not the server's
        tokenize = {"model": MODEL, "messages": refused[1:]}
        plain = httpx.post(srv.url + "/tokenize", json=tokenize, timeout=30).json()["count"]
        longer = httpx.post(srv.url + "/tokenize", json={**tokenize, "chat_template_kwargs": {"tail": "x y z "}},
                            timeout=30).json()["count"]
        assert longer > plain
        for kwargs in ({"messages": []}, {"add_generation_prompt": False}, {"not a name": 1}):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                           json={"model": MODEL, "messages": refused[1:], "chat_template_kwargs": kwargs})
            assert r.status_code == 400 and "chat_template_kwargs" in r.json()["error"]["message"], r.text
    finally:
        srv.stop()


def test_a_chat_may_go_on_with_its_last_message(server, client, tokenizer):
    """``continue_final_message``: the text ends inside the last message (no end of turn, no new
    header) and the answer goes on from there, as a completion of that text; with
    ``add_generation_prompt`` both true is a 400 that says why."""
    messages = [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}
    going_on = {**body, "add_generation_prompt": False, "continue_final_message": True}
    text = render_text(tokenizer, messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("one two")
    r = httpx.post(server.url + "/v1/chat/completions", json=going_on, timeout=60)
    assert r.status_code == 200, r.text
    completion = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert r.json()["choices"][0]["message"]["content"] == completion.choices[0].text
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(text))
    count = httpx.post(server.url + "/tokenize", timeout=30,
                       json={"messages": messages, "add_generation_prompt": False, "continue_final_message": True})
    assert count.json()["count"] == len(tokenizer.encode(text))
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "continue_final_message": True}, timeout=30)
    assert r.status_code == 400 and "cannot both be true" in r.json()["error"]["message"], r.text


def test_a_prompt_that_begins_as_an_earlier_one_reads_only_the_rest_and_says_so(server, client, target, tokenizer):
    shared = "You are terse. Answer in one line. Question: "
    texts = []
    for question in ("why is the sky blue", "where do rivers go"):
        resp = client.completions.create(model=MODEL, prompt=shared + question, max_tokens=25, temperature=0)
        assert resp.choices[0].text == target_greedy_text(target, tokenizer, shared + question, 25)
        texts.append(resp.usage.prompt_tokens_details.cached_tokens)
    common = len(tokenizer.encode(shared))
    assert texts[0] < common <= texts[1] + 1  # the first read it whole; the second took it from the cache
    metrics = httpx.get(server.url + "/metrics").text
    hit = [line for line in metrics.splitlines() if line.startswith("onlinespec_prefix_cache_hit_tokens_total ")]
    assert hit and float(hit[0].split()[1]) >= texts[1]
    assert "onlinespec_prefix_cache_bytes " in metrics


def test_a_cache_salt_reads_only_what_requests_with_the_same_salt_left(server, client):
    """vLLM's ``cache_salt``: the same prompt under another salt (or none) is read whole again."""
    prompt = "Salted: a prompt read first without a salt, then under two salts in turn."

    def cached(salt=None):
        extra = {"extra_body": {"cache_salt": salt}} if salt else {}
        resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, **extra)
        return resp.usage.prompt_tokens_details.cached_tokens

    cached()
    assert cached() > 0  # unsalted requests share what they read
    assert cached("tenant-a secret") == 0
    assert cached("tenant-a secret") > 0
    assert cached("tenant-b secret") == 0
    for bad in ("", "x" * 1025, "\\ud800"):  # the last: a lone surrogate, escaped in JSON
        r = httpx.post(server.url + "/v1/completions",
                       content=f'{{"model": "{MODEL}", "prompt": "x", "cache_salt": "{bad}"}}',
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "cache_salt" in r.text, r.text


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=30, temperature=1.0, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_models_health_ready_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["ready"] and ready["checks"]["redis"] == "disabled"
    client.completions.create(model=MODEL, prompt="count me", max_tokens=10, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    assert 'onlinespec_spec_decode_num_draft_tokens_total{drafter="close",version="1"}' in text
    assert "onlinespec_time_to_first_token_seconds_bucket" in text


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"model": MODEL, "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": 5}, 400, "prompt"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": "gpt-9", "prompt": "x"}, 404, "gpt-9"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "user": "u" * 1000}, 400, "user"),
        ({"model": MODEL, "prompt": "x" * 400}, 400, "limit"),
        ({"model": MODEL, "prompt": [1, 2, 100000]}, 400, "out of range"),
    ],
)
def test_malformed_completions_get_4xx_with_a_message(server, body, status, words):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, words",
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL}, "messages"),
    ],
)
def test_malformed_chat_gets_400(server, body, words):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_what_the_server_does_not_apply_is_refused_by_name_and_its_defaults_pass(client, server):
    """OpenAI fields this server does not apply (best_of, echo, tools, ...) are refused with a
    400 naming them, never silently dropped; the values clients send by default pass."""
    defaults = {"frequency_penalty": 0.0, "presence_penalty": 0, "logit_bias": {}, "n": 1, "echo": False,
                "best_of": 1, "tool_choice": "auto", "response_format": {"type": "text"},
                # vLLM's defaults
                "use_beam_search": False, "length_penalty": 1.0, "include_stop_str_in_output": False,
                "skip_special_tokens": True, "spaces_between_special_tokens": True, "bad_words": [],
                "truncate_prompt_tokens": None, "prompt_logprobs": None, "priority": 0, "min_p": 0.0}
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "defaults", "max_tokens": 3, "temperature": 0, **defaults})
    assert r.status_code == 200, r.text
    for field, value in (("best_of", 3), ("suffix", "and so on"), ("use_beam_search", True),
                         ("include_stop_str_in_output", True), ("skip_special_tokens", False), ("bad_words", ["x"]),
                         ("truncate_prompt_tokens", 8), ("prompt_logprobs", 1), ("priority", 1)):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 3, field: value})
        assert r.status_code == 400 and f"{field} is not supported" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                         "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and "tools is not supported" in r.json()["error"]["message"], r.text
    for field, value in (("chat_template", "{{ messages }}"), ("documents", [{"text": "d"}]),
                         ("modalities", ["text", "audio"])):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], field: value})
        assert r.status_code == 400 and f"{field} is not supported" in r.json()["error"]["message"], r.text
    # a tokenizer llguidance cannot read (the tiny models' own): structured output is refused, not ignored
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 3, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "not available for this model's tokenizer" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,  # echo is the completions API's
                   json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "echo": True})
    assert r.status_code == 400 and "echo is not supported" in r.json()["error"]["message"], r.text


def test_penalties_and_logit_bias_reach_the_target_s_choice(server, client, tokenizer):
    """A bias of 100 on one token makes it the text; penalties out of range are a 400."""
    token = tokenizer.encode("the")[0]
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=5, temperature=0,
                                     logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert resp.choices[0].text == tokenizer.decode([token] * 5)
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=0,
                                     frequency_penalty=2.0, presence_penalty=2.0)
    assert resp.usage.completion_tokens > 0
    # vLLM's allowed_token_ids and min_p
    pair = tokenizer.encode("the")[:1] + tokenizer.encode(" and")[-1:]
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=0.9, seed=1,
                                     extra_body={"ignore_eos": True, "allowed_token_ids": pair, "min_p": 0.05})
    assert resp.choices[0].text and set(tokenizer.encode(resp.choices[0].text)) <= set(pair), resp.choices[0].text
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3), ("repetition_penalty", 0),
                         ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}),
                         ("min_p", 1.5), ("allowed_token_ids", []), ("allowed_token_ids", [-1]),
                         ("allowed_token_ids", [99999999])):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 3, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, value, r.text)


def test_min_tokens_holds_eos_back(server, client):
    """A +100 bias on EOS ends the text at once; min_tokens=5 holds it back for five tokens."""
    eos = {"0": 100}  # the tiny models' EOS
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=0, logit_bias=eos)
    assert resp.usage.completion_tokens == 1 and resp.choices[0].finish_reason == "stop"
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=0, logit_bias=eos,
                                     extra_body={"min_tokens": 5})
    assert resp.usage.completion_tokens == 6 and resp.choices[0].finish_reason == "stop"
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 3, "min_tokens": 4})
    assert r.status_code == 400 and "min_tokens" in r.json()["error"]["message"], r.text


def test_n_choices_are_n_requests_of_the_same_prompt(server, client, target, tokenizer):
    """n=3 greedy: three choices, each the target's own text; counts summed, the prompt counted once."""
    resp = client.completions.create(model=MODEL, prompt="hello world", max_tokens=20, temperature=0, n=3)
    expected = target_greedy_text(target, tokenizer, "hello world", 20)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.text == expected for c in resp.choices)
    assert resp.usage.prompt_tokens == len(tokenizer.encode("hello world"))
    assert resp.usage.completion_tokens == 3 * len(tokenizer.encode(expected))
    spec = resp.model_extra["speculative"]
    assert len(spec["choices"]) == 3
    assert spec["drafted_tokens"] == sum(c["drafted_tokens"] for c in spec["choices"]) > 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content


def test_n_seeded_choices_are_the_seeds_one_by_one_streamed_or_not(server, client):
    """Choice i of a seeded request samples with seed + i (vLLM's rule): the same text as a
    request of its own with that seed; streamed, each choice's chunks carry its index."""
    kw = dict(model=MODEL, prompt="Once upon", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(seed=7 + i, **kw).choices[0].text for i in range(3)]
    assert len(set(alone)) > 1  # the seeds draw different texts
    both = client.completions.create(seed=7, n=3, **kw)
    assert [c.text for c in both.choices] == alone
    pieces, usage = {0: [], 1: [], 2: []}, None
    for chunk in client.completions.create(seed=7, n=3, stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            pieces[c.index].append(c.text)
        usage = chunk.usage or usage
    assert ["".join(pieces[i]) for i in range(3)] == alone
    assert usage.completion_tokens == 48


def test_a_request_s_choices_are_queued_together_or_not_at_all():
    from onlinespec.decode.sampling import SamplingParams
    from serving.engine_loop import LoopBase, QueueFull
    from serving.metrics import Metrics

    async def submit():
        loop = LoopBase(Metrics(), max_queue=3)  # not started: nothing leaves the queue
        loop.submit([1, 2], SamplingParams())
        with pytest.raises(QueueFull, match="needs room for 3"):
            loop.submit_all([([1, 2], SamplingParams())] * 3)
        assert loop.pending.qsize() == 1  # none of the three was queued
        assert len(loop.submit_all([([1, 2], SamplingParams())] * 2)) == 2 and loop.pending.qsize() == 3

    asyncio.run(submit())


def test_n_beyond_what_the_server_can_queue_is_refused(server):
    for body, words in (({"n": 5}, "n=5 exceeds this server's queue of 4"), ({"n": 129}, "n"),
                        ({"n": 2, "seed": 2**63 - 1}, "seed + n - 1")):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 3, **body})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


@torch.inference_mode()
def test_echo_puts_the_prompt_and_its_log_probs_before_the_completion(client, target, tokenizer):
    """echo: the prompt's text first; with logprobs, its tokens' log-probs under the target (the
    first None), then the completion's: streamed or not, one choice or two."""
    prompt = "echo this back"
    ids = tokenizer.encode(prompt)
    lp = torch.log_softmax(target(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    expected = [None] + lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    text = target_greedy_text(target, tokenizer, prompt, 10)
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert resp.choices[0].text == prompt + text and resp.choices[0].logprobs is None
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, echo=True,
                                     logprobs=2, n=2)
    for choice in resp.choices:
        assert choice.text == prompt + text
        lps = choice.logprobs
        assert len(lps.tokens) == len(ids) + resp.usage.completion_tokens // 2
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        assert lps.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)
        assert len(lps.top_logprobs[1]) in (2, 3) and lps.text_offset[0] == 0
    pieces, lps = [], []
    for chunk in client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, echo=True,
                                           logprobs=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            lps += chunk.choices[0].logprobs.token_logprobs if chunk.choices[0].logprobs else []
    assert pieces[0].startswith(tokenizer.decode(ids)) and "".join(pieces) == tokenizer.decode(ids) + text
    assert lps[0] is None and lps[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)


def test_a_batch_of_prompts_gets_n_choices_each_in_order(server, client, target, tokenizer):
    """OpenAI's batched prompt (texts or token ids): choice index = prompt x n + i; each echoed."""
    texts = ["abcdef", "hello world"]
    expected = [target_greedy_text(target, tokenizer, t, 12) for t in texts]
    resp = client.completions.create(model=MODEL, prompt=texts, max_tokens=12, temperature=0, n=2, echo=True)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [texts[0] + expected[0]] * 2 + [texts[1] + expected[1]] * 2
    assert resp.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    ids = [tokenizer.encode(t) for t in texts]
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in resp.choices] == expected
    for prompt, words in ((["ok", ""], "must not be empty"), ([[1, 2], [-1]], "token ids"),
                          (["x"] * 129, "at most 128 prompts"), (["a", "b", "c"], "3 prompts x n=2 exceeds")):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": prompt, "max_tokens": 3, "n": 2 if len(prompt) == 3 else 1})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_stop_token_ids_end_the_text_where_the_target_writes_one(server, client, target, tokenizer):
    ids = tokenizer.encode("abcdef")
    out = target.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=0, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    stop = next(t for i, t in enumerate(tokens) if i >= 3 and t not in tokens[:i])  # first written at i >= 3
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                     extra_body={"stop_token_ids": [stop]})
    at = tokens.index(stop)
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == at + 1
    assert resp.choices[0].text == tokenizer.decode(tokens[:at], skip_special_tokens=True)
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 3, "stop_token_ids": [10**6]})
    assert r.status_code == 400 and "stop_token_ids" in r.json()["error"]["message"], r.text


def test_a_chat_that_names_no_max_tokens_may_run_to_the_server_s_limit(server, client):
    """A completion defaults to 16 tokens (OpenAI's legacy default); a chat answer is not cut at 16
    but may run to the server's max_tokens, within the context (as vLLM's chat endpoint)."""
    resp = client.completions.create(model=MODEL, prompt="Once", temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go on"}],
                                          temperature=0, extra_body={"ignore_eos": True})
    context = server.state.context
    assert chat.usage.completion_tokens == min(200, context - chat.usage.prompt_tokens) > 16


def test_tokenize_and_detokenize_are_what_the_routes_serve(server, client, tokenizer):
    """vLLM's /tokenize: the ids a prompt, or a chat as the chat route renders it, is served as
    (a chat's count is its usage.prompt_tokens); /detokenize turns ids back into text."""
    url = server.url
    r = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "hello world"}, timeout=30).json()
    assert r["tokens"] == tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_prompt_tokens"] == 300 and r["max_model_len"] == server.state.context
    messages = [{"role": "user", "content": "how many tokens?"}]
    counted = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=30).json()["count"]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert counted == chat.usage.prompt_tokens
    back = httpx.post(url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}, timeout=30).json()
    assert back["prompt"] == tokenizer.decode(r["tokens"])
    for path, body, status, words in (("/tokenize", {"prompt": "x", "messages": messages}, 400, "prompt or messages"),
                                      ("/tokenize", {"model": "other", "prompt": "x"}, 404, "does not exist"),
                                      ("/detokenize", {"tokens": [10**6]}, 400, "out of the tokenizer's range"),
                                      ("/detokenize", {"tokens": [-1]}, 400, "token ids")):
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == status and words in r.json()["error"]["message"], (path, body, r.text)


def test_invalid_json_gets_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_concurrent_requests_interleave_and_a_full_queue_answers_429(server):
    results, statuses = [], []

    def call(i):
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": f"req{i}", "max_tokens": 150, "temperature": 0,
                             "ignore_eos": True})
        statuses.append(r.status_code)
        if r.status_code == 200:
            results.append(r.json())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert 429 in statuses  # max_queue=4: some were refused with a clear error...
    assert statuses.count(200) >= 4  # ...and the rest were served
    assert all(r["usage"]["completion_tokens"] == 150 for r in results)


def test_client_disconnect_cancels_its_request(server, monkeypatch):
    state = server.state
    before = state.metrics.cancelled.values.get((), 0)
    # 200 tokens take at least 40 steps: seconds, more than the route takes to see its client leave,
    # on any machine (unslowed, a fast one could finish the request first: nothing to cancel)
    slow_steps(state.loop, monkeypatch, 0.05)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "long one", "max_tokens": 200, "temperature": 0,
                               "ignore_eos": True, "stream": True}) as r:
            next(r.iter_lines())  # the first event arrives...
        # ...and the client leaves before the 200 tokens are done
    import time

    deadline = time.time() + 10
    while time.time() < deadline and state.metrics.cancelled.values.get((), 0) <= before:
        time.sleep(0.05)
    assert state.metrics.cancelled.values.get((), 0) == before + 1
    assert state.loop.depth == 0


def test_a_client_that_leaves_a_request_not_streamed_cancels_it_and_logs_no_error(server, caplog, monkeypatch):
    """Found by a fuzzer: the client gone, the route raised CancelledError through the app, and
    uvicorn logged each such request as "Exception in ASGI application" with a traceback.

    The engine admits nothing until the route has seen the client leave (it looks once a second):
    a request let run would finish first on a fast machine, and there would be nothing to cancel."""
    import time

    state = server.state
    loop = state.loop
    before = state.metrics.cancelled.values.get((), 0)
    resume = pause_admission(loop, monkeypatch)  # the request waits in the queue
    with caplog.at_level(logging.ERROR):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", timeout=0.5,
                       json={"model": MODEL, "prompt": "long one", "max_tokens": 200, "temperature": 0,
                             "ignore_eos": True})
        deadline = time.time() + 15
        while time.time() < deadline and not any(h.cancelled for h in list(loop.pending.queue)):
            time.sleep(0.05)
        assert any(h.cancelled for h in list(loop.pending.queue)), "the route never saw its client leave"
        resume()  # the engine drops it when it comes to it
        while time.time() < deadline and (state.metrics.cancelled.values.get((), 0) <= before or loop.depth):
            time.sleep(0.05)
        time.sleep(0.2)  # the route's end, after the engine dropped the request
    assert state.metrics.cancelled.values.get((), 0) == before + 1 and loop.depth == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_suffix_speculation_over_http_learns_per_user_and_keeps_the_output(target, tokenizer):
    from types import SimpleNamespace

    from onlinespec.decode.suffix import SuffixCache
    from tests.tiny import perturbed

    class GuardSpy:  # records what the rollback guard is shown; swaps nothing
        choice = None
        seen: list = []
        stats = SimpleNamespace(refusals=0, rollbacks=0, swaps=0)

        def apply(self):
            return []

        def observe(self, drafter, version, drafted, accepted):
            self.seen.append((drafted, accepted))

    spy = GuardSpy()
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 1.0, seed=7), "bad", version=1),
                               tokenizer=tokenizer, config=EngineConfig(k=4, target_id=MODEL), suffix=SuffixCache())
    srv = BackgroundServer(build_state(engine, tokenizer, MODEL, watcher=spy, max_tokens=200)).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)

        def ask(user):
            resp = c.completions.create(model=MODEL, prompt="the same request again", max_tokens=40,
                                        temperature=0, user=user)
            return resp.choices[0].text, resp.model_extra["speculative"]

        first_text, first = ask("alice")
        other_text, other = ask("bob")
        again_text, again = ask("alice")
        assert first_text == other_text == again_text == target_greedy_text(target, tokenizer,
                                                                             "the same request again", 40)
        assert other["copied_accepted_tokens"] == first["copied_accepted_tokens"]  # bob never sees alice's text
        assert again["copied_accepted_tokens"] > first["copied_accepted_tokens"] + 5
        assert again["mean_accepted_length"] > first["mean_accepted_length"]
        # the guard is shown the drafter's own drafts only: all three requests' drafts minus the copies
        copied = sum(s["copied_tokens"] for s in (first, other, again))
        drafted = sum(s["drafted_tokens"] for s in (first, other, again))
        assert sum(d for d, _ in spy.seen) == drafted - copied
        text = httpx.get(srv.url + "/metrics").text
        assert 'onlinespec_spec_decode_num_copied_accepted_tokens_total{drafter="bad",version="1"}' in text
        assert "onlinespec_suffix_cache_tokens" in text
    finally:
        srv.stop()
