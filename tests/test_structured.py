"""Structured output (``response_format``): every token within what the JSON schema allows, and
the text exactly what the target alone writes under the same constraint, drafts or not.

The reference is a plain loop over the target that asks llguidance's matcher directly which
tokens it allows (``compute_logit_bias``), independent of :mod:`onlinespec.decode.grammar`.
A random target writes nonsense, but nonsense within the schema: bounded fields make the JSON
complete in a few tokens."""

import json

import numpy as np
import pytest
import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.grammar import JSON_OBJECT, Structure
from onlinespec.decode.sampling import PositionNoise, SamplingParams, noisy_argmax
from onlinespec.decode.stops import FinishReason
from onlinespec.decode.suffix import SuffixCache
from onlinespec.drafters.hf import HFDrafter
from onlinespec.errors import InvalidRequestError
from onlinespec.models import load_tokenizer
from tests.test_batch import drive
from tests.tiny import perturbed, tiny_llama

SCHEMA = Structure("json", json.dumps({"type": "object", "additionalProperties": False, "required": ["ok", "color", "size"],
                     "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                    "size": {"enum": [1, 2, 3]}}}))
ANY_OBJECT = Structure("json", JSON_OBJECT)


@pytest.fixture(scope="module")
def pair():
    """A random target over the demo tokenizer (byte-level BPE, 4096 tokens: llguidance reads it)."""
    tok = load_tokenizer("demo:target")
    return tok, tiny_llama(vocab=4096, seed=7)


def prompts(tok):
    return [tok.encode(t) for t in ("Answer in JSON:", "The settings are", "def f(x):", "Once upon a time")]


@torch.inference_mode()
def constrained(target, tok, prompt, structure, n, params=None):
    """The target alone under the structure: its argmax (or a seeded Gumbel-max draw) among the
    tokens the matcher allows, until the matcher stops, EOS, or ``n`` tokens."""
    import llguidance
    import llguidance.hf

    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tok, n_vocab=4096, eos_token=[0]),
                                   structure.grammar())
    noise = PositionNoise(params.seed, 4096) if params is not None else None
    tokens = list(prompt)
    for _ in range(n):
        logits = target(torch.tensor([tokens])).logits[0, -1].float()
        allowed = torch.from_numpy(np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8).copy()) > 0
        logits[~allowed] = float("-inf")
        token = int(logits.argmax()) if noise is None else int(noisy_argmax(logits, params, noise.at(len(tokens))))
        tokens.append(token)
        assert matcher.consume_token(token)
        if token == 0 or matcher.is_stopped():
            break
    return tokens[len(prompt):]


@pytest.mark.parametrize("k", [4, None], ids=["k4", "adaptive"])
def test_a_schema_s_text_is_the_constrained_target_s_through_drafted_blocks(pair, k):
    tok, target = pair
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), tokenizer=tok,
                               config=EngineConfig(k=k), suffix=SuffixCache())
    drafted = []
    for prompt in prompts(tok):
        result = engine.generate(prompt, SamplingParams(max_new_tokens=40, structure=SCHEMA))
        assert result.tokens == constrained(target, tok, prompt, SCHEMA, 40)
        assert result.finish_reason is FinishReason.STOP
        value = json.loads(result.text)  # complete, and what the schema says
        assert value["ok"] in (True, False) and value["color"] in ("red", "green", "blue") and value["size"] in (1, 2, 3)
        drafted.append(result.stats.drafted)
    # a fixed k drafts in every request; the adaptive controller decides on measured costs and a
    # draw from its posterior, and on a busy machine it once drafted nothing in one 20-step request
    assert all(drafted) if k else sum(drafted) > 0, drafted


def test_any_object_beside_free_requests_in_one_batch(pair):
    """response_format json_object in a batch with an unconstrained request: each as alone."""
    tok, target = pair
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), tokenizer=tok,
                               config=EngineConfig(k=3))
    ps = prompts(tok)[:3]
    gens = [engine.start(ps[0], SamplingParams(max_new_tokens=24, structure=ANY_OBJECT)),
            engine.start(ps[1], SamplingParams(max_new_tokens=24)),
            engine.start(ps[2], SamplingParams(max_new_tokens=24, structure=SCHEMA))]
    drive(Batch(engine, slots=3, prefill_tokens=8), list(gens))
    assert gens[0].generated == constrained(target, tok, ps[0], ANY_OBJECT, 24)
    assert tok.decode(gens[0].generated).startswith("{")
    plain = SpeculativeEngine(target, None, tokenizer=tok).generate(ps[1], SamplingParams(max_new_tokens=24))
    assert gens[1].generated == plain.tokens
    assert gens[2].generated == constrained(target, tok, ps[2], SCHEMA, 24)


def test_a_regex_and_a_choice_through_drafted_blocks(pair):
    """vLLM's regex and choice: the text matches the regex whole, or is one of the choices."""
    import re

    tok, target = pair
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), tokenizer=tok,
                               config=EngineConfig(k=4), suffix=SuffixCache())
    regex = Structure("regex", r"(ok|fail): [0-9]{2,4}")
    choice = Structure.choice(["positive", "negative", "neither of them"])
    for prompt in prompts(tok)[:3]:
        for structure in (regex, choice):
            result = engine.generate(prompt, SamplingParams(max_new_tokens=30, structure=structure))
            assert result.tokens == constrained(target, tok, prompt, structure, 30)
            assert result.finish_reason is FinishReason.STOP
        assert re.fullmatch(r"(ok|fail): [0-9]{2,4}", engine.generate(
            prompt, SamplingParams(max_new_tokens=30, structure=regex)).text)
        assert engine.generate(prompt, SamplingParams(max_new_tokens=30, structure=choice)).text in choice.texts()


