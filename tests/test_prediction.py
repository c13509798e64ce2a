"""Predicted outputs (OpenAI's ``prediction``): drafts from the client's expected text, the output
exactly the target's whatever the prediction says, and what came of the prediction in usage."""

import json
import re

import httpx
import pytest
import torch

from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.prediction import Prediction
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import SuffixCache
from onlinespec.drafters.hf import HFDrafter
from onlinespec.errors import InvalidRequestError
from serving.server import BackgroundServer, build_state
from tests.test_batch import drive
from tests.test_engine_greedy import hf_greedy, prompts
from tests.tiny import VOCAB, perturbed

N = 40


def test_the_prediction_is_followed_from_its_beginning_and_picked_up_after_an_edit():
    predicted = [5, 6, 7, 8, 9, 10, 11, 12]
    p = Prediction(predicted)
    assert [p.propose(predicted[:i]) for i in range(8)] == predicted
    assert p.propose(predicted) is None  # past its end nothing follows
    assert p.propose([5, 6, 99]) is None  # an edit: no n-gram of the answer's end is in it...
    assert p.propose([5, 6, 99, 8, 9]) == 10  # ...until the answer takes it up again
    repeated = Prediction([1, 2, 3, 1, 2, 4, 1, 2, 5])
    assert repeated.propose([0, 1, 2]) in (3, 4, 5)
    repeated.cursor = 4
    assert repeated.propose([0, 1, 2]) == 4  # the occurrence at or past where the answer left it
    repeated.block = [0, 1, 2]
    assert repeated.settle(2) == (3, 2) and repeated.block == []  # 2 accepted, 1 rejected


def _engine(target, drafter=None, suffix=False, k=4):
    return SpeculativeEngine(target, HFDrafter(drafter, "d") if drafter is not None else None,
                             config=EngineConfig(k=k), suffix=SuffixCache() if suffix else None)


