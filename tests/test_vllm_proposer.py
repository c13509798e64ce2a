"""OnlineSpec's vLLM proposer, driven through vLLM's custom-class protocol without vLLM.

vLLM calls ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`` after each step:
each row emitted the accepted prefix of its drafts plus one token of the target's. Here a greedy
target plays vLLM's part (accept while the draft is its argmax), on tiny models, several requests
batched, joining and leaving. The proposer must draft exactly what its drafter alone drafts after
each text, and keep the per-step log the feedback record is built from.
"""

from types import SimpleNamespace

import numpy as np
import torch

from onlinespec.drafters.hf import HFDrafter
from onlinespec.vllm_backend.proposer import OnlineSpecProposer
from tests.tiny import perturbed, tiny_llama

MAX_LEN = 128


def greedy(model, tokens: list[int], n: int) -> list[int]:
    out = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(tokens):]


class FakeVllm:
    """The batch vLLM would hold: request ids per row, token_ids_cpu, num_tokens_no_spec."""

    def __init__(self, target, k: int):
        self.target = target
        self.proposer = OnlineSpecProposer(SimpleNamespace(
            speculative_config=SimpleNamespace(num_speculative_tokens=k),
            scheduler_config=SimpleNamespace(max_num_seqs=4), model_config=SimpleNamespace(max_model_len=MAX_LEN)))
        self.proposer.runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=[]))
        self.texts: dict[str, list[int]] = {}
        self.drafts: dict[str, list[int]] = {}
        self.preempted: set[str] = set()  # not in vLLM's batch this step (their drafts dropped)

    def add(self, rid, prompt, drafter, k):
        self.proposer.assign(rid, drafter, k)
        self.texts[rid] = list(prompt)
        self.drafts[rid] = []

    def step(self) -> dict[str, list[int]]:
        """Verify every row's drafts (greedy target), emit, and ask for the next drafts."""
        ids = [r for r in self.texts if r not in self.preempted]
        for rid in self.preempted:
            self.drafts[rid] = []
        emitted = []
        for rid in ids:
            want = greedy(self.target, self.texts[rid], len(self.drafts[rid]) + 1)
            n = 0
            while n < len(self.drafts[rid]) and self.drafts[rid][n] == want[n]:
                n += 1
            emitted.append(want[: n + 1])
            self.texts[rid] += want[: n + 1]
        tokens = np.zeros((len(ids), MAX_LEN), np.int32)
        for i, rid in enumerate(ids):
            tokens[i, : len(self.texts[rid])] = self.texts[rid]
        self.proposer.runner.input_batch.req_ids = ids
        out = self.proposer.propose(emitted, np.array([len(self.texts[r]) for r in ids]), tokens)
        self.drafts.update(zip(ids, out))
        return dict(zip(ids, emitted))

    def finish(self, rid):
        del self.texts[rid], self.drafts[rid]
        return self.proposer.finish(rid)


def test_the_proposer_drafts_what_its_drafter_alone_drafts_and_logs_every_block():
    target = tiny_llama(layers=2, hidden=64, seed=0)
    a = HFDrafter(perturbed(target, 0.05, seed=1), "a", version=3)
    b = HFDrafter(perturbed(target, 0.3, seed=2), "b", version=1)
    vllm = FakeVllm(target, k=4)
    rng = np.random.default_rng(0)
    prompts = {f"r{i}": rng.integers(1, 60, size=5 + 3 * i).tolist() for i in range(4)}
    drafters = {"r0": a, "r1": b, "r2": a, "r3": None}
    vllm.add("r0", prompts["r0"], a, 4)
    vllm.add("r1", prompts["r1"], b, 2)
    steps = {}
    for step in range(12):
        if step == 3:  # joins while the others are mid-way
            vllm.add("r2", prompts["r2"], a, 3)
            vllm.add("r3", prompts["r3"], None, 4)
        emitted = vllm.step()
        for rid, toks in emitted.items():
            steps.setdefault(rid, []).append(len(toks))
        for rid, drafts in vllm.drafts.items():
            d, k = drafters[rid], {"r0": 4, "r1": 2, "r2": 3, "r3": 0}[rid]
            expected = greedy(d.model, vllm.texts[rid], k) if d is not None else []
            assert drafts == expected, (step, rid)
        if step == 7:
            log = vllm.finish("r1")  # leaves: the others keep their rows
            assert log.drafter_id == "b" and log.drafter_version == 1
    texts = {rid: list(t) for rid, t in vllm.texts.items()}
    logs = {rid: vllm.finish(rid) for rid in list(vllm.texts)}
    assert logs["r3"].drafted == 0 and all(not d for d, _, _ in logs["r3"].blocks)
    for rid in ("r0", "r2"):
        log = logs[rid]
        assert [n for _, n, _ in log.blocks] == steps[rid]  # one block per step, what it emitted
        assert sum(steps[rid]) == len(texts[rid]) - len(prompts[rid])
        assert log.blocks[0][0] == [] and all(acc == n - 1 for d, n, acc in log.blocks if d)
        assert log.mismatches == 0
        assert log.start == len(prompts[rid])  # its first block is its first generated token
    assert logs["r0"].accepted > 0  # the close drafter is accepted: the bookkeeping is exercised
    assert logs["r0"].drafted > logs["r0"].accepted