def test_drafts_are_made_within_the_schema(pair):
    """A drafter that is the target itself drafts what the constrained target writes: every draft
    is accepted (drafting freely, it would propose what the schema rules out)."""
    tok, target = pair
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.0, seed=1), "same"), tokenizer=tok,
                               config=EngineConfig(k=4))
    for prompt in prompts(tok)[:2]:
        result = engine.generate(prompt, SamplingParams(max_new_tokens=40, structure=SCHEMA))
        assert result.tokens == constrained(target, tok, prompt, SCHEMA, 40)
        assert result.stats.drafted > 0 and result.stats.accepted == result.stats.drafted


def test_a_seeded_sample_within_the_schema_is_the_target_alone_s(pair):
    tok, target = pair
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d"), tokenizer=tok,
                               config=EngineConfig(k=4))
    params = SamplingParams(max_new_tokens=40, temperature=0.9, seed=11, structure=SCHEMA)
    for prompt in prompts(tok)[:2]:
        assert engine.generate(prompt, params).tokens == constrained(target, tok, prompt, SCHEMA, 40, params)


def test_what_cannot_be_followed_is_refused(pair, target, tokenizer):
    tok, model = pair
    engine = SpeculativeEngine(model, None, tokenizer=tok)
    with pytest.raises(InvalidRequestError, match="Invalid type: nonsense"):
        engine.start([1, 2], SamplingParams(structure=Structure("json", '{"type": "nonsense"}')))
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        engine.start([1, 2], SamplingParams(structure=Structure("json", "{not json")))
    with pytest.raises(InvalidRequestError, match="unclosed character class"):
        engine.start([1, 2], SamplingParams(structure=Structure("regex", "([a-")))
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_new_tokens=8, min_tokens=2, structure=ANY_OBJECT)
    structured = engine.structured()  # compiled once, then copied for each request
    assert structured.prepare(SCHEMA) is structured.prepare(SCHEMA)
    first, second = structured.start(SCHEMA), structured.start(SCHEMA)
    first.advance(tok.encode("{")[0])
    assert first.matcher is not second.matcher and second.matcher.validate_tokens(tok.encode("{")) == 1
    with pytest.raises(InvalidRequestError, match="tokenizer"):  # a tokenizer llguidance cannot read
        SpeculativeEngine(target, None, tokenizer=tokenizer).start([1, 2], SamplingParams(structure=ANY_OBJECT))


@pytest.fixture(scope="module")
def server(pair):
    from serving.server import BackgroundServer, build_state

    tok, target = pair
    engine = SpeculativeEngine(target, HFDrafter(perturbed(target, 0.1, seed=3), "d", version=1), tokenizer=tok,
                               config=EngineConfig(k=4, target_id="json-target"), suffix=SuffixCache())
    srv = BackgroundServer(build_state(engine, tok, "json-target", max_tokens=64)).start()
    yield srv
    srv.stop()


def test_response_format_through_the_api_streamed_or_not(server, pair):
    import httpx
    import openai

    tok, target = pair
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "settings", "schema": json.loads(SCHEMA.spec), "strict": True}}
    prompt = "Answer in JSON:"
    expected = tok.decode(constrained(target, tok, tok.encode(prompt), SCHEMA, 40), skip_special_tokens=True)
    resp = client.completions.create(model="json-target", prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"response_format": fmt})
    assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
    assert set(json.loads(resp.choices[0].text)) == {"ok", "color", "size"}
    pieces = [c.choices[0].text for c in client.completions.create(
        model="json-target", prompt=prompt, max_tokens=40, temperature=0, stream=True,
        extra_body={"response_format": fmt}) if c.choices]
    assert "".join(pieces) == expected
    chat = client.chat.completions.create(model="json-target", messages=[{"role": "user", "content": "JSON please"}],
                                          max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert chat.choices[0].message.content.startswith("{")
    # vLLM's structured_outputs, and its older guided_* fields
    choices = ["positive", "negative", "neither of them"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        resp = client.completions.create(model="json-target", prompt=prompt, max_tokens=12, temperature=0,
                                         extra_body=extra)
        assert resp.choices[0].text in choices and resp.choices[0].finish_reason == "stop"
    resp = client.completions.create(model="json-target", prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert resp.choices[0].text.isdigit() and len(resp.choices[0].text) == 3
    for fmt, words in (({"type": "json_schema"}, "needs json_schema"), ({"type": "xml"}, "response_format"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                        "Invalid type: nonsense"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
                           "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}}},
                        "more than 65536"),
                       ):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": "json-target", "prompt": "x", "max_tokens": 4, "response_format": fmt})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    for extra, words in (({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "takes one of"),
                         ({"structured_outputs": {"grammar": "start: x"}}, "grammar"),
                         ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "give one of"),
                         ({"guided_choice": ["a", ""]}, "non-empty strings"),
                         ({"structured_outputs": {"regex": "([a-"}}, "unclosed character class")):
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": "json-target", "prompt": "x", "max_tokens": 4, **extra})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (extra, r.text)
