"""``onlinespec bench engine``: target alone, this engine, and Hugging Face assisted generation.

Same target, drafter, prompts and stop settings (EOS, ``max_new_tokens``) for all three, greedy.
Figures:

- tokens/s of each; ``speedup`` = engine / target alone;
- ``mean_accepted_length``: tokens per speculative step (accepted drafts + the target's token);
- ``acceptance_rate`` ``a``: per-token acceptance, estimated as accepted / (accepted + rejections),
  the maximum-likelihood estimate under the independent-acceptance model;
- ``cost_ratio`` ``c``: drafter seconds per drafted token / target seconds per token (alone);
- ``theoretical_speedup`` = (1 - a^(k+1)) / ((1 - a)(k c + 1)), ``efficiency`` = speedup / theoretical;
- ``verify_cost_ratio``: seconds of one verification of k+1 positions / one target token: the
  formula assumes 1, and on a CPU it is larger, which is most of any efficiency gap;
- ``ratio_vs_hf`` = engine tokens/s / Hugging Face ``generate(assistant_model=...)`` tokens/s;
- ``lossless``: the engine's greedy outputs equal the target alone on every prompt;
- ``suffix_*``: the engine again with suffix speculation, its cache starting empty and learning
  each output as its request finishes (the prompts are served one after another):
  tokens/s, ``suffix_speedup`` over the target alone, mean accepted length, the share of drafts
  that were copied, and losslessness.
"""

from __future__ import annotations

import time

import torch

from onlinespec.adaptive import theoretical_speedup
from onlinespec.bench.common import emit, machine, setup
from onlinespec.drafters.hf import HFDrafter
from onlinespec.engine import EngineConfig, GenerationStats, SpeculativeEngine
from onlinespec.sampling import SamplingParams
from onlinespec.suffix import SuffixCache

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
    eos = tokenizer.eos_token_id
    params = SamplingParams(max_new_tokens=max_new_tokens)
    plain = SpeculativeEngine(target, None, tokenizer=tokenizer, config=EngineConfig(capture_feedback=False))
    engine = SpeculativeEngine(target, HFDrafter(drafter_model, "drafter"), tokenizer=tokenizer, config=EngineConfig(k=k))
    suffixed = SpeculativeEngine(target, HFDrafter(drafter_model, "drafter"), tokenizer=tokenizer,
                                 config=EngineConfig(k=k), suffix=SuffixCache())

    def hf_assisted(prompt):
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
    suf, t_suf = _timed(lambda p: suffixed.generate(p, params), prompts)
    suf_total = GenerationStats.combine(r.stats for r in suf)

    n_base = sum(len(r.tokens) for r in base)
    n_spec = sum(len(r.tokens) for r in spec)
    n_hf = sum(len(t) for t in hf)
    n_suf = sum(len(r.tokens) for r in suf)
    total = GenerationStats.combine(r.stats for r in spec)
    a = total.accepted / (total.accepted + total.rejections) if total.accepted + total.rejections else 0.0
    t_token = t_base / max(1, sum(r.stats.steps for r in base))
    t_draft = total.draft_seconds / max(1, total.drafted)
    t_verify = total.verify_seconds / max(1, total.steps)
    c = t_draft / t_token
    speedup = (n_spec / t_spec) / (n_base / t_base)
    theory = theoretical_speedup(a, k, c)
    return {
        "target_tokens_per_s": n_base / t_base,
        "engine_tokens_per_s": n_spec / t_spec,
        "hf_assisted_tokens_per_s": n_hf / t_hf,
        "mean_accepted_length": total.mean_accepted_length,
        "acceptance_rate": a,
        "cost_ratio": c,
        "verify_cost_ratio": t_verify / t_token,
        "k": k,
        "speedup": speedup,
        "theoretical_speedup": theory,
        "efficiency": speedup / theory,
        "ratio_vs_hf": (n_spec / t_spec) / (n_hf / t_hf),
        "lossless": all(s.tokens == b.tokens for s, b in zip(spec, base)),
        "first_difference": next((tie_margin(target, p, b.tokens, s.tokens)
                                  for p, s, b in zip(prompts, spec, base) if s.tokens != b.tokens), None),
        "hf_assisted_lossless": all(h == b.tokens for h, b in zip(hf, base)),
        "suffix_tokens_per_s": n_suf / t_suf,
        "suffix_speedup": (n_suf / t_suf) / (n_base / t_base),
        "suffix_mean_accepted_length": suf_total.mean_accepted_length,
        "suffix_copied_share": suf_total.copied / max(1, suf_total.drafted),
        "suffix_lossless": all(s.tokens == b.tokens for s, b in zip(suf, base)),
        "generated_tokens": n_spec,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
    }


def run(args) -> int:
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