def test_preempted_requests_give_their_rows_back_and_rejoin():
    """vLLM runs at most max_num_seqs requests (4 here); one it preempts leaves the proposer's
    rows, so a fifth can draft, and drafts right when it returns."""
    target = tiny_llama(layers=2, hidden=64, seed=0)
    d = HFDrafter(perturbed(target, 0.05, seed=1), "a")
    vllm = FakeVllm(target, k=3)
    for i in range(4):
        vllm.add(f"r{i}", [3 + i, 5, 7, 11, 13], d, 3)
    for step in range(8):
        if step == 2:
            vllm.preempted.add("r1")
        if step == 3:
            vllm.add("r4", [9, 8, 7, 6], d, 3)  # the fifth: r1's row is free
        if step == 6:  # the fifth finished: the first comes back
            vllm.finish("r4")
            vllm.preempted.discard("r1")
        vllm.step()
        for rid, drafts in vllm.drafts.items():
            if rid not in vllm.preempted:
                assert drafts == greedy(d.model, vllm.texts[rid], 3), (step, rid)
    log = vllm.finish("r1")
    # steps 0-1 and 6-7 ran; its drafts of step 1 were dropped by the preemption, not rejected
    assert [len(d) for d, _, _ in log.blocks] == [0, 3, 0, 3] and log.mismatches == 0


def test_take_reports_each_step_once():
    target = tiny_llama(layers=2, hidden=64, seed=0)
    vllm = FakeVllm(target, k=3)
    vllm.add("r", [5, 6, 7, 8], HFDrafter(perturbed(target, 0.05, seed=1), "a"), 3)
    vllm.step()
    assert vllm.proposer.take("r") == []  # the first step verified nothing
    vllm.step()
    first = vllm.proposer.take("r")
    assert len(first) == 1 and first[0][0] == 3 and 0 <= first[0][1] <= 3
    assert vllm.proposer.take("r") == []
    assert vllm.proposer.take("unknown") == []


def expected(accept: float, k: int) -> float:
    """Tokens a row emits from k drafts accepted each with probability ``accept``, plus one."""
    return sum(accept ** i for i in range(k + 1))


def simulate(controller, batch, copied, a_copy, a_model, draft_cost, verify_cost, steps=600, seed=0):
    """Steps of ``batch`` rows, a share ``copied`` of them with copies (always 3 of them, each
    position accepted with probability ``a_copy``), the rest drafted by the model with the length
    the controller chose (each position accepted with probability ``a_model``). A step costs 0.1 s,
    plus ``verify_cost`` per draft token verified, plus ``draft_cost`` per position the model
    drafts, times a noise factor. Returns the length chosen most often over the last half."""
    rng = np.random.default_rng(seed)

    def block(a, k):  # accepted drafts of k, each position accepted with probability a
        n = 0
        while n < k and rng.random() < a:
            n += 1
        return n

    counts = {}
    rows_copy = round(batch * copied)
    rows_model = batch - rows_copy
    for step in range(steps):
        copies = [int(rng.integers(1, 4)) if rng.random() < 0.8 else 0 for _ in range(rows_copy)]  # what matched
        k = controller.choose(batch, rows_model, copied=sum(copies))
        others = sum(1 + block(a_copy, c) for c in copies)
        blocks = [(k, block(a_model, k)) for _ in range(rows_model)] if k else []
        drafter_seconds = draft_cost * k * rng.uniform(0.9, 1.1)
        verify = (0.1 + verify_cost * (sum(copies) + k * rows_model)) * rng.uniform(0.8, 1.25)
        controller.observe(batch, k, verify + drafter_seconds, others, blocks, drafts=sum(copies) + k * rows_model,
                           drafter_seconds=drafter_seconds)
        if step >= steps // 2:
            counts[k] = counts.get(k, 0) + 1
    return max(counts, key=counts.get)


