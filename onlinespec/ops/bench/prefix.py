"""``onlinespec bench prefix``: what the prefix cache saves on chat traffic, against none.

Conversations of two turns from the chat domains (:mod:`onlinespec.decode.chat`, through the
tokenizer's chat template, so every prompt begins with its system prompt): the first turns, then
each conversation's second turn (its first answer, as the target gives it alone, and a follow-up
question), served by one batch as a server serves them: ``--concurrency`` closed-loop clients,
greedy, the config's first drafter and suffix speculation, the batch-aware draft length.

Two ways, in turn and in alternating order (``--repeats`` passes each, medians reported): the
batch with a prefix cache of ``serving.prefix_cache_tokens`` positions (at least 2048 here) and
the same batch with none. Per turn: tokens/s, the median time to first token, the prompt tokens
prefilled and the share of prompt tokens taken from the cache. ``lossless``: every output of
both ways equals the target alone (one Hugging Face greedy ``generate`` per prompt).
"""

from __future__ import annotations

import statistics

from onlinespec.decode.adaptive import BatchK
from onlinespec.decode.batch import Batch
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.suffix import SuffixCache
from onlinespec.drafters.hf import HFDrafter
from onlinespec.ops.bench.common import emit, machine, set_threads
from onlinespec.ops.bench.serve import hf_batched, serve_level

__all__ = ["run", "conversations"]

DOMAINS = ("question", "story", "json", "summarize", "explain")


def conversations(n: int) -> list[list[dict]]:
    """``n`` first turns, taken from the chat domains in turn."""
    from onlinespec.decode.chat import chat_prompts

    per = -(-n // len(DOMAINS))
    pools = [chat_prompts(d, per) for d in DOMAINS]
    return [pools[i % len(DOMAINS)][i // len(DOMAINS)] for i in range(n)]


def _models(args):
    from onlinespec.config import DEFAULT_CONFIG, load_config
    from onlinespec.models import load_model, load_tokenizer

    cfg = load_config(args.config or DEFAULT_CONFIG)
    tokenizer = load_tokenizer(cfg.target_model)  # its chat template, or the server's default
    target = load_model(cfg.target_model)
    drafter = load_model(cfg.drafters[0].model) if cfg.drafters else None
    return cfg, tokenizer, target, drafter


def run(args) -> int:
    from onlinespec.decode.chat import FOLLOW_UPS, render

    threads = set_threads(args.threads)
    cfg, tokenizer, target, drafter_model = _models(args)
    c = args.concurrency
    n = args.prompts or (2 * c if args.quick else 4 * c)
    max_new = args.max_new_tokens or (16 if args.quick else 32)
    repeats = max(1, args.repeats if args.repeats is not None else (1 if args.quick else 3))
    budget = max(2048, cfg.serving.prefix_cache_tokens)
    eos = tokenizer.eos_token_id

    firsts = conversations(n)
    turn1 = [render(tokenizer, m) for m in firsts]
    reference1 = [hf_batched(target, [p], 1, max_new, eos)["outputs"][0] for p in turn1]
    answers = [tokenizer.decode(r, skip_special_tokens=True) for r in reference1]
    turn2 = [render(tokenizer, m + [{"role": "assistant", "content": a},
                                    {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}])
             for i, (m, a) in enumerate(zip(firsts, answers))]
    reference2 = [hf_batched(target, [p], 1, max_new, eos)["outputs"][0] for p in turn2]

    prompt_tokens = [sum(map(len, turn)) for turn in (turn1, turn2)]
    controller = BatchK(k_max=cfg.serving.k_max)  # kept across passes, as a server keeps it

    def serve(prefix_tokens: int) -> list[dict]:
        engine = SpeculativeEngine(target, HFDrafter(drafter_model, cfg.drafters[0].id) if drafter_model else None,
                                   tokenizer=tokenizer,
                                   config=EngineConfig(k_max=cfg.serving.k_max, capture_feedback=False,
                                                       drafter_context=cfg.serving.drafter_context),
                                   suffix=SuffixCache(cfg.serving.suffix) if cfg.serving.suffix.enabled else None)
        batch = Batch(engine, slots=c, prefill_tokens=cfg.serving.prefill_tokens, prefix_tokens=prefix_tokens)
        return [serve_level(engine, turn, c, max_new, controller=controller, batch=batch) for turn in (turn1, turn2)]

    serve(budget)  # warm-up: the first forwards allocate and pick kernels
    runs: dict[str, list[list[dict]]] = {"cache": [], "none": []}
    for r in range(repeats):
        for way in (("cache", "none") if r % 2 == 0 else ("none", "cache")):
            runs[way].append(serve(budget if way == "cache" else 0))
    lossless, differences = True, []
    for way, passes in runs.items():
        for turns in passes:
            for t, (level, reference) in enumerate(zip(turns, (reference1, reference2))):
                for i, (got, expected) in enumerate(zip(level["outputs"], reference)):
                    if got != expected:
                        lossless = False
                        differences.append({"way": way, "turn": t + 1, "prompt": i})

    def figures(way: str, t: int) -> dict:
        levels = [turns[t] for turns in runs[way]]
        return {"tok_s": statistics.median(x["tok_s"] for x in levels),
                "ttft_p50_ms": statistics.median(statistics.median(x["ttft_ms"]) for x in levels),
                "prefilled_tokens": statistics.median(x["prefilled_tokens"] for x in levels),
                "cached_share": statistics.median(x["cached_tokens"] for x in levels) / prompt_tokens[t],
                "prefill_share_of_wall": statistics.median(x["phases"]["prefill"] / x["seconds"] for x in levels)}

    turns_out = []
    for t in range(2):
        cache, none = figures("cache", t), figures("none", t)
        turns_out.append({"turn": t + 1, "prompts": n, "mean_prompt_tokens": prompt_tokens[t] / n,
                          "cache": cache, "none": none, "tok_s_ratio": cache["tok_s"] / none["tok_s"],
                          "ttft_ratio": cache["ttft_p50_ms"] / none["ttft_p50_ms"],
                          # each pass's two ways ran next to each other
                          "tok_s_ratio_paired": statistics.median(
                              a[t]["tok_s"] / b[t]["tok_s"] for a, b in zip(runs["cache"], runs["none"]))})
        print(f"turn {t + 1}: {n} prompts of {prompt_tokens[t] / n:.0f} tokens; "
              f"cache {cache['tok_s']:.1f} tok/s, first token {cache['ttft_p50_ms']:.0f} ms, "
              f"{cache['cached_share']:.0%} of prompt tokens cached | none {none['tok_s']:.1f} tok/s, "
              f"first token {none['ttft_p50_ms']:.0f} ms", flush=True)
    result = {"turns": turns_out, "lossless": lossless, "differences": differences[:5],
              "target": cfg.target_model, "drafter": cfg.drafters[0].model if cfg.drafters else None,
              "concurrency": c, "max_new_tokens": max_new, "repeats": repeats, "prefix_cache_tokens": budget,
              "machine": {**machine(), "torch_threads": threads}}
    table = [("target", cfg.target_model), ("drafter", result["drafter"]),
             ("turn 1: tokens/s, first token (cache / none)",
              f"{turns_out[0]['tok_s_ratio']:.2f}x, {turns_out[0]['ttft_ratio']:.2f}x"),
             ("turn 2: tokens/s, first token (cache / none)",
              f"{turns_out[1]['tok_s_ratio']:.2f}x, {turns_out[1]['ttft_ratio']:.2f}x"),
             ("lossless", lossless)]
    emit(table, result, args.json)
    return 0 if lossless else 1
