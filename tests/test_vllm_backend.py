"""``serving.engine: vllm``: the server run by vLLM (on the CPU), OnlineSpec's drafters inside it.

One server process (vLLM's own virtualenv, ``./run vllm-setup``) on the bundled demo pair, with
this session's Redis and a registry of its own; every test runs three times: vLLM's engine in the
server's process, in a process of its own, and with two tensor-parallel workers (the proposers then
reached by messages only). The tests run in the main virtualenv and judge
it from outside: greedy output equals the target alone and the embedded engine; the feedback
records it logs are the records the learners read (and learn from); a version published to the
registry, and a rollback, reach the drafts vLLM verifies through vLLM's weight-update API.

Without the vLLM virtualenv the module is skipped, except in CI (``CI=true``), where it fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from onlinespec.demo.prompts import load_prompts
from onlinespec.drafters.hf import HFDrafter
from onlinespec.feedback import keys
from onlinespec.feedback.stream import _decode_entry
from onlinespec.learn.learner import DrafterLearner, LearnerConfig
from onlinespec.learn.optim import OptimConfig
from onlinespec.learn.registry import Registry
from onlinespec.models import load_model, load_tokenizer
from onlinespec.redis_server import connect

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("ONLINESPEC_VLLM_PYTHON") or str(
    ROOT / os.environ.get("ONLINESPEC_VLLM_VENV", ".venv-vllm") / "bin" / "python")
TARGET_ID = "demo-vllm"  # its own feedback stream on the shared test Redis
DRAFTER = "drafter-1l"
K = 3


def _vllm_missing() -> str | None:
    if not Path(VLLM_PYTHON).exists():
        return f"no vLLM virtualenv at {VLLM_PYTHON} (./run vllm-setup)"
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm, onlinespec"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"vLLM does not import: {probe.stderr[-400:]}"


MODES = {  # serving.vllm settings, and the environment vLLM needs for them here
    "in_process": ("multiprocessing: false", {}),
    "multiprocessing": ("multiprocessing: true", {}),
    # two worker processes; vLLM's CPU backend binds each rank to a NUMA node of its own unless
    # told which cores to use (this machine has one node)
    "tensor_parallel": ("tensor_parallel_size: 2", {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
}


@pytest.fixture(scope="module", params=list(MODES))
def served(request, tmp_path_factory, redis_url):
    """The server on vLLM: its engine in the server's process (the proposer shares the server's
    drafters), in vLLM's own engine-core process, or with two tensor-parallel worker processes
    (each proposer there builds its drafters from the registry, and every call to it is a
    message)."""
    missing = _vllm_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI installs vLLM (.ci/run): {missing}")
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp / "service.yaml"
    config.write_text(f"""
target: {{id: {TARGET_ID}, model: "demo:target"}}
drafters:
  - {{id: {DRAFTER}, model: "demo:drafter-1l"}}
serving:
  port: {port}
  k: {K}
  max_tokens: 64
  max_prompt_tokens: 256
  engine: vllm
  vllm: {{num_speculative_tokens: {K}, kv_cache_memory_bytes: 268435456, {MODES[request.param][0]}}}
registry: {tmp / 'registry'}
""")
    client = connect(redis_url)
    client.delete(keys.feedback_stream(TARGET_ID))
    for pattern in (f"onlinespec:drafter:{DRAFTER}:*", f"onlinespec:learner:{DRAFTER}*", f"learners:{DRAFTER}"):
        for key in client.scan_iter(pattern):  # the other mode's run left its versions' pointers
            client.delete(key)
    env = {**os.environ, "REDIS_URL": redis_url, "ONLINESPEC_CONFIG": str(config), **MODES[request.param][1]}
    log = open(tmp / "server.log", "w")
    # a session of its own: vLLM's engine-core and worker processes are stopped with it, whatever happens
    proc = subprocess.Popen([VLLM_PYTHON, "-m", "serving"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited {proc.returncode}: {(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the vLLM server did not become ready: {(tmp / 'server.log').read_text()[-3000:]}")
    yield url, str(config), tmp / "registry", client
    proc.terminate()
    stopping = time.time()
    try:  # serving.stop_timeout (15 s) for requests in flight, as long for the stop, then it exits
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    took = time.time() - stopping
    # what ends on the server's exit may take a moment more: multiprocessing's resource tracker
    # (a `python` of the group) unlinks the shared memory vLLM's queues leaked once it sees EOF
    settle = time.time() + 10
    while (leftover := _group_alive(proc.pid)) and time.time() < settle:
        time.sleep(0.2)
    if leftover:  # the server left vLLM's processes behind (or hung): end them, then say so
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()
    client.close()
    if proc.returncode == 1:  # the stop deadline ended it: nothing left behind, but say what hung
        warnings.warn(f"the vLLM server's stop hit its deadline ({took:.0f} s); its log ends: "
                      f"{(tmp / 'server.log').read_text()[-4000:]}")
    assert not leftover, (f"{took:.0f} s after SIGTERM the server (exit {proc.returncode}) left processes "
                          f"behind: {leftover}; its log ends: {(tmp / 'server.log').read_text()[-4000:]}")


def _group_alive(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group."""
    out = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if line.split() and line.split()[0] == str(pgid) and not line.split()[2].startswith("Z")]