def test_step_k_mutes_the_drafter_where_drafting_measured_slower_and_drafts_where_it_pays():
    from onlinespec.vllm_backend.steps import StepK

    # a weak drafter: muted (its rows decode plainly)
    assert simulate(StepK(3), 8, 0.0, 0.0, 0.06, draft_cost=0.01, verify_cost=0.002) == 0
    # a good drafter, cheap drafts: the longest length
    assert simulate(StepK(3), 8, 0.0, 0.0, 0.8, draft_cost=0.003, verify_cost=0.001) == 3
    # copies accepted on half the rows (their tokens vary a lot from step to step) do not make a
    # weak drafter look good, nor hide a good one
    assert simulate(StepK(3), 8, 0.5, 0.9, 0.06, draft_cost=0.01, verify_cost=0.001) == 0
    assert simulate(StepK(3), 8, 0.5, 0.6, 0.8, draft_cost=0.003, verify_cost=0.001) == 3
    # each batch size is judged on its own: the model pays at 1 row but not at 16
    both = StepK(3)
    assert simulate(both, 1, 0.0, 0.0, 0.6, draft_cost=0.003, verify_cost=0.001) > 0
    assert simulate(both, 16, 0.0, 0.0, 0.6, draft_cost=0.01, verify_cost=0.006) == 0


def test_step_k_measures_the_drafters_acceptance_the_cost_of_drafts_and_ignores_idle_gaps():
    from onlinespec.vllm_backend.steps import StepK

    c = StepK(1, explore=0.0)
    for i in range(6):
        c.observe(4, 0, 0.1 + 0.01 * i, 0, drafts=i)  # copies of 0-5 tokens: 10 ms each to verify
        c.observe(4, 1, 0.15 + 0.01 * i, 0, [(1, 1), (1, 1), (1, 0), (1, 1)], drafts=i + 4, drafter_seconds=0.01)
    assert 0.7 < c.acceptance < 0.8  # pulled from the prior (0.3) to the drafts' 0.75
    assert abs(c.cost[4].at(0) - 0.1) < 1e-6 and abs(c.cost[4].at(10) - 0.2) < 1e-6  # 10 ms per draft
    c.observe(4, 1, 30.0, 0, [], drafts=4, drafter_seconds=0.01)  # the batch emptied; a request came later
    assert abs(c.cost[4].at(10) - 0.2) < 1e-6
    # 4 drafting rows: 4 x 1.75 tokens in 0.1 + 0.04 (verifying) + 0.01 (drafting) s beat 4 in 0.1 s
    assert c.choose(4, rows=4) == 1 and c.modelled == 1 and c.chosen == {1: 1}
    assert c.predicted(4, rows=4)[1] > c.predicted(4, rows=4)[0]


def test_copies_go_at_full_length_and_the_step_length_applies_to_the_drafter_only():
    """A row that copies gets every token that matches (up to its k), whatever StepK chose for the
    drafter model; a step where no row would draft with the model is not a StepK choice."""
    from onlinespec.decode.suffix import SuffixConfig

    target = tiny_llama(layers=2, hidden=64, seed=0)
    vllm = FakeVllm(target, k=3)
    vllm.proposer.suffix_config = SuffixConfig()
    proposer = vllm.proposer
    proposer.step_k.choose = lambda batch, rows=1, copied=0: 0  # the drafter muted every step
    drafter = HFDrafter(perturbed(target, 0.05, seed=1), "a")
    proposer.assign("copy", drafter, 3, adaptive=True)
    proposer.assign("model", drafter, 3, adaptive=True)
    proposer.runner.input_batch.req_ids = ["copy", "model"]
    texts = [[7, 8, 9, 10, 11, 12] * 3 + [7, 8], [30, 31, 32, 33, 34, 35, 36, 37]]
    tokens = np.zeros((2, MAX_LEN), dtype=np.int64)
    for i, t in enumerate(texts):
        tokens[i, :len(t)] = t
    drafts = proposer.propose([[8], [37]], np.array([len(t) for t in texts]), tokens)
    # the repeating text copies three tokens though the step's length is 0; the other row is muted
    assert drafts == [[9, 10, 11], []]


