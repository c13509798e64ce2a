"""``onlinespec bench engine``: target alone, this engine, and Hugging Face assisted generation.

Same target, drafter, prompts and stop settings (EOS, ``max_new_tokens``) for all three, greedy.
Figures:

- tokens/s of each; ``speedup`` = engine / target alone;
- ``mean_accepted_length``: tokens per speculative step (accepted drafts + the target's token);
- ``acceptance_rate`` ``a``: per-token acceptance, estimated as accepted / (accepted + rejections),
  the maximum-likelihood estimate under the independent-acceptance model;
- ``cost_ratio`` ``c``: drafter seconds per drafted token / target seconds per token (alone);
- ``verify_cost_ratio`` ``v``: seconds of one verification of k+1 positions / one target token
  (Leviathan et al.'s bound assumes 1: a GPU; a CPU measures more);
- ``theoretical_speedup`` = (1 - a^(k+1)) / ((1 - a)(k c + v)) with the measured ``v``,
  ``efficiency`` = speedup / theoretical (``theoretical_speedup_v1``: the bound with ``v = 1``);
- ``ratio_vs_hf`` = engine tokens/s / Hugging Face ``generate(assistant_model=...)`` tokens/s;
- ``lossless``: the engine's greedy outputs equal the target alone on every prompt;
- ``suffix_*``: the engine again with suffix speculation, its cache starting empty and learning
  each output as its request finishes (the prompts are served one after another):
  tokens/s, ``suffix_speedup`` over the target alone, mean accepted length, the share of drafts
  that were copied, and losslessness.

With a service config (``--config FILE``; the default when neither ``--target`` nor
``--drafter`` is given: ``configs/demo.yaml``, SmolLM2-135M-Instruct and its drafters) the
prompts are chat conversations (``--domain`` one of :data:`onlinespec.decode.chat.DOMAINS`, default
``edit``) through the tokenizer's chat template, and it measures against the target alone
(Hugging Face greedy ``generate``): this engine decoding plainly; suffix speculation alone
(adaptive and fixed ``k``) and Hugging Face prompt lookup (``prompt_lookup_num_tokens=k``); each
drafter of the config at a fixed ``k`` (figures prefixed with its id: speedup, acceptance,
costs, the bound with the measured ``v`` and the efficiency against it, Hugging Face assisted
generation with the same drafter, and the drafter with suffix speculation, ``both``); and
``service``, what the service runs on its own: adaptive ``k``, the first drafter and suffix
speculation. ``speedup`` is the service's; ``ratio_vs_hf`` and ``efficiency`` the first
drafter's. The service again with predicted outputs (OpenAI's ``prediction``):
``prediction_*`` (``edit`` and ``json``: the text the prompt quotes, as a client asking for it
rewritten would send it) and ``regenerate_*`` (the answer itself: a client asking again with the
answer it got before).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from onlinespec.cpu_linear import plain_linears
from onlinespec.decode.adaptive import theoretical_speedup
from onlinespec.ops.bench.common import emit, machine, setup
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, GenerationStats, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from onlinespec.decode.suffix import SuffixCache

__all__ = ["run", "measure"]


def _timed(fn, prompts):
    outputs, t0 = [], time.perf_counter()
    for prompt in prompts:
        outputs.append(fn(prompt))
    return outputs, time.perf_counter() - t0


def tie_margin(target, prompt: list[int], reference: list[int], other: list[int]) -> dict | None:
    """Where two greedy outputs first differ: the target's top-2 logit margin there (a
    floating-point near-tie between a batched verification and one-token decoding shows up as
    a tiny margin), from one full forward over the reference."""
    i = next((j for j, (a, b) in enumerate(zip(reference, other)) if a != b), None)
    if i is None:
        return None
    with torch.no_grad():
        logits = target(torch.tensor([prompt + reference[:i + 1]])).logits[0, len(prompt) + i - 1].float()
    top = logits.topk(2)
    return {"position": i, "reference_token": reference[i], "other_token": other[i],
            "logit_margin": float(top.values[0] - top.values[1])}


def measure(target, drafter_model, tokenizer, prompts, max_new_tokens: int, k: int) -> dict:
    """A feature drafter has no Hugging Face assisted run (its drafts need the target's hidden
    states, which ``generate(assistant_model=...)`` does not pass): its ``hf_assisted_*`` figures
    and ``ratio_vs_hf`` are None."""
    from onlinespec.drafters.feature import is_feature

    eos = tokenizer.eos_token_id
    assisted = not is_feature(drafter_model)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    plain = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(capture_feedback=False))
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "drafter"), tokenizer=tokenizer, config=EngineConfig(k=k))
    suffixed = SpeculativeEngine(target, HFDrafter(drafter_model, "drafter"), tokenizer=tokenizer,
                                 config=EngineConfig(k=k), suffix=SuffixCache())

    def hf_assisted(prompt):
        if not assisted:
            return None
        with plain_linears():  # Hugging Face as its users run it
            out = target.generate(
                torch.tensor([prompt]), assistant_model=drafter_model, do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos,
                num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
            )
        return out[0, len(prompt):].tolist()

    # warm-up: first calls allocate and compile kernels
    plain.generate(prompts[0], SamplingParams(max_new_tokens=8))
    engine.generate(prompts[0], SamplingParams(max_new_tokens=8))
    hf_assisted(prompts[0][:8])

    base, t_base = _timed(lambda p: plain.generate(p, params), prompts)
    spec, t_spec = _timed(lambda p: engine.generate(p, params), prompts)
    hf, t_hf = _timed(hf_assisted, prompts)
    n_hf = sum(len(t) for t in hf) if assisted else 0
    suf, t_suf = _timed(lambda p: suffixed.generate(p, params), prompts)
    suf_total = GenerationStats.combine(r.stats for r in suf)

    n_base = sum(len(r.tokens) for r in base)
    n_spec = sum(len(r.tokens) for r in spec)
    n_suf = sum(len(r.tokens) for r in suf)
    total = GenerationStats.combine(r.stats for r in spec)
    a = total.accepted / (total.accepted + total.rejections) if total.accepted + total.rejections else 0.0
    t_token = t_base / max(1, sum(r.stats.steps for r in base))
    t_draft = total.draft_seconds / max(1, total.drafted)
    t_verify = total.verify_seconds / max(1, total.steps)
    c = t_draft / t_token
    speedup = (n_spec / t_spec) / (n_base / t_base)
    v = t_verify / t_token
    theory = theoretical_speedup(a, k, c, v)
    return {
        "target_tokens_per_s": n_base / t_base,
        "engine_tokens_per_s": n_spec / t_spec,
        "hf_assisted_tokens_per_s": n_hf / t_hf if assisted else None,
        "mean_accepted_length": total.mean_accepted_length,
        "acceptance_rate": a,
        "cost_ratio": c,
        "verify_cost_ratio": v,
        "k": k,
        "speedup": speedup,
        "theoretical_speedup": theory,
        "theoretical_speedup_v1": theoretical_speedup(a, k, c),
        "efficiency": speedup / theory,
        "ratio_vs_hf": (n_spec / t_spec) / (n_hf / t_hf) if assisted else None,
        "lossless": all(s.tokens == b.tokens for s, b in zip(spec, base)),
        "first_difference": next((tie_margin(target, p, b.tokens, s.tokens)
                                  for p, s, b in zip(prompts, spec, base) if s.tokens != b.tokens), None),
        "hf_assisted_lossless": all(h == b.tokens for h, b in zip(hf, base)) if assisted else None,
        "suffix_tokens_per_s": n_suf / t_suf,
        "suffix_speedup": (n_suf / t_suf) / (n_base / t_base),
        "suffix_mean_accepted_length": suf_total.mean_accepted_length,
        "suffix_copied_share": suf_total.copied / max(1, suf_total.drafted),
        "suffix_lossless": all(s.tokens == b.tokens for s, b in zip(suf, base)),
        "generated_tokens": n_spec,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
    }


def measure_suffix_only(target, tokenizer, prompts, max_new_tokens: int, k: int) -> dict:
    """Suffix speculation with no drafter model, against the target alone and prompt lookup."""
    eos = tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=max_new_tokens)

    def hf(prompt, **kw):
        with plain_linears():  # Hugging Face as its users run it
            out = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos, pad_token_id=eos, **kw)
        return out[0, len(prompt):].tolist()

    plain = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(capture_feedback=False))
    hf(prompts[0][:8])  # warm-up
    plain.generate(prompts[0], SamplingParams(max_new_tokens=8))
    base, t_base = _timed(hf, prompts)
    own, t_own = _timed(lambda p: plain.generate(p, params), prompts)
    lookup, t_lookup = _timed(lambda p: hf(p, prompt_lookup_num_tokens=k), prompts)
    out = {"target_tokens_per_s": sum(map(len, base)) / t_base,
           "plain_engine_tokens_per_s": sum(len(r.tokens) for r in own) / t_own,
           "hf_prompt_lookup_tokens_per_s": sum(map(len, lookup)) / t_lookup,
           "hf_prompt_lookup_lossless": lookup == base, "k": k}
    for name, fixed in (("suffix", None), ("suffix_fixed_k", k)):
        engine = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(k=fixed),
                                   suffix=SuffixCache())
        res, t = _timed(lambda p: engine.generate(p, params), prompts)
        total = GenerationStats.combine(r.stats for r in res)
        out.update({f"{name}_tokens_per_s": sum(len(r.tokens) for r in res) / t,
                    f"{name}_speedup": (sum(len(r.tokens) for r in res) / t) / out["target_tokens_per_s"],
                    f"{name}_mean_accepted_length": total.mean_accepted_length,
                    f"{name}_spec_step_share": total.spec_steps / max(1, total.steps),
                    f"{name}_lossless": [r.tokens for r in res] == base})
        if fixed is not None:
            out["verify_cost_ratio"] = (total.verify_seconds / max(1, total.steps)) / (t_base / max(1, sum(map(len, base))))
    out["hf_prompt_lookup_speedup"] = out["hf_prompt_lookup_tokens_per_s"] / out["target_tokens_per_s"]
    out["ratio_vs_prompt_lookup"] = out["suffix_tokens_per_s"] / out["hf_prompt_lookup_tokens_per_s"]
    out["generated_tokens"] = sum(map(len, base))
    out["prompts"], out["max_new_tokens"] = len(prompts), max_new_tokens
    out["reference"] = base
    return out


def measure_service(target, drafter_model, tokenizer, prompts, max_new_tokens: int,
                    predictions: list[list[int]] | None = None) -> dict:
    """What the service runs on its own: adaptive k, the drafter and suffix speculation; with
    ``predictions``, each request also sends its predicted output (OpenAI's ``prediction``)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "drafter") if drafter_model is not None else None,
                               tokenizer=tokenizer, config=EngineConfig(k=None), suffix=SuffixCache())
    engine.generate(prompts[0], SamplingParams(max_new_tokens=8))  # warm-up (its output joins the cache)
    predictions = predictions or [()] * len(prompts)
    res, t = _timed(lambda pp: engine.generate(pp[0], replace(params, prediction=tuple(pp[1]))),
                    list(zip(prompts, predictions)))
    total = GenerationStats.combine(r.stats for r in res)
    return {"tokens_per_s": sum(len(r.tokens) for r in res) / t, "outputs": [r.tokens for r in res],
            "mean_accepted_length": total.mean_accepted_length,
            "own_accepted_length": total.own_accepted_length, "copied_share": total.copied / max(1, total.drafted),
            "spec_step_share": total.spec_steps / max(1, total.steps)}