@pytest.fixture(scope="module")
def demo():
    tok = load_tokenizer("demo:target")
    return tok, load_model("demo:target"), load_model("demo:drafter-1l")


def prompts(tok, domain, n, offset=0):
    return [tok.encode(r.text)[-64:] for r in load_prompts(domain)[offset:offset + n]]


def complete(url, prompt, max_tokens=32, key=None, **kw) -> dict:
    body = {"model": TARGET_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def records(client) -> list:
    return [_decode_entry(fields) for _, fields in client.xrange(keys.feedback_stream(TARGET_ID))]


def test_greedy_output_through_vllm_equals_the_target_alone_and_the_embedded_engine(served, demo):
    url, _, _, _ = served
    tok, target, d1 = demo
    embedded = SpeculativeEngine(target, HFDrafter(d1, DRAFTER), tokenizer=tok, config=EngineConfig(k=K))
    drafted = accepted = 0
    batch = prompts(tok, "python", 3) + prompts(tok, "shakespeare", 3)
    with ThreadPoolExecutor(len(batch)) as pool:  # served together: vLLM batches, the drafter too
        served_out = list(pool.map(lambda p: complete(url, p, max_tokens=32, ignore_eos=True), batch))
    for prompt, out in zip(batch, served_out):
        alone = target.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                min_new_tokens=32)[0, len(prompt):].tolist()
        ours = embedded.generate(prompt, SamplingParams(max_new_tokens=32, ignore_eos=True)).tokens
        served_text = out["choices"][0]["text"]
        assert served_text == tok.decode(alone) == tok.decode(ours), (served_text, tok.decode(alone))
        spec = out["speculative"]
        assert spec["drafter_id"] == DRAFTER
        drafted += spec["own"]["drafted_tokens"]
        accepted += spec["own"]["accepted_tokens"]
    assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)  # vLLM verified our drafts
    # n choices are n vLLM requests: greedy, each is the same text
    many = complete(url, batch[0], max_tokens=32, ignore_eos=True, n=3)
    assert [c["text"] for c in many["choices"]] == [served_out[0]["choices"][0]["text"]] * 3
    assert many["usage"]["completion_tokens"] == 96 and len(many["speculative"]["choices"]) == 3
    # response_format: vLLM's own grammar backend holds the text to the schema, with our drafts verified
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "size"],
              "properties": {"ok": {"type": "boolean"}, "size": {"enum": [1, 2, 3]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    shaped = complete(url, batch[3], max_tokens=32, response_format=fmt)["choices"][0]
    value = json.loads(shaped["text"])
    assert shaped["finish_reason"] == "stop" and value["ok"] in (True, False) and value["size"] in (1, 2, 3)
    picked = complete(url, batch[3], max_tokens=12, structured_outputs={"choice": ["alpha", "beta gamma"]})
    assert picked["choices"][0]["text"] in ("alpha", "beta gamma")
    # echo with logprobs: the prompt's log-probs, as vLLM read it, are the target's
    echoed = complete(url, batch[2], max_tokens=4, ignore_eos=True, echo=True, logprobs=1)["choices"][0]
    with torch.inference_mode():
        lp = torch.log_softmax(target(torch.tensor([batch[2]])).logits[0, :-1].float(), dim=-1)
    expected = lp.gather(-1, torch.tensor(batch[2][1:])[:, None])[:, 0].tolist()
    head = tok.decode(batch[2])
    assert echoed["text"].startswith(head) and served_out[2]["choices"][0]["text"].startswith(echoed["text"][len(head):])
    assert echoed["logprobs"]["token_logprobs"][0] is None
    assert echoed["logprobs"]["token_logprobs"][1:len(batch[2])] == pytest.approx(expected, abs=1e-3)


def test_penalties_through_vllm_give_what_the_embedded_engine_gives(served, demo):
    """frequency, presence and repetition penalties and min_tokens reach vLLM's sampler (it verifies
    our drafts under them): the text is the embedded engine's under the same settings, not the plain one."""
    url = served[0]
    tok, target, d1 = demo
    embedded = SpeculativeEngine(target, HFDrafter(d1, DRAFTER), tokenizer=tok, config=EngineConfig(k=K))
    changed = 0
    for prompt, kw in zip(prompts(tok, "python", 3, offset=8), ({"frequency_penalty": 1.0}, {"presence_penalty": 1.5},
                                                                  {"repetition_penalty": 1.4})):
        out = complete(url, prompt, max_tokens=24, ignore_eos=True, **kw)["choices"][0]["text"]
        ours = embedded.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True, **kw)).tokens
        plain = embedded.generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)).tokens
        # the API's text leaves special tokens out, as both engines serve it (a penalty can make EOS the first token)
        assert out == tok.decode(ours, skip_special_tokens=True), (kw, out, tok.decode(ours))
        changed += ours != plain
    assert changed >= 2
    # allowed_token_ids: vLLM verifies our drafts within them, as the embedded engine does
    prompt = prompts(tok, "python", 1, offset=12)[0]
    allowed = sorted(set(embedded.generate(prompt, SamplingParams(max_new_tokens=24)).tokens[::2]) | {13, 14, 15})
    out = complete(url, prompt, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed)["choices"][0]["text"]
    ours = embedded.generate(prompt, SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                    allowed_token_ids=tuple(allowed))).tokens
    assert out == tok.decode(ours, skip_special_tokens=True) and set(ours) <= set(allowed), (out, tok.decode(ours))
    # min_tokens: no stop string ends within the first min_tokens tokens, in vLLM as in the embedded engine
    prompt = prompts(tok, "python", 1, offset=11)[0]
    tokens = embedded.generate(prompt, SamplingParams(max_new_tokens=48, ignore_eos=True)).tokens
    texts = [tok.decode(tokens[:i], skip_special_tokens=True) for i in range(len(tokens) + 1)]
    for stop in dict.fromkeys(texts[-1][i:i + 2] for i in range(2, len(texts[-1]) - 1)):  # one that recurs
        ends_at = next(i for i, t in enumerate(texts) if stop in t)
        if stop.strip() and texts[-1].find(stop, len(texts[ends_at + 2]) - 1) >= 0:
            break
    else:
        raise AssertionError("no 2-character stop string recurs in the reference text")
    ours = embedded.generate(prompt, SamplingParams(max_new_tokens=48, ignore_eos=True, stop=(stop,),
                                                    min_tokens=ends_at + 2))
    out = complete(url, prompt, max_tokens=48, ignore_eos=True, stop=[stop], min_tokens=ends_at + 2)
    assert out["choices"][0]["text"] == ours.text and len(ours.text) > len(texts[ends_at]), (stop, ours.text)
    # vLLM refuses logit_bias with speculative decoding: a 400 that says so, not a failed generation
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": TARGET_ID, "prompt": prompt, "max_tokens": 4, "logit_bias": {"5": 1.0}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text
    # streamed, that refusal comes after the 200 (vLLM finds it when the request is added): an
    # error event, then [DONE]; what the server can check first (token ids) is a 400 before it
    body = {"model": TARGET_ID, "prompt": prompt, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "logit_bias": {"5": 1.0}}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]", lines
    assert "logit_bias" in json.loads(lines[-2][6:])["error"]["message"], lines
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "prompt": [1, 10**6]}, timeout=60) as r:
        r.read()
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"], r.text