def test_a_drafter_that_fails_costs_its_rows_their_drafts_not_the_step():
    """An exception inside the drafter (a bad version, memory) must not reach vLLM's step: its
    rows decode without drafts, the other drafter's rows draft as before, and it recovers."""
    target = tiny_llama(layers=2, hidden=64, seed=0)
    good = HFDrafter(perturbed(target, 0.05, seed=1), "good")
    bad = HFDrafter(perturbed(target, 0.05, seed=2), "bad")
    vllm = FakeVllm(target, k=2)
    vllm.add("g", [4, 5, 6, 7], good, 2)
    vllm.add("b", [8, 9, 10, 11], bad, 2)
    vllm.step()
    healthy = bad.model

    class Broken(torch.nn.Module):
        def __getattr__(self, name):
            if name in ("config", "dtype", "device"):
                return getattr(healthy, name)
            return super().__getattr__(name)

        def forward(self, *a, **kw):
            raise RuntimeError("out of memory")

    bad.model = Broken()
    vllm.step()
    assert vllm.drafts["b"] == [] and vllm.proposer.failures == 1
    assert vllm.drafts["g"] == greedy(good.model, vllm.texts["g"], 2)
    bad.model = healthy  # swapped back (a rollback): it drafts again, from a fresh cache
    vllm.step()
    vllm.step()
    assert vllm.drafts["b"] == greedy(bad.model, vllm.texts["b"], 2)


def test_the_record_is_cut_where_vllm_cut_the_output():
    """vLLM stops a request inside a block (a stop token, max_tokens): the proposer saw the whole
    block, the record keeps only the positions vLLM emitted; positions its log missed are plain."""
    from onlinespec.decode.sampling import SamplingParams
    from onlinespec.vllm_backend.proposer import DraftLog
    from serving.engine_loop import RequestHandle
    from serving.vllm_loop import VllmGeneration, feedback_record

    def position(top: list[int]) -> dict:  # vLLM's per-position log-probs: rank 1 first
        return {t: SimpleNamespace(logprob=-0.1 * r, rank=r + 1) for r, t in enumerate(top)}

    handle = RequestHandle([1, 2, 3], SamplingParams(max_new_tokens=6), None, None, tenant="t")
    gen = VllmGeneration("r", HFDrafter(tiny_llama(layers=1, hidden=32, heads=2), "d", version=4), 3)
    gen.tokens = [10, 11, 12, 13, 14, 15]
    gen.logprobs = [position([t, 99, 98]) for t in gen.tokens]
    log = DraftLog("d", 4, blocks=[([], 1, 0), ([11, 12, 50], 3, 2), ([14, 15, 16], 4, 3)])
    record, gaps = feedback_record(handle, gen, log, "target", 2)
    record.validate()
    assert gaps == 0 and record.generated == 6
    assert record.drafted.tolist() == [False, True, True, True, True, True]  # the last block cut to 2
    assert record.accepted.tolist() == [False, True, True, False, True, True]
    assert record.draft_tokens.tolist() == [-1, 11, 12, 50, 14, 15]
    assert record.topk_ids[:, 0].tolist() == gen.tokens and record.topk_ids.shape == (6, 2)
    assert (record.drafter_id, record.drafter_version, record.tenant) == ("d", 4, "t")
    short = DraftLog("d", 4, blocks=[([], 1, 0), ([11, 12, 50], 3, 2)])  # a log that ends early
    record, gaps = feedback_record(handle, gen, short, "target", 2)
    assert gaps == 2 and record.generated == 6 and not record.drafted[4:].any()
    # a log that starts late (the assignment reached a proposer in another process after vLLM's
    # first steps): the positions before it are plain, the blocks stay where they were emitted
    late = DraftLog("d", 4, blocks=[([12, 13], 3, 2), ([71, 70], 1, 0)], start=3 + 2)
    record, gaps = feedback_record(handle, gen, late, "target", 2)
    record.validate()
    assert gaps == 2 and record.drafted.tolist() == [False, False, True, True, False, True]
    assert record.accepted.tolist() == [False, False, True, True, False, False]
    assert record.draft_tokens.tolist() == [-1, -1, 12, 13, -1, 71]


