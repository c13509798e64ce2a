"""``onlinespec bench vllm``: vLLM with OnlineSpec's drafters against vLLM alone and vLLM's own proposers.

Run it with vLLM's virtualenv (``.venv-vllm/bin/onlinespec bench vllm``, after ``./run vllm-setup``).
The same prompts (chat prompts of the config's target; ``2 x batch`` of them per level), greedy,
the same max tokens, at batch 1, 8 and 16 (``--quick``: 1 and 8), for three or four engines, each
in a process of its own (one vLLM engine per process, started once for all its levels):

- ``onlinespec``: vLLM with OnlineSpec's proposer: suffix copies from the request's own text where
  the config enables suffix speculation (past outputs are not copied: the passes repeat the same
  prompts), else the config's first drafter
  (``--drafter ID`` for another; its bundled starting weights), each step as many drafts as its
  measured throughput says pay (:class:`~onlinespec.vllm_backend.steps.StepK`, up to
  ``serving.vllm.num_speculative_tokens``; ``--k-fixed K``: always K);
- ``none``: vLLM without speculation;
- ``ngram``: vLLM's own prompt-lookup proposer, the same number of drafts;
- ``suffix``: vLLM's own suffix decoding (prompt and output trees of each request; its global
  tree of past responses off, as OnlineSpec's copies from past outputs are), the same most drafts
  a step; only where ``arctic_inference`` imports (it has no wheel on PyPI: ``docs/vllm.md`` says
  how to build the part vLLM uses), else skipped with a note.

Each level runs its prompts in static waves of ``batch`` requests (all added, then stepped until all
finish), so every engine sees the same batches. The engines are started together and take
turns, level by level, ``--repeats`` passes each (default 3, ``--quick`` 1; medians reported,
and each pass's onlinespec/none ratio): one machine's noise falls on all three alike. Reports aggregate tokens/s per engine and level,
the drafts' acceptance (OnlineSpec's from its proposer, vLLM's proposers' from vLLM's own counters),
and ``lossless``: every output with speculation equals the output without.
JSON: ``{"levels": [{"batch", "onlinespec_tok_s", "none_tok_s", "ngram_tok_s"[, "suffix_tok_s"]}],
"engines", "acceptance", "lossless", "target", "drafter", "k", "machine"}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

__all__ = ["run"]

ENGINES = ("onlinespec", "none", "ngram", "suffix")  # suffix: where arctic_inference imports
VLLM_PROPOSERS = {  # vLLM's own proposers, as its speculative_config names them
    "ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "suffix_decoding_max_cached_requests": 0},
}


def _prompts(cfg, tokenizer, n: int, domain: str) -> list[list[int]]:
    from onlinespec.decode.chat import DOMAINS, chat_prompts, render

    domains = [domain] if domain in DOMAINS else list(DOMAINS)
    out: list[list[int]] = []
    while len(out) < n:
        for d in domains:
            out += [render(tokenizer, m) for m in chat_prompts(d, n)]
    return out[:n]


def _child(spec: dict) -> None:
    """One engine, started once, measuring levels as the parent asks (a process of its own):
    reads ``{"batch": B}`` lines on stdin, answers each with a ``BENCH `` line on stdout."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    from onlinespec.config import load_config
    from onlinespec.models import resolve_model_path
    from onlinespec.vllm_backend.engine import engine_args, start_engine

    cfg = load_config(spec["config"])
    model_path = resolve_model_path(cfg.target_model)
    mode, k = spec["engine"], spec["k"]
    link = None
    if mode == "onlinespec":
        from onlinespec.drafters.hf import HFDrafter
        from onlinespec.models import load_model

        d = next(d for d in cfg.drafters if d.id == spec["drafter"])
        # suffix copies from the request's own text where the config enables them, as the service does
        engine, link = start_engine(cfg, model_path, drafters={d.id: HFDrafter(load_model(d.model), d.id)},
                                    drafter_specs=[{"id": d.id, "version": 0, "model": d.model}],
                                    max_num_seqs=max(spec["batches"]))
    else:
        args = engine_args(cfg, model_path, speculate=False, max_num_seqs=max(spec["batches"]))
        if mode in VLLM_PROPOSERS:
            args["speculative_config"] = {**VLLM_PROPOSERS[mode], "num_speculative_tokens": k}
        engine = LLMEngine.from_engine_args(EngineArgs(**args))

    def wave(prompts, max_tokens):
        internal = {}  # the id a request was added with -> the id vLLM (and the proposer) knows it by
        for i, p in enumerate(prompts):
            ext = f"{time.monotonic_ns()}-{i}"
            internal[ext] = engine.add_request(ext, {"prompt_token_ids": p},
                                               SamplingParams(max_tokens=max_tokens, temperature=0.0))
            if link is not None:
                # isolated: a request copies from its own text only (the levels and passes repeat the
                # same prompts: past outputs would be the answers themselves)
                link.assign(internal[ext], spec["drafter"], k, adaptive=spec["adaptive"], isolated=True)
        outs = [None] * len(prompts)
        drafted = accepted = 0
        while engine.has_unfinished_requests():
            if link is not None:
                link.flush()
            finished = [o for o in engine.step() if o.finished]
            for o in finished:
                outs[int(o.request_id.rsplit("-", 1)[1])] = list(o.outputs[0].token_ids)
            if link is not None:
                link.sync([internal[o.request_id] for o in finished])
                for o in finished:
                    link.take(internal[o.request_id])
                    log = link.finish(internal[o.request_id])
                    if log is not None:
                        drafted, accepted = drafted + log.drafted, accepted + log.accepted
        return outs, drafted, accepted

    prompts, max_tokens = spec["prompts"], spec["max_tokens"]
    wave(prompts[:2], 8)  # warm-up
    print("BENCH " + json.dumps({"ready": True}), flush=True)
    drafted = accepted = 0
    for line in sys.stdin:
        batch = json.loads(line)["batch"]
        group = prompts[: 2 * batch]
        t0, tokens, outputs = time.perf_counter(), 0, []
        for s in range(0, len(group), batch):
            outs, d, a = wave(group[s:s + batch], max_tokens)
            outputs += outs
            tokens += sum(len(o) for o in outs)
            drafted, accepted = drafted + d, accepted + a
        seconds = time.perf_counter() - t0
        if mode in VLLM_PROPOSERS:
            drafted, accepted = _vllm_counters(engine)
        chosen = link.stats["chosen"] if link is not None and spec["adaptive"] else {}
        print("BENCH " + json.dumps({"tok_s": tokens / seconds, "outputs": outputs, "drafted": drafted,
                                     "accepted": accepted,
                                     "chosen_k": dict(sorted(chosen.items(), key=lambda kv: int(kv[0]))),
                                     "model_steps": link.stats["modelled"] if link is not None else 0}),
              flush=True)