def test_vllm_feedback_records_are_the_records_the_learners_read(served, demo):
    url, _, _, client = served
    tok, target, _ = demo
    prompt = prompts(tok, "docs", 1, offset=3)[0]
    out = complete(url, prompt, max_tokens=24, ignore_eos=True)
    deadline = time.time() + 20
    while True:  # its record (the writer is asynchronous: an earlier test's may land after it)
        mine = [r for r in records(client) if r.tokens[:r.prompt_len].tolist() == prompt]
        if mine or time.time() > deadline:
            break
        time.sleep(0.2)
    assert len(mine) == 1
    record = mine[0]
    record.validate(vocab_size=target.config.vocab_size)
    generated = record.tokens[record.prompt_len:]
    assert record.tokens[:record.prompt_len].tolist() == prompt
    assert tok.decode(generated.tolist()) == out["choices"][0]["text"]
    assert (record.drafter_id, record.target_id) == (DRAFTER, TARGET_ID)
    spec = out["speculative"]
    # a position is "drafted" when a draft (the drafter's or a copy) stood there; drafts past a
    # rejection have no position
    assert 0 < spec["draft_steps"] <= int(record.drafted.sum()) <= spec["drafted_tokens"]
    assert int(record.accepted.sum()) == spec["accepted_tokens"]
    # the logged distribution is the target's own, position by position (raw log-softmax, top-K)
    with torch.no_grad():
        logits = target(torch.tensor([record.tokens.tolist()])).logits[0, record.prompt_len - 1:-1]
    logp = torch.log_softmax(logits.float(), -1)
    assert record.topk_ids[:, 0].tolist() == generated.tolist()  # greedy: the top-1 is what was emitted
    mine = np.take_along_axis(logp.numpy(), record.topk_ids.astype(np.int64), axis=1)
    assert np.abs(mine - record.topk_logprobs.astype(np.float32)).max() < 2e-2
    assert record.topk_ids.shape[1] == 32