def _run_config(args) -> int:
    """A service config's target and drafters on chat prompts."""
    from onlinespec.ops.bench.common import set_threads
    from onlinespec.decode.chat import DOMAINS, chat_prompts, render
    from onlinespec.config import DEFAULT_CONFIG, load_config
    from onlinespec.models import load_model, load_tokenizer

    threads = set_threads(args.threads)
    cfg = load_config(args.config or DEFAULT_CONFIG)
    domain = args.domain if args.domain in DOMAINS else "edit"
    tokenizer = load_tokenizer(cfg.target_model)
    target = load_model(cfg.target_model)
    n = args.prompts or (4 if args.quick else 12)
    max_new = args.max_new_tokens or (32 if args.quick else 96)
    room = int(getattr(target.config, "max_position_embeddings", 1 << 30)) - max_new
    prompts = [render(tokenizer, m)[-room:] for m in chat_prompts(domain, n)]  # a small model keeps the ends
    result = measure_suffix_only(target, tokenizer, prompts, max_new, args.k)
    base_tps = result["target_tokens_per_s"]
    keys = ["target_tokens_per_s", "plain_engine_tokens_per_s", "suffix_speedup", "suffix_fixed_k_speedup",
            "hf_prompt_lookup_speedup", "suffix_mean_accepted_length"]
    ok = result["suffix_lossless"] and result["suffix_fixed_k_lossless"]
    reference = result.pop("reference")  # the target alone's greedy outputs
    drafters = [(d.id, load_model(d.model)) for d in cfg.drafters]
    for i, (did, model) in enumerate(drafters):
        one = measure(target, model, tokenizer, prompts, max_new, args.k)
        # measure() has its own target-alone run (this engine decoding plainly): ratios are taken
        # against the Hugging Face target-alone run above, like every other figure here
        for name in ("engine", "hf_assisted", "suffix"):
            tps = one[f"{name}_tokens_per_s"]
            one[f"{name}_speedup"] = tps / base_tps if tps is not None else None
        for key in ("k", "engine_speedup", "acceptance_rate", "mean_accepted_length", "cost_ratio", "verify_cost_ratio",
                    "theoretical_speedup", "theoretical_speedup_v1", "efficiency", "ratio_vs_hf",
                    "hf_assisted_speedup", "suffix_speedup", "lossless", "hf_assisted_lossless", "suffix_lossless"):
            name = key.replace("suffix_", "both_")
            result[f"{did}_{name}"] = one[key]
        keys += [f"{did}_{k}" for k in ("engine_speedup", "acceptance_rate", "cost_ratio", "verify_cost_ratio",
                                          "theoretical_speedup", "efficiency", "hf_assisted_speedup", "ratio_vs_hf",
                                          "both_speedup", "lossless")]
        ok = ok and one["lossless"] and one["suffix_lossless"]
        if i == 0:
            result.update(efficiency=one["efficiency"], ratio_vs_hf=one["ratio_vs_hf"])
            keys += ["efficiency", "ratio_vs_hf"]
    service = measure_service(target, drafters[0][1] if drafters else None, tokenizer, prompts, max_new)
    result.update({"service_tokens_per_s": service["tokens_per_s"], "speedup": service["tokens_per_s"] / base_tps,
                   "service_mean_accepted_length": service["mean_accepted_length"],
                   "service_own_accepted_length": service["own_accepted_length"],
                   "service_copied_share": service["copied_share"],
                   "service_spec_step_share": service["spec_step_share"],
                   "service_lossless": service["outputs"] == reference})
    keys += ["speedup", "service_mean_accepted_length", "service_own_accepted_length", "service_copied_share",
             "service_lossless"]
    ok = ok and result["service_lossless"]
    # predicted outputs: the text an edit prompt quotes (what a client rewriting it would send),
    # and the answer itself (a client asking again, with the answer it got last time)
    quoted = [m[-1]["content"].split("\n\n", 1)[1] for m in chat_prompts(domain, n)] if domain in ("edit", "json") else None
    for name, predictions in (("prediction", [tokenizer.encode(q, add_special_tokens=False)[:max_new] for q in quoted]
                                              if quoted else None), ("regenerate", reference)):
        if predictions is None:
            continue
        run = measure_service(target, drafters[0][1] if drafters else None, tokenizer, prompts, max_new, predictions)
        result.update({f"{name}_speedup": run["tokens_per_s"] / base_tps,
                       f"{name}_mean_accepted_length": run["mean_accepted_length"],
                       f"{name}_lossless": run["outputs"] == reference})
        keys += [f"{name}_speedup", f"{name}_mean_accepted_length", f"{name}_lossless"]
        ok = ok and result[f"{name}_lossless"]
    result.update({"config": cfg.source, "target": cfg.target_model,
                   "drafters": {d.id: d.model for d in cfg.drafters}, "domain": domain,
                   "threads": threads, "machine": machine()})
    emit([(key, result[key]) for key in keys], result, args.json)
    return 0 if ok else 1


def run(args) -> int:
    if getattr(args, "config", None) or not (args.target or args.drafter):
        return _run_config(args)
    s = setup(args)
    target = s.target
    result = measure(target, s.drafter, s.tokenizer, s.prompts, s.max_new_tokens, args.k)
    result.update({"target": s.target_name, "drafter": s.drafter_name, "domain": args.domain,
                   "threads": s.threads, "machine": machine()})
    table = [(key, result[key]) for key in (
        "target_tokens_per_s", "engine_tokens_per_s", "hf_assisted_tokens_per_s", "speedup",
        "mean_accepted_length", "acceptance_rate", "cost_ratio", "verify_cost_ratio",
        "theoretical_speedup", "efficiency", "ratio_vs_hf", "lossless", "hf_assisted_lossless",
        "suffix_tokens_per_s", "suffix_speedup", "suffix_mean_accepted_length", "suffix_copied_share",
        "suffix_lossless",
    )]
    if result["first_difference"]:
        table.append(("first_difference", result["first_difference"]))
    emit(table, result, args.json)
    return 0 if result["lossless"] and result["suffix_lossless"] else 1