def _vllm_counters(engine) -> tuple[int, int]:
    """vLLM's own spec-decode counters (draft tokens, accepted tokens)."""
    drafted = accepted = 0
    for m in engine.get_metrics():
        if m.name == "vllm:spec_decode_num_draft_tokens":
            drafted += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += int(m.value)
    return drafted, accepted


def run(args) -> int:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("bench vllm needs vLLM: ./run vllm-setup, then .venv-vllm/bin/onlinespec bench vllm", file=sys.stderr)
        return 2
    from onlinespec.config import CONFIGS, load_config
    from onlinespec.models import load_tokenizer
    from onlinespec.ops.bench.common import emit, machine

    config = args.config or str(CONFIGS / "vllm.yaml")
    cfg = load_config(config)
    drafter = args.drafter or cfg.drafters[0].id
    k = args.k_fixed or cfg.serving.vllm.num_speculative_tokens
    batches = [1, 8] if args.quick else [1, 8, 16]
    max_tokens = args.max_new_tokens or (32 if args.quick else 64)
    tokenizer = load_tokenizer(cfg.target_model)
    prompts = _prompts(cfg, tokenizer, 2 * max(batches), args.domain)
    repeats = args.repeats or (1 if args.quick else 3)
    engines = ENGINES
    if importlib.util.find_spec("arctic_inference") is None:
        engines = tuple(e for e in ENGINES if e != "suffix")
        print("bench vllm: vLLM's suffix proposer needs arctic_inference, not installed here: skipped "
              "(docs/vllm.md: building it)", file=sys.stderr)
    speculative = [e for e in engines if e != "none"]
    children = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in engines:  # all started, then measured in turns: the same machine weather
                spec = {"engine": name, "config": config, "drafter": drafter, "k": k,
                        "adaptive": args.k_fixed is None, "batches": batches, "prompts": prompts,
                        "max_tokens": max_tokens}
                path = os.path.join(tmp, f"{name}.json")
                with open(path, "w") as f:
                    json.dump(spec, f)
                log = open(os.path.join(tmp, f"{name}.log"), "w")
                children[name] = (subprocess.Popen([sys.executable, "-m", "onlinespec.ops.bench.vllm", path],
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                                   text=True), log)
            for name in engines:
                _answer(name, *children[name])
            runs = {name: {b: [] for b in batches} for name in engines}
            last = {}
            for batch in batches:
                for r in range(repeats):
                    for name in engines[r % len(engines):] + engines[:r % len(engines)]:  # each first in turn
                        proc, log = children[name]
                        proc.stdin.write(json.dumps({"batch": batch}) + "\n")
                        proc.stdin.flush()
                        result = _answer(name, proc, log)
                        runs[name][batch].append(result["tok_s"])
                        last[(name, batch)] = result
                    print(f"batch {batch} pass {r + 1}/{repeats}: " + " / ".join(
                        f"{n} {runs[n][batch][-1]:.1f}" for n in engines) + " tokens/s", file=sys.stderr)
        finally:
            for proc, log in children.values():
                if proc.stdin:
                    proc.stdin.close()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
    results = {name: {"levels": [{"batch": b, "tok_s": statistics.median(runs[name][b]), "runs": runs[name][b]}
                                 for b in batches],
                      "outputs": {str(b): last[(name, b)]["outputs"] for b in batches},
                      "drafted": last[(name, batches[-1])]["drafted"],
                      "accepted": last[(name, batches[-1])]["accepted"],
                      "chosen_k": last[(name, batches[-1])]["chosen_k"],
                      "model_steps": last[(name, batches[-1])]["model_steps"]} for name in engines}
    lossless = all(results[n]["outputs"] == results["none"]["outputs"] for n in speculative)
    levels = []
    for i, batch in enumerate(batches):
        levels.append({"batch": batch, **{f"{n}_tok_s": results[n]["levels"][i]["tok_s"] for n in engines},
                       "onlinespec_vs_none_runs": [a / b for a, b in zip(results["onlinespec"]["levels"][i]["runs"],
                                                                          results["none"]["levels"][i]["runs"])]})
    acceptance = {n: (results[n]["accepted"] / results[n]["drafted"] if results[n]["drafted"] else None)
                  for n in speculative}
    table = [("target", cfg.target_model), ("drafter", drafter), ("k", k)]
    for lv in levels:
        b = lv["batch"]
        table += [(f"batch {b} tokens/s " + " / ".join(engines), " / ".join(f"{lv[n + '_tok_s']:.1f}" for n in engines)),
                  (f"batch {b} onlinespec / none", lv["onlinespec_tok_s"] / lv["none_tok_s"])]
    table += [(f"acceptance {n}", "-" if a is None else f"{a:.3f}") for n, a in acceptance.items()]
    chosen = results["onlinespec"]["chosen_k"]
    if chosen:
        table.append(("onlinespec steps by draft length", " ".join(f"k={k}:{n}" for k, n in chosen.items())))
        table.append(("onlinespec steps with the drafter model on", results["onlinespec"]["model_steps"]))
    table.append(("lossless (greedy outputs equal vLLM without speculation)", lossless))
    emit(table, {"levels": levels, "engines": list(engines), "acceptance": acceptance, "lossless": lossless, "target": cfg.target_model,
                 "drafter": drafter, "k": k, "adaptive": args.k_fixed is None, "chosen_k": chosen,
                 "model_steps": results["onlinespec"]["model_steps"],
                 "machine": machine()}, args.json)
    return 0 if lossless else 1


def _answer(name: str, proc, log) -> dict:
    """The child's next ``BENCH`` line (its other output is vLLM's)."""
    for line in proc.stdout:
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    log.flush()
    with open(log.name) as f:
        tail = f.read()[-4000:]
    raise RuntimeError(f"bench vllm: the {name} engine stopped (exit {proc.wait()}):\n{tail}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        _child(json.load(f))