def test_suffix_speculation_copies_what_a_tenant_was_already_served(served, demo):
    """The second time a tenant (an API key) asks the same, vLLM verifies copies of the first answer;
    another tenant's request copies only from its own text."""
    url, _, _, _ = served
    tok, target, _ = demo
    prompt = prompts(tok, "docs", 1, offset=9)[0]
    first = complete(url, prompt, max_tokens=24, ignore_eos=True, key="key-a")
    again = complete(url, prompt, max_tokens=24, ignore_eos=True, key="key-a")
    other = complete(url, prompt, max_tokens=24, ignore_eos=True, key="key-b")
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == other["choices"][0]["text"]
    copied = again["speculative"]["copied"]
    assert copied["accepted_tokens"] >= 15, again["speculative"]  # of 24, k = 3: 3 a step, the 4th the target's
    # the other tenant, like the first request, copies only from its own text: fewer
    for alone in (first, other):
        assert alone["speculative"]["copied"]["accepted_tokens"] < copied["accepted_tokens"], alone["speculative"]


def test_a_cache_salt_keeps_vllms_prefix_cache_apart(served, demo):
    """``cache_salt`` reaches vLLM: the same prompt under another salt is read whole again, under
    the same salt its beginning comes from vLLM's prefix cache."""
    url = served[0]
    tok = demo[0]
    prompt = [t for p in prompts(tok, "docs", 6, offset=20) for t in p][:240]  # whole blocks of vLLM's cache

    def cached(salt):
        return complete(url, prompt, max_tokens=2, cache_salt=salt)["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("first salt") == 0
    assert cached("first salt") > 0
    assert cached("second salt") == 0


def test_the_learners_improve_on_what_vllm_logged(served, demo):
    """Records served by vLLM (sampled, temperature 1) train the drafter as the embedded engine's do."""
    url, _, _, client = served
    tok, _, d1 = demo
    start = len(records(client))
    ps = prompts(tok, "shakespeare", 54, offset=40)
    for i, p in enumerate(ps):
        complete(url, p, max_tokens=32, temperature=1.0, seed=i, ignore_eos=True)
    # the writer is asynchronous: a record of the previous test may land after ``start`` was read
    sent = {tuple(p) for p in ps}

    def ours():
        return [r for r in records(client)[start:] if tuple(r.tokens[:r.prompt_len].tolist()) in sent]

    deadline = time.time() + 30
    while len(ours()) < len(ps) and time.time() < deadline:
        time.sleep(0.2)
    logged = ours()
    assert len(logged) == len(ps)
    learner = DrafterLearner(load_model("demo:drafter-1l"), LearnerConfig(
        optim=OptimConfig(lr=1e-4, hint="last", adaptive=True, max_grad_norm=1.0)))
    heldout, train = logged[:6], logged[6:]
    before = learner.evaluate(heldout)["mean_alpha"]
    for r in range(6):
        learner.round(train[r * 8:(r + 1) * 8])
    after = learner.evaluate(heldout)["mean_alpha"]
    print(f"held-out acceptance of vLLM-served records: {before:.3f} -> {after:.3f}")
    assert after > before + 0.02, (before, after)


def served_with(url: str, prompt: list[int], version: int, seconds: float = 60) -> dict:
    """Ask until a response says drafter ``version`` served it (or ``seconds`` pass): the last response."""
    deadline = time.time() + seconds
    while True:
        out = complete(url, prompt, max_tokens=24, ignore_eos=True)
        if out["speculative"]["drafter_version"] == version or time.time() > deadline:
            return out
        time.sleep(0.5)


def test_a_published_version_reaches_the_drafts_vllm_verifies(served, demo):
    """A version that drafts nothing the target says (every weight zero: it always proposes id 0)
    serves from the next requests: its drafts are all rejected, the output stays the target's."""
    url, config, registry_dir, client = served
    tok, target, _ = demo
    registry = Registry(str(registry_dir), client)
    parent = registry.latest(DRAFTER)
    prompt = prompts(tok, "python", 1, offset=5)[0]
    # the parent serves first: run alone, this test used to count the server's first transfer of it
    assert served_with(url, prompt, parent)["speculative"]["drafter_version"] == parent
    before = vllm_counters(url)
    updates = metric(url, "onlinespec_vllm_drafter_weight_updates_total")
    broken = load_model("demo:drafter-1l")
    with torch.no_grad():
        for p in broken.parameters():
            p.zero_()
    version = registry.publish(DRAFTER, broken, parent=parent).version
    alone = target.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                            min_new_tokens=24)[0, len(prompt):].tolist()
    out = served_with(url, prompt, version)
    spec = out["speculative"]
    assert spec["drafter_version"] == version, spec
    assert spec["own"]["drafted_tokens"] > 0 and spec["own"]["accepted_tokens"] == 0, spec
    assert out["choices"][0]["text"] == tok.decode(alone)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    line = (f'onlinespec_spec_decode_num_own_accepted_tokens_total{{drafter="{DRAFTER}",version="{version}"}} 0')
    assert line in metrics, [m for m in metrics.splitlines() if "accepted_tokens_total" in m]
    assert f'onlinespec_spec_decode_num_own_draft_tokens_total{{drafter="{DRAFTER}",version="{version}"}}' in metrics
    # vLLM's own counters (its scheduler's view of the drafts it verified) saw the same
    after = vllm_counters(url)
    assert after["drafted"] > before["drafted"] and after["accepted"] >= before["accepted"], (before, after)
    assert after["drafted"] - before["drafted"] >= spec["drafted_tokens"]
    # it came through vLLM's weight-update API (the onlinespec transfer backend), copied in place
    assert metric(url, "onlinespec_vllm_drafter_weight_updates_total") == updates + 1

    # rolled back (what the guard or an operator does): the parent's weights reach vLLM the same way
    registry.rollback(DRAFTER, parent, reason="test", expect=version)
    out = served_with(url, prompt, parent)
    spec = out["speculative"]
    assert spec["drafter_version"] == parent and spec["own"]["accepted_tokens"] > 0, spec
    assert out["choices"][0]["text"] == tok.decode(alone)
    assert metric(url, "onlinespec_vllm_drafter_weight_updates_total") == updates + 2


def metric(url, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def vllm_counters(url) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {"drafted": 0.0, "accepted": 0.0}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_draft_tokens_total"):
            out["drafted"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:spec_decode_num_accepted_tokens_total"):
            out["accepted"] += float(line.rsplit(" ", 1)[1])
    return out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