@pytest.mark.parametrize("k", [4, None], ids=["k4", "adaptive"])
def test_a_right_prediction_is_drafted_whole_and_the_text_is_the_targets(target, k):
    """No drafter, no suffix speculation: the prediction alone drafts. The target's own answer as
    the prediction has every draft accepted, in a few steps; the answer edited in two places is
    taken up again after each edit; a prediction of noise drafts nothing that is accepted. In
    every case the text is the target's alone (Hugging Face greedy)."""
    engine = _engine(target, k=k)
    prompt = prompts(1, seed=21)[0]
    alone = hf_greedy(target, prompt, N)
    assert len(alone) == N, "the reference must not stop early (else the prediction is short)"
    right = engine.generate(prompt, SamplingParams(max_new_tokens=N, prediction=tuple(alone)))
    assert right.tokens == alone
    assert right.stats.copied == right.stats.accepted == right.stats.drafted >= (N // 2 if k else 5)
    # at k = 4 a step takes 5 tokens; the adaptive length follows measured costs (timing), so less is asked
    assert right.stats.steps <= (N // 2 if k else N - 5), right.stats.steps
    edited = list(alone)
    edited[10], edited[25] = edited[10] % (VOCAB - 1) + 1, (edited[25] + 6) % (VOCAB - 1) + 1
    gen = engine.start(prompt, SamplingParams(max_new_tokens=N, prediction=tuple(edited)))
    while not gen.finished:
        gen.step()
    assert gen.generated == alone
    accepted, rejected = gen.stats.predicted_accepted, gen.stats.predicted - gen.stats.predicted_accepted
    assert accepted > (N // 2 if k else 5) and rejected >= (2 if k else 0)
    assert accepted == gen.stats.copied_accepted
    noise = torch.randint(1, VOCAB, (N,), generator=torch.Generator().manual_seed(3)).tolist()
    wrong = engine.generate(prompt, SamplingParams(max_new_tokens=N, prediction=tuple(noise)))
    assert wrong.tokens == alone and wrong.stats.accepted <= 2


def test_predictions_in_a_batch_beside_drafters_and_suffix_copies_and_a_seeded_sample(target):
    """Rows with and without predictions, a drafter and suffix speculation in one batch: each
    text is its own alone (greedy: the target's; seeded: the same seed without a prediction)."""
    engine = _engine(target, perturbed(target, 0.1, seed=3), suffix=True)
    ps = prompts(4, seed=22)
    alone = [hf_greedy(target, p, N) for p in ps]
    seeded = SamplingParams(max_new_tokens=N, temperature=0.9, seed=4, ignore_eos=True)
    reference = engine.generate(ps[3], seeded).tokens
    gens = [engine.start(ps[0], SamplingParams(max_new_tokens=N, prediction=tuple(alone[0]))),
            engine.start(ps[1], SamplingParams(max_new_tokens=N, prediction=tuple(alone[0]))),  # another's
            engine.start(ps[2], SamplingParams(max_new_tokens=N)),
            engine.start(ps[3], SamplingParams(max_new_tokens=N, temperature=0.9, seed=4, ignore_eos=True,
                                               prediction=tuple(reference[:20] + [7] * 20)))]
    drive(Batch(engine, slots=4, prefill_tokens=16), list(gens))
    for gen, want in zip(gens, alone[:3] + [reference]):
        assert gen.generated == want
    assert gens[0].stats.predicted_accepted > N // 2
    assert gens[3].stats.predicted_accepted > 0


def test_prediction_ids_outside_the_vocabulary_are_refused(target):
    with pytest.raises(InvalidRequestError, match="prediction"):
        _engine(target).start([1, 2], SamplingParams(prediction=(3, 10**7)))


@pytest.fixture(scope="module")
def server(target, tokenizer):
    engine = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(target_id="tiny-target"),
                               suffix=SuffixCache())
    srv = BackgroundServer(build_state(engine, tokenizer, "tiny-target", max_tokens=64, max_prompt_tokens=64)).start()
    yield srv
    srv.stop()


def test_prediction_over_http_says_what_came_of_it(server):
    """Chat and completions take OpenAI's ``prediction`` (text or text parts); the answer is the
    same with it, and ``usage.completion_tokens_details`` says how many predicted tokens were
    accepted and rejected."""
    body = {"model": "tiny-target", "max_tokens": 30, "temperature": 0, "ignore_eos": True, "k": 4}
    chat = {**body, "messages": [{"role": "user", "content": "tell me"}]}
    plain = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    text = plain["choices"][0]["message"]["content"]
    assert "completion_tokens_details" not in plain["usage"]
    for prediction in ({"type": "content", "content": text},
                       {"type": "content", "content": [{"type": "text", "text": text[:10]},
                                                      {"type": "text", "text": text[10:]}]}):
        r = httpx.post(server.url + "/v1/chat/completions", json={**chat, "prediction": prediction}, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"] == text
        details = out["usage"]["completion_tokens_details"]
        assert 15 <= details["accepted_prediction_tokens"] <= 29, details
        spec = out["speculative"]
        assert spec["predicted"]["accepted_tokens"] == details["accepted_prediction_tokens"]
        assert spec["predicted"]["drafted_tokens"] == details["accepted_prediction_tokens"] + \
            details["rejected_prediction_tokens"]
        assert spec["copied"]["accepted_tokens"] >= spec["predicted"]["accepted_tokens"]
    completion = {**body, "prompt": "abc"}
    want = httpx.post(server.url + "/v1/completions", json=completion, timeout=60).json()["choices"][0]["text"]
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={**completion, "prediction": {"type": "content", "content": "zz" + want[3:]}, "stream": True,
                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["text"] for c in map(json.loads, chunks) for c in c["choices"]) == want
    assert "completion_tokens_details" in json.loads(chunks[-1])["usage"]
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    drafted, accepted = (float(re.search(rf"^onlinespec_spec_decode_num_predicted{what}_tokens_total (\S+)$", metrics,
                                         re.M).group(1)) for what in ("", "_accepted"))
    assert drafted >= accepted >= 30  # the two chats' accepted predicted tokens at least
    for prediction, words in (({"type": "content", "content": "x" * 2000}, "prediction"),
                              ({"type": "other", "content": "x"}, "prediction"),
                              ({"type": "content", "content": [{"type": "image_url"}]}, "text")):
        r = httpx.post(server.url + "/v1/chat/completions", json={**chat, "prediction": prediction}, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
