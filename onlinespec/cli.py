"""The ``onlinespec`` command. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _models(args) -> int:
    from onlinespec.models import BUNDLED, demo_models

    found = 0
    for family in BUNDLED:
        for name, path in demo_models(family).items():
            print(f"{family + ':' + name:<20} {path}")
            found += 1
    if not found:
        print("no bundled models found (build them: python -m onlinespec.demo.build --help, "
              "python -m onlinespec.drafters.distill --help)")
    return 0 if found else 1


def _bench(args) -> int:
    if args.what == "engine":
        from onlinespec.ops.bench.engine import run
    elif args.what == "loop":
        from onlinespec.ops.bench.loop import run
    elif args.what == "faults":
        from onlinespec.ops.bench.faults import run
    elif args.what == "serve":
        from onlinespec.ops.bench.serve import run
    elif args.what == "live":
        from onlinespec.ops.bench.live import run
    elif args.what == "vllm":
        from onlinespec.ops.bench.vllm import run
    elif args.what == "prefix":
        from onlinespec.ops.bench.prefix import run
    else:
        from onlinespec.ops.bench.adapt import run
    return run(args)


def _up(args) -> int:
    from onlinespec.ops.up import run

    return run(args)


def _traffic(args) -> int:
    from onlinespec.ops.traffic import run

    return run(args)


def _watch(args) -> int:
    from onlinespec.ops.watch import run

    return run(args)


def _config(args) -> int:
    """``onlinespec config show``: every setting, its effective value and where it came from."""
    import json

    from onlinespec.config import SECRETS, load_config
    from onlinespec.ops.up import redact

    from onlinespec.learn.learner import drafter_learner_configs

    try:
        cfg = load_config(args.config)
        drafter_learner_configs(cfg)  # each drafter's own learner settings checked too
    except ValueError as exc:
        print(f"onlinespec config: {exc}", file=sys.stderr)
        return 2

    def shown(key, value):
        if key in SECRETS and value:
            return redact(value) if key == "redis.url" else "***"
        return list(value) if isinstance(value, tuple) else value

    rows = [(k, shown(k, v), src) for k, v, src in cfg.effective()]
    if args.json:
        print(json.dumps({"config": cfg.source, "settings": {k: {"value": v, "source": src} for k, v, src in rows}}))
        return 0
    print(f"# {cfg.source}")
    width = max(len(k) for k, _, _ in rows)
    for k, v, src in rows:
        print(f"{k:<{width}}  {json.dumps(v):<28} # {src}")
    return 0


def _drafter(args) -> int:
    """``onlinespec drafter``: a drafter's control state and transitions, straight through Redis
    (the same :class:`onlinespec.learn.control.Control` the admin API uses)."""
    import json

    from onlinespec.feedback import keys
    from onlinespec.config import load_config
    from onlinespec.learn.control import Control
    from onlinespec.redis_server import connect
    from onlinespec.learn.registry import CheckpointError, PublishConflict, Registry

    cfg = load_config(args.config)
    try:
        redis = connect(args.redis_url or cfg.redis_url)
        known = sorted({d.decode() for d in redis.smembers(keys.drafters_set(cfg.target_id))} |
                       {d.id for d in cfg.drafters})
    except Exception as exc:  # noqa: BLE001 - no Redis: say so in one line
        print(f"onlinespec drafter: cannot reach Redis ({type(exc).__name__}: {exc}); pass --redis-url",
              file=sys.stderr)
        return 1
    control = Control(redis, Registry(cfg.registry, redis), cfg.target_id)
    if args.action == "list":
        states = [control.state(d).to_dict() for d in known]
        if args.json:
            print(json.dumps({"drafters": states}))
        for st in [] if args.json else states:
            flags = [f for f in ("paused", "backoff") if st[f]] + ([f"pinned v{st['pinned']}"] if st["pinned"] else [])
            print(f"{st['drafter']:<24} latest v{st['latest']}  {'learning' if st['learning'] else 'not learning'}"
                  f"{' (' + ', '.join(flags) + ')' if flags else ''}{'  round in flight' if st['inflight'] else ''}")
        return 0
    if args.drafter not in known:
        print(f"onlinespec drafter: unknown drafter {args.drafter!r}; known: {', '.join(known) or 'none'}",
              file=sys.stderr)
        return 2
    try:
        if args.action in ("pin", "rollback"):
            if args.version is None:
                print(f"onlinespec drafter {args.action} needs --version N", file=sys.stderr)
                return 2
            state = getattr(control, args.action)(args.drafter, args.version, reason=f"cli {args.action}")
        elif args.action == "update":
            job = control.enqueue_round(args.drafter)
            print(f"enqueued {job}" if job else f"a round of {args.drafter} is already queued or running")
            return 0 if job else 1
        else:
            state = getattr(control, args.action)(args.drafter)
    except (CheckpointError, PublishConflict) as exc:
        print(f"onlinespec drafter {args.action}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state.to_dict()))
    return 0


def _tune(args) -> int:
    from onlinespec.learn.tune import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onlinespec", description="Speculative decoding with drafters that learn online.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the bundled models (demo:NAME, smollm2:NAME) and their paths")
    p.set_defaults(func=_models)

    p = sub.add_parser("bench", help="benchmarks that print their figures (and --json)")
    p.add_argument("what", choices=["engine", "serve", "prefix", "loop", "adapt", "faults", "live", "vllm"])
    p.add_argument("--quick", action="store_true", help="fewer prompts and tokens: a smoke run in under a minute")
    p.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    p.add_argument("--target", default=None,
                   help="engine, adapt: target model path or hub id instead of a config (demo:target for the demo pair)")
    p.add_argument("--drafter", default=None,
                   help="engine: drafter model path or hub id (demo:drafter-1l); vllm: drafter id of the config")
    p.add_argument("--k", type=int, default=4, help="draft length (the same for this engine and Hugging Face)")
    p.add_argument("--prompts", type=int, default=None, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--domain", default="python",
                   help="with a config, a chat domain: edit json explain summarize question story data (default edit); "
                        "with --target, a held-out demo domain: python shakespeare docs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--redis-url", default=None, help="loop: Redis to use (default: start a private one)")
    p.add_argument("--round-records", type=int, default=16, help="loop: records per learning round")
    p.add_argument("--drafters", nargs="*", default=None,
                   help="adapt: drafters with --target (default there: the two demo drafters)")
    p.add_argument("--schedule", default=None,
                   help="adapt: domain of each phase (default edit,explain,summarize,edit with a config, "
                        "python,shakespeare,docs,python with --target)")
    p.add_argument("--rounds-per-phase", type=int, default=None)
    p.add_argument("--per-round", type=int, default=None, help="adapt: prompts per round")
    p.add_argument("--seeds", type=int, default=None, help="adapt: streams (medians are reported)")
    p.add_argument("--methods", nargs="*", default=None, help="adapt: a subset of the methods")
    p.add_argument("--window", type=int, default=8, help="adapt: rounds in the dynamic regret comparator")
    p.add_argument("--prompt-tokens", type=int, default=96, help="adapt: prompt tokens kept (the last ones)")
    p.add_argument("--lr", type=float, default=None, help="adapt: step size of every learner (default 2e-4)")
    p.add_argument("--learner-config", default=None,
                   help="loop: learner settings the worker rate is measured with (default configs/learner.yaml); "
                        "adapt: every learning method's settings, under what makes the method")
    p.add_argument("--plot", default=None, help="adapt, live: write a PNG of the figures")
    p.add_argument("--config", default=None,
                   help="a service YAML (default: configs/demo.yaml, SmolLM2): engine, adapt: its target and "
                        "drafters on chat prompts; serve: its target and first drafter; faults, live: the service")
    p.add_argument("--minutes", type=float, default=8.0, help="live: minutes of traffic with learning")
    p.add_argument("--concurrency", type=int, default=4, help="live: client threads; prefix: clients")
    p.add_argument("--max-tokens", type=int, default=48, help="live: tokens per request")
    p.add_argument("--period", type=float, default=5.0, help="live: seconds between learning rounds at most")
    p.add_argument("--no-learning", action="store_true", help="live: start no worker (the serving cost alone)")
    p.add_argument("--order", default="shuffled", choices=["shuffled", "file"],
                   help="live: the prompts' order, cycled: shuffled (fixed seed; every quarter a sample of the "
                        "whole domain) or file (consecutive entries, as measured before stop 49)")
    p.add_argument("--probe-prompts", type=int, default=24,
                   help="live: prompts held out of the stream, served once by the first versions before learning "
                        "and once by the last after it (0: no probe)")
    p.add_argument("--slices", type=int, default=4,
                   help="live: turns of the closing comparison with speculation off (spec, off, off, spec, ...)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="serve: where the models run (auto: cuda when there is one)")
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="serve: the concurrency levels (default 1 2 4 8 16; --quick 1 4 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="serve, vllm: passes of each level, in turn (medians reported; default 3, --quick 1)")
    p.add_argument("--k-fixed", type=int, default=None,
                   help="serve: a fixed draft length instead of the batch-aware controller; vllm: drafts per step")
    p.add_argument("--scenarios", nargs="*", default=None,
                   help="faults: a subset of redis_kill worker_kill worker_kill_after_publish poison hostile_seed")
    p.set_defaults(func=_bench)

    p = sub.add_parser("up", help="Redis + server + workers on this machine (the demo by default)")
    p.add_argument("--config", default=None, help="service YAML (default: configs/demo.yaml)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.set_defaults(func=_up)

    p = sub.add_parser("traffic", help="send generation traffic from held-out text with domain shifts")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--schedule", default="explain:60,story:60,data:60",
                   help="phases domain:seconds (or domain:requests with --by-count), in order; demo domains "
                        "python shakespeare docs, chat domains edit json explain summarize question story data")
    p.add_argument("--by-count", action="store_true")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.0, help="requests per second overall (0: as fast as served)")
    p.add_argument("--turns", type=int, default=1,
                   help="turns of each chat conversation: the answers and a follow-up question are sent back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="onlinespec-traffic",
                   help="sent as the bearer key: one tenant for all the traffic ('' for none: no copies across requests)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_traffic)

    p = sub.add_parser("watch", help="live terminal view of versions, acceptance, weights and lag")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--once", action="store_true")
    p.add_argument("--count", type=int, default=0)
    p.set_defaults(func=_watch)

    p = sub.add_parser("drafter", help="a drafter's state and its transitions: list, pause, resume, pin, rollback, update",
                       description="The control plane of the drafters through Redis (what the admin API does): "
                                   "list their state, pause or resume learning, pin or roll back to a kept "
                                   "version (verified first), queue a learning round.")
    p.add_argument("action", choices=["list", "pause", "resume", "pin", "rollback", "update"])
    p.add_argument("drafter", nargs="?", default=None)
    p.add_argument("--version", type=int, default=None, help="pin, rollback: the kept version")
    p.add_argument("--config", default=None, help="service YAML (target, registry, Redis)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_drafter)

    p = sub.add_parser("config", help="show the effective service configuration and where each value came from")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config", default=None, help="service YAML (default: ONLINESPEC_CONFIG, else configs/demo.yaml)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_config)

    p = sub.add_parser("tune", help="tune the learners on exported feedback: export, import, run, show, apply",
                       description="export: the feedback stream to a file; import: back; run: an Optuna study "
                                   "replaying the file through learner configurations (trial 0 = the live one), "
                                   "resumable, in parallel on RQ workers with --workers; show: its table, best, "
                                   "importance, held-out check and plots; apply: the best to a live server")
    p.add_argument("action", choices=["export", "import", "run", "show", "apply"])
    p.add_argument("study", nargs="?", default=None, help="show/apply: a study name or directory (apply: or a best.yaml)")
    p.add_argument("--config", default=None, help="service YAML (target id, drafters, registry, workers' round_records)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--target", default=None, help="export/import: target id (default: the config's)")
    p.add_argument("--out", default=None, help="export: file to write (default feedback-TARGET-TIME.msgpack; "
                                               "never overwrites)")
    p.add_argument("--count", type=int, default=None, help="export: at most this many records")
    p.add_argument("--file", default=None, help="import/run: an exported feedback file (run copies it into the study)")
    p.add_argument("--study", dest="study_opt", default=None,
                   help="run: the study's name (under ONLINESPEC_STUDIES, default .onlinespec/studies) or directory; "
                        "an existing one resumes")
    p.add_argument("--space", default=None, help="run: search space YAML (default: the shipped configs/tune.yaml)")
    p.add_argument("--trials", type=int, default=None, help="run: trials besides the baseline (default: the space's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default=None, help="run: default the space's (tpe)")
    p.add_argument("--holdout", type=float, default=None, help="run: last share of the stream kept out of the search")
    p.add_argument("--drafter-id", default=None, help="run: the drafter whose live version and settings to start "
                                                      "from (default: the config's first); apply: the one to set")
    p.add_argument("--drafter", default=None, help="run: start from this model instead of the live version")
    p.add_argument("--base", default=None, help="run: baseline learner YAML instead of the live settings")
    p.add_argument("--offline", action="store_true", help="run: do not ask Redis for the live version and settings")
    p.add_argument("--k", type=int, default=4, help="run: draft length for the predicted accepted length")
    p.add_argument("--workers", type=int, default=0, help="run: enqueue this many trial jobs for RQ workers "
                                                          "(0: run the trials here)")
    p.add_argument("--no-wait", action="store_true", help="run --workers: return once the jobs are enqueued")
    p.add_argument("--heldout", action="store_true", help="show: compute the held-out check if it is missing")
    p.add_argument("--url", default=None, help="apply: base URL of the live server")
    p.add_argument("--token", default=None, help="apply: admin token (default: ONLINESPEC_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_tune)

    # Listed for --help; main() hands their arguments to their own parsers.
    sub.add_parser("serve", help="run the HTTP server (onlinespec serve --help)")
    sub.add_parser("worker", help="run an RQ worker for drafter updates (onlinespec worker --help)")
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from serving.__main__ import main as serve_main

        return serve_main(argv[1:])
    if argv and argv[0] == "worker":
        from workers.__main__ import main as worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args) or 0)
