"""``onlinespec bench adapt``: does online learning pay on a drifting stream, and which kind?

A stream of prompts whose domain shifts is served in rounds of greedy speculative decoding; between rounds each method learns
from the round's feedback through the same ``DrafterLearner`` the workers run. Every method
sees the identical stream for a seed. The target decodes each prompt once (cached); serving is
replayed exactly from the drafter's teacher-forced predictions (``onlinespec.learn.replay``), so a
method costs drafter work only. Tokens/s per round are modelled from the step costs measured
on this machine (one verification of k+1 positions, one drafter token).

With a service config (``--config``; the default unless ``--target`` or ``--drafters`` name
models: ``configs/demo.yaml``, SmolLM2-135M-Instruct and its two drafters) the prompts are chat
conversations through the model's chat template, edit -> explain -> summarize -> edit by
default; with ``--target``/``--drafters`` (the demo pair) held-out demo text, python ->
shakespeare -> docs -> python by default. A feature drafter (``configs/feature.yaml``) is
replayed on its own features, a level deeper at each draft of a block, and learns from the
target's features traced beside each prompt, as its workers learn from the captured ones.

Methods: ``static`` (no updates); ``osd`` (forward KL on rejected positions only, as in Online
Speculative Decoding); ``ogd`` (all positions); ``optimistic`` (hint = last gradient);
``ensemble`` (step-size grid weighted by optimistic Hedge); ``pool`` (discounted Hedge over both
demo drafters, each learning only the traffic it served); and the optimistic learner with each
loss family (``optimistic-tv``, ``optimistic-acclen``; ``optimistic`` itself is the KL one).
All learners share one optimizer setting (``BASE_OPTIM``, ``STEPS_PER_ROUND``).

Regret: each method's cumulative prequential loss (1 - the served drafter's acceptance before
the round's update; the stream is greedy, so 1 - argmax agreement with the target) against the
best method in hindsight (fixed comparator) and against the best method of each
``--window``-round window (dynamic comparator).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from onlinespec.drafters.feature import is_feature
from onlinespec.ops.bench.common import emit, machine, set_threads
from onlinespec.learn.learner import DrafterLearner, LearnerConfig, records_to_learn
from onlinespec.learn.losses import LossConfig
from onlinespec.learn.optim import OptimConfig
from onlinespec.learn.pool import DrafterPool
from onlinespec.learn.replay import predictions, replay_served, trace_target
from onlinespec.decode.suffix import SuffixCache, SuffixConfig

__all__ = ["run", "METHODS", "simulate"]

# Every method shares one optimizer (tuned on the demo stream, docs/adaptation.md): step 2e-4 with an
# RMSProp-style preconditioner (step sizes do not shrink over the stream, so learners keep tracking
# after a shift), 8 gradient steps per round, gradients clipped at norm 1.
BASE_OPTIM = OptimConfig(lr=2e-4, hint="none", adaptive=True, sq_decay=0.99, max_grad_norm=1.0)
STEPS_PER_ROUND = 8


def _configs(lr: float | None = None, base: LearnerConfig | None = None) -> dict[str, LearnerConfig | None]:
    """Each method's learner: ``base`` (default: ``BASE_OPTIM``, ``STEPS_PER_ROUND``, the rest
    :class:`LearnerConfig`'s defaults; ``--learner-config``: a file's settings) with what makes
    the method itself (its loss, hint, ensemble or pool)."""
    base = base or LearnerConfig(optim=BASE_OPTIM, steps_per_round=STEPS_PER_ROUND)
    optim = replace(base.optim, lr=lr) if lr else base.optim
    opt = replace(optim, hint="last")

    def method(**kw) -> LearnerConfig:
        return replace(base, **{"optim": optim, **kw})
    return {
        "static": None,
        "osd": method(loss=replace(base.loss, positions="rejected")),
        "ogd": method(),
        "optimistic": method(optim=opt),
        "ensemble": method(optim=opt, ensemble_size=3, grid_factor=3.0, hedge_discount=0.5),
        # discounted Hedge follows the recent best drafter; each drafter learns only the traffic it served
        "pool": method(hedge_eta=8.0, hedge_discount=0.5, learn_from="served"),
        "optimistic-tv": method(loss=LossConfig(kl=0.0, tv=1.0), optim=opt),
        "optimistic-acclen": method(loss=LossConfig(kl=0.5, chain=1.0, focal=0.5, positional_decay=0.8), optim=opt),
    }


# Suffix speculation on top of a method: drafts copied from the request's own text ("lookup": that
# only, nothing learned across requests) or also from every finished output (a SuffixCache, which
# learns from the traffic without gradients); the drafter drafts where nothing matches.
SUFFIX = {"lookup": ("static", SuffixConfig(max_tokens=0)), "suffix": ("static", SuffixConfig()),
          "pool+suffix": ("pool", SuffixConfig())}
NOT_LEARNING = ("static", "lookup")  # never the best *online* method


def _method_configs(lr: float | None = None, base: LearnerConfig | None = None
                    ) -> dict[str, tuple[LearnerConfig | None, SuffixConfig | None]]:
    configs = {m: (c, None) for m, c in _configs(lr, base).items()}
    for m, (learner, suffix) in SUFFIX.items():
        configs[m] = (configs[learner][0], suffix)
    return configs


METHODS = tuple(_method_configs())
LOSS_FAMILIES = {"kl": "optimistic", "tv": "optimistic-tv", "accepted_length": "optimistic-acclen"}


def _stream(prompts: dict[str, list[int]], schedule: list[str], rounds_per_phase: int, per_round: int,
            seed: int) -> list[list[int]]:
    """Rounds of prompt indices; each phase draws from one domain without replacement."""
    rng = random.Random(seed)
    pools = {d: rng.sample(idx, len(idx)) for d, idx in prompts.items()}
    cursor = {d: 0 for d in prompts}
    rounds = []
    for domain in schedule:
        for _ in range(rounds_per_phase):
            pick = []
            for _ in range(per_round):
                pool = pools[domain]
                pick.append(pool[cursor[domain] % len(pool)])
                cursor[domain] += 1
            rounds.append(pick)
    return rounds


def simulate(method: str, config: LearnerConfig | None, drafters: dict, traces, rounds, k: int, costs: dict,
             suffix: SuffixConfig | None = None) -> dict:
    """Serve ``rounds`` (lists of trace indices) with one method; per-round figures.

    ``suffix``: serve with suffix speculation; its cache learns every output of a round once the
    round is served (a round's requests are in flight together).
    """
    names = list(drafters)
    featured = any(is_feature(d) for d in drafters.values())
    levels = k if featured else 1  # a feature drafter drafts deeper on its own features
    learners = {}
    is_pool = method.split("+")[0] == "pool"
    if config is not None:
        chosen = names if is_pool else names[:1]
        learners = {n: DrafterLearner(copy.deepcopy(drafters[n]), config) for n in chosen}
    pool = (DrafterPool(names, config.hedge_eta, config.optimistic_hedge, discount=config.hedge_discount)
            if is_pool else None)
    cache = SuffixCache(suffix) if suffix is not None else None
    serving = names[0]
    static_model = copy.deepcopy(drafters[names[0]]).eval()
    static_eval = None if learners else DrafterLearner(static_model, LearnerConfig(optim=OptimConfig(lr=0.0)))
    out = {"mal": [], "tokens_per_s": [], "loss": []}
    for round_idx in rounds:
        batch = [traces[i] for i in round_idx]
        if pool is not None:
            serving = pool.drafters[int(np.argmax(pool.hedge.weights))]
        model = learners[serving].served_model() if learners else static_model
        served = predictions(model, batch, cache, levels=levels)
        records, stats = replay_served(batch, served, k, drafter_id=serving)
        features = {r.request_id: t.features for r, t in zip(records, batch)}

        def feats(rs, name=None):
            """The target's features beside records ``rs``, for a feature drafter ``name`` (None:
            any in the pool) to learn and be scored on; None for the others."""
            wanted = featured if name is None else is_feature(drafters[name])
            return [features[r.request_id] for r in rs] if wanted else None
        out["mal"].append(stats.mean_accepted_length)
        # copied drafts cost no drafter forward
        seconds = stats.steps * costs["verify"] + (stats.drafted - stats.copied) * costs["draft"]
        out["tokens_per_s"].append(sum(len(t.generated) for t in batch) / seconds)
        loss = None  # the prequential loss of what was served, before learning from the round
        if cache is not None:  # what was served is the drafter and the copies together
            loss = 1.0 - float(np.mean(np.concatenate([g[0] == np.asarray(t.generated)
                                                       for (g, _), t in zip(served, batch)])))
            for t in batch:
                cache.add_output(t.prompt, t.generated)
        if not learners:
            if loss is None:
                loss = static_eval.evaluate(records, feats(records, names[0]))["prequential_loss"]
        elif pool is not None:
            served_models = {n: learners[n].served_model() for n in names}
            losses = pool.round(served_models, records, features=feats(records)).losses
            if loss is None:
                loss = losses[names.index(serving)]
            for n in names:
                own = records_to_learn(records, n, config)
                if own:
                    learners[n].round(own, feats(own, n))
        else:
            drafter_loss = learners[serving].round(records, feats(records, serving)).served_loss
            if loss is None:
                loss = drafter_loss
        out["loss"].append(loss)
    return out


def _measure_costs(target, drafter, prompt: list[int], k: int) -> dict:
    """Seconds of one verification of k+1 positions and of one drafter token, on this machine."""
    from onlinespec.decode.lm import CacheSession

    def timed(model, n_new, reps=20):
        s = CacheSession(model)
        # a feature drafter reads a feature beside each token (its cost does not depend on which)
        extra = (lambda n: {"features": torch.zeros(1, n, model.config.hidden_size)}) if is_feature(model) else (
            lambda n: {})
        s.feed(prompt, last_only=True, **extra(len(prompt)))
        base = s.length
        t0 = time.perf_counter()
        for _ in range(reps):
            s.feed(prompt[:n_new], **extra(n_new))
            s.rewind(base)
        return (time.perf_counter() - t0) / reps

    with torch.inference_mode():
        timed(target, k + 1, 3)
        return {"verify": timed(target, k + 1), "draft": timed(drafter, 1)}


def _regret(losses: dict[str, list[float]], window: int) -> dict:
    cum = {m: float(np.sum(v)) for m, v in losses.items()}
    best_fixed = min(cum.values())
    n = len(next(iter(losses.values())))
    dynamic = 0.0
    for start in range(0, n, window):
        dynamic += min(float(np.sum(v[start:start + window])) for v in losses.values())
    return {m: {"cumulative_loss": cum[m], "regret_vs_best_fixed": cum[m] - best_fixed,
                "regret_vs_window_best": cum[m] - dynamic} for m in losses}


def _plot(path: str, per_method: dict, regret_curves: dict, schedule: list[str], rounds_per_phase: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    palette = plt.get_cmap("tab20").colors  # one colour per method, the same in both panels
    style = {m: {"color": palette[(2 * i) % 20 + (2 * i) // 20 % 2], "ls": "--" if "suffix" in m or m == "lookup"
                 else "-", "lw": 2 if m in ("static", "osd") else 1.2} for i, m in enumerate(per_method)}
    for m, curve in per_method.items():
        ax1.plot(curve, label=m, **style[m])
    for i, d in enumerate(schedule):
        ax1.axvspan(i * rounds_per_phase, (i + 1) * rounds_per_phase, alpha=0.05 * (1 + i % 2), color="gray")
        ax1.text(i * rounds_per_phase + 0.5, ax1.get_ylim()[1] if i else 1.0, d, va="top", fontsize=8)
    ax1.set_ylabel("mean accepted length (median of seeds)")
    ax1.legend(fontsize=8, ncol=4)
    for m, curve in regret_curves.items():
        ax2.plot(curve, label=m, **style[m])
    ax2.set_ylabel("cumulative loss - best fixed method")
    ax2.set_xlabel("round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _prompts(tok, domain: str, n: int) -> list[list[int]]:
    """Held-out demo text, or chat conversations through the chat template for a chat domain."""
    from onlinespec.ops.bench.common import heldout_prompts
    from onlinespec.decode.chat import DOMAINS, chat_prompts, render

    if domain in DOMAINS:
        return [render(tok, m) for m in chat_prompts(domain, n)]
    return heldout_prompts(tok, domain, n)


def run(args) -> int:
    from onlinespec.config import DEFAULT_CONFIG, load_config
    from onlinespec.models import load_model, load_tokenizer

    threads = set_threads(args.threads)
    if args.config or not (args.target or args.drafters):  # a service config: its target and drafters
        cfg = load_config(args.config or DEFAULT_CONFIG)
        target_name, drafter_names = cfg.target_model, [d.model for d in cfg.drafters]
        chat = True
    else:
        target_name = args.target or "demo:target"
        drafter_names = args.drafters or ["demo:drafter-1l", "demo:drafter-2l"]
        chat = False
    if not drafter_names:
        raise SystemExit("bench adapt needs drafter models: the config has none")
    tok = load_tokenizer(target_name)
    target = load_model(target_name)
    drafters = {n: load_model(n) for n in drafter_names}
    features = any(is_feature(d) for d in drafters.values())  # traces keep the target's features for them
    schedule = (args.schedule or ("edit,explain,summarize,edit" if chat else "python,shakespeare,docs,python")).split(",")
    quick = args.quick
    per_round = args.per_round or 4
    rounds_per_phase = args.rounds_per_phase or (3 if quick else 16)
    max_new = args.max_new_tokens or (32 if quick else 64)
    seeds = list(range(args.seeds or (1 if quick else 3)))
    per_domain = min(per_round * rounds_per_phase * schedule.count(max(set(schedule), key=schedule.count)), 240)

    # the target decodes every prompt once; all methods and seeds reuse it
    traces, by_domain = [], {}
    t0 = time.perf_counter()
    for domain in dict.fromkeys(schedule):
        by_domain[domain] = []
        for p in _prompts(tok, domain, per_domain):
            by_domain[domain].append(len(traces))
            traces.append(trace_target(target, p[-args.prompt_tokens:], max_new, 32, domain, features=features))
    trace_seconds = time.perf_counter() - t0
    costs = _measure_costs(target, next(iter(drafters.values())), traces[0].prompt, args.k)

    configs = _method_configs(args.lr, LearnerConfig.from_yaml(args.learner_config) if args.learner_config else None)
    methods = [m for m in (args.methods or METHODS) if m in configs]
    results = {m: [] for m in methods}
    for seed in seeds:
        rounds = _stream(by_domain, schedule, rounds_per_phase, per_round, seed)
        for m in methods:
            torch.manual_seed(seed)
            config, suffix = configs[m]
            results[m].append(simulate(m, config, drafters, traces, rounds, args.k, costs, suffix))
            print(f"seed {seed} {m:<18} mean accepted length {np.mean(results[m][-1]['mal']):.3f}", flush=True)

    n_rounds = len(results[methods[0]][0]["mal"])
    median_curve = {m: [statistics.median(r["mal"][i] for r in results[m]) for i in range(n_rounds)] for m in methods}
    summary = {}
    for m in methods:
        summary[m] = {
            "mean_accepted_length": statistics.median(float(np.mean(r["mal"])) for r in results[m]),
            "tokens_per_s": statistics.median(float(np.mean(r["tokens_per_s"])) for r in results[m]),
            "prequential_loss": statistics.median(float(np.mean(r["loss"])) for r in results[m]),
            "per_round_mean_accepted_length": median_curve[m],
        }
    # regret on the median-seed losses of each method
    losses = {m: [statistics.median(r["loss"][i] for r in results[m]) for i in range(n_rounds)] for m in methods}
    for m in methods:
        summary[m]["per_round_prequential_loss"] = losses[m]
    regret = _regret(losses, args.window)
    for m in methods:
        summary[m].update(regret[m])
    online = [m for m in methods if m not in NOT_LEARNING + ("osd",)]
    best = max(online, key=lambda m: summary[m]["mean_accepted_length"]) if online else None
    result = {
        "methods": summary,
        "best_online_method": best,
        "best_by_loss_family": {fam: m for fam, m in LOSS_FAMILIES.items() if m in summary},
        "ratio_vs_static": (summary[best]["mean_accepted_length"] / summary["static"]["mean_accepted_length"]
                            if best and "static" in summary else None),
        "ratio_vs_osd": (summary[best]["mean_accepted_length"] / summary["osd"]["mean_accepted_length"]
                         if best and "osd" in summary else None),
        "schedule": schedule, "rounds": n_rounds, "per_round": per_round, "k": args.k, "seeds": len(seeds),
        "max_new_tokens": max_new, "target_decode_seconds": trace_seconds, "step_costs_s": costs,
        "threads": threads, "machine": machine(), "target": target_name, "drafters": drafter_names,
    }
    print(f"\n{'method':<19}{'acc. len':>9}{'tok/s*':>8}{'preq. loss':>11}{'regret fixed':>13}{'regret window':>14}")
    for m in methods:
        s = summary[m]
        print(f"{m:<19}{s['mean_accepted_length']:>9.3f}{s['tokens_per_s']:>8.1f}{s['prequential_loss']:>11.4f}"
              f"{s['regret_vs_best_fixed']:>13.3f}{s['regret_vs_window_best']:>14.3f}")
    print("* modelled from the measured step costs")
    if args.plot:
        best_fixed = min(float(np.sum(v)) for v in losses.values()) / n_rounds
        curves = {m: list(np.cumsum(np.asarray(losses[m]) - best_fixed)) for m in methods}
        _plot(args.plot, median_curve, curves, schedule, rounds_per_phase)
        print(f"plot: {args.plot}")
    table = [("best_online_method", best), ("ratio_vs_static", result["ratio_vs_static"]),
             ("ratio_vs_osd", result["ratio_vs_osd"])]
    emit(table, result, args.json)
    return 0