class WireWorker:
    """vLLM's worker with OnlineSpec's extension, reached as the engine-core process reaches it:
    every call's arguments and answer go through msgpack (plain data only, no objects)."""

    def __init__(self, proposer):
        from onlinespec.vllm_backend.worker import OnlineSpecWorker

        class Worker(OnlineSpecWorker):
            pass

        self.worker = Worker()
        self.worker.model_runner = SimpleNamespace(drafter=proposer, input_batch=proposer.runner.input_batch)
        self.worker.device = "cpu"

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        import msgpack

        kwargs = msgpack.unpackb(msgpack.packb(kwargs or {}), strict_map_key=False)
        answer = getattr(self.worker, method)(*args, **kwargs)
        return [msgpack.unpackb(msgpack.packb(answer), strict_map_key=False)]


def test_through_the_worker_extension_over_plain_data_the_proposer_drafts_and_logs_the_same(tmp_path):
    """The server's side (ProposerLink) and the worker's (OnlineSpecWorker), with every message
    through msgpack, as in vLLM's multi-process engine: the worker builds its own drafter from the
    registry's files, and the drafts, per-step counts and logs equal the proposer's driven
    directly with the server's drafter object."""
    from onlinespec.learn.registry import Registry
    from onlinespec.redis_server import EmbeddedRedis, connect
    from onlinespec.vllm_backend.link import ProposerLink

    target = tiny_llama(layers=2, hidden=64, seed=0)
    drafter = perturbed(target, 0.05, seed=1)
    redis_server = EmbeddedRedis().start()
    try:
        registry = Registry(tmp_path / "registry", connect(redis_server.url))
        registry.bootstrap("a", drafter)
        registry.publish("a", drafter, parent=1)
    finally:
        redis_server.stop()
    direct, wired = FakeVllm(target, k=3), FakeVllm(target, k=3)
    link = ProposerLink(WireWorker(wired.proposer), k_max=3)
    assert link.setup([{"id": "a", "version": 2, "dir": str(registry.path("a", 2)), "model": None}], None)
    served = wired.proposer.model.handles["a"]
    assert served.version == 2 and served.model is not drafter  # built in the worker, from the files
    prompts = {"r0": [5, 9, 2, 7, 1], "r1": [3, 3, 8, 1, 4, 4, 6]}
    for rid, prompt in prompts.items():
        direct.add(rid, prompt, HFDrafter(drafter, "a", version=2), 3)
        wired.texts[rid], wired.drafts[rid] = list(prompt), []
        link.assign(rid, "a", 3)
    link.flush()
    counts = {rid: [] for rid in prompts}
    for _ in range(6):
        assert direct.step() == wired.step()
        assert direct.drafts == wired.drafts
        link.sync([])
        for rid in prompts:
            mine = link.take(rid)
            assert mine == direct.proposer.take(rid)
            counts[rid] += mine
    assert sum(a for c in counts.values() for _, a, _ in c) > 0  # drafts were accepted: the counts mean something
    link.sync(["r0"])
    assert link.finish("r0") == direct.finish("r0")
    assert link.stats["versions"] == {"a": 2}
    link.forget("r1")
    link.flush()
    assert "r1" not in wired.proposer._rows and link.finish("r1") is None


def test_a_feature_drafter_is_refused_with_the_reason(tmp_path):
    """vLLM does not hand the proposer its hidden states: a feature drafter is refused at start,
    naming the engine that serves it, rather than drafting from nothing."""
    import pytest

    from onlinespec.drafters.feature import feature_from
    from onlinespec.errors import ModelLoadError

    target = tiny_llama(layers=2, hidden=32, heads=4, seed=4)
    target.save_pretrained(tmp_path / "t")
    fake = FakeVllm(target, 3)
    with pytest.raises(ModelLoadError, match="engine: embedded"):
        fake.proposer.serve({"f": HFDrafter(feature_from(target, str(tmp_path / "t"), list(range(64))), "f")})
