"""``python -m serving`` (or ``onlinespec serve``): the HTTP server process.

Loads the target and drafters of the config, checks they share a vocabulary, registers the
drafters' base versions, then serves with feedback logging and hot swap when Redis is
configured (``--no-redis`` serves without either: nothing is learned).
"""

from __future__ import annotations

import argparse
import json
import logging
import os

log = logging.getLogger("onlinespec.server")


def build(config_path: str | None = None, no_redis: bool = False, on_stop=None):
    """(app, state, cfg, cleanup) for a config; ``on_stop``: called when the stop begins (the
    server's :class:`~serving.deadline.StopDeadline`)."""
    import torch

    from onlinespec.feedback import keys
    from onlinespec.config import load_config
    from onlinespec.device import resolve_device, resolve_dtype
    from onlinespec.drafters.cut import share_embedding
    from onlinespec.drafters.hf import HFDrafter
    from serving.hotswap import SwapWatcher
    from onlinespec.learn.learner import drafter_learner_configs
    from onlinespec.models import check_same_vocab, load_model, load_tokenizer
    from onlinespec.redis_server import connect
    from onlinespec.learn.registry import Registry
    from onlinespec.decode.routing import DrafterRouter
    from onlinespec.feedback.stream import FeedbackWriter
    from serving.admin import admin_router
    from serving.app import create_app
    from serving.dashboard import dashboard_router

    cfg = load_config(config_path)
    learners = drafter_learner_configs(cfg)  # a bad drafter learner setting fails here, before any model loads
    s = cfg.serving
    if s.threads:
        torch.set_num_threads(s.threads)
    device, dtype = resolve_device(s.device), resolve_dtype(s.dtype)
    tokenizer = load_tokenizer(cfg.target_model)
    on_vllm = s.engine == "vllm"
    if on_vllm:  # vLLM loads the target itself; the drafters are checked against its vocabulary size
        from transformers import AutoConfig

        from onlinespec.models import resolve_model_path

        target = int(AutoConfig.from_pretrained(resolve_model_path(cfg.target_model)).vocab_size)
    else:
        target = load_model(cfg.target_model, dtype=dtype, device=device)
        log.info("target %s on %s in %s", cfg.target_model, device, str(dtype).removeprefix("torch."))
        if device == "cpu" and dtype == torch.float32:  # cut drafters use the target's embedding, not a copy
            share_embedding(cfg.target_model, target)
    bases = {}
    for spec in cfg.drafters:
        model = load_model(spec.model, dtype=dtype, device=device)
        check_same_vocab(cfg.target_model, target, spec.model, model, tokenizer, _maybe_tokenizer(spec.model))
        bases[spec.id] = (model, spec.model)

    redis = registry = writer = watcher = router = None
    drafters: dict[str, HFDrafter] = {}
    estimates: dict[str, dict] = {}  # drafter -> its serving version's acceptance estimate
    if not no_redis:
        redis = connect(cfg.redis_url)
        registry = Registry(cfg.registry, redis)
        for did, (model, name) in bases.items():
            if device != "cpu" or dtype != torch.float32:  # the registry keeps float32 weights on the CPU
                model = load_model(name)
            registry.bootstrap(did, model, base=name)
            redis.sadd(keys.drafters_set(cfg.target_id), did)
            redis.set(keys.learner_config(did), json.dumps(learners[did].to_dict()), nx=True)
            latest = registry.latest(did)
            model, manifest = registry.load_model(did, latest, device=device, dtype=dtype)
            drafters[did] = HFDrafter(model, did, version=latest)
            estimates[did] = manifest.metrics.get("acceptance_estimate") or {}
        writer = FeedbackWriter(redis, cfg.target_id, maxlen=cfg.stream_maxlen, features_ttl=s.features_ttl)
        if len(drafters) > 1:
            router = DrafterRouter(list(drafters), explore=s.explore)
        watcher = SwapWatcher(redis, registry, drafters, rollback=s.rollback, margin=s.rollback_margin,
                              min_drafted=s.rollback_min_drafted, pool_target=cfg.target_id,
                              router=router)
        watcher.estimates.update(estimates)
        watcher.start()
    else:
        drafters = {did: HFDrafter(model, did, version=0) for did, (model, _) in bases.items()}

    if on_vllm:
        state = _vllm_state(cfg, tokenizer, drafters, writer, watcher, redis, router, registry,
                            {spec.id: spec.model for spec in cfg.drafters})
    else:
        state = _embedded_state(cfg, target, tokenizer, drafters, estimates, writer, watcher, redis, router)
    app = create_app(state, on_shutdown=[lambda: cleanup()])  # the lifespan stops what this process owns
    if redis is not None:
        app.include_router(admin_router(cfg.admin_token, redis, registry, drafters, cfg.target_id))
    app.include_router(dashboard_router(state, redis, registry, drafters, cfg.target_id,
                                        admin_token=cfg.admin_token))

    stopped = []

    def cleanup():  # the owner of each background task stops it (once: the lifespan, then main's finally)
        if stopped:
            return
        stopped.append(True)
        if on_stop is not None:
            on_stop()
        state.loop.stop()
        if state.extra.get("sampler"):
            state.extra["sampler"].stop()
        if watcher:
            watcher.stop()
        if writer:
            writer.close()

    return app, state, cfg, cleanup


def _embedded_state(cfg, target, tokenizer, drafters, estimates, writer, watcher, redis, router):
    """The server state around OnlineSpec's own engine (``serving.engine: embedded``)."""
    from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
    from onlinespec.decode.suffix import SuffixCache
    from onlinespec.feedback.stream import recent_records
    from serving.server import build_state

    s = cfg.serving
    first = next(iter(drafters.values()), None)
    cache = SuffixCache(s.suffix) if s.suffix.enabled else None
    if cache is not None and redis is not None:  # a restart keeps what suffix speculation learned
        records, bad = recent_records(redis, cfg.target_id, s.suffix.max_tokens)
        log.info("suffix speculation: warmed from %d logged outputs (%d tokens)%s", cache.warm(records),
                 cache.tokens, f"; {bad} malformed records skipped" if bad else "")
    from onlinespec.drafters.feature import is_feature
    from onlinespec.learn.estimate import overall

    capture = s.capture_features
    if capture is None:  # feature drafters learn from captured features: capture a share when one serves
        capture = 0.25 if any(is_feature(d.model) for d in drafters.values()) else 0.0
    engine = SpeculativeEngine(target, first, tokenizer=tokenizer, config=EngineConfig(
        k=s.k, k_max=s.k_max, feedback_topk=s.feedback_topk, drafter_context=s.drafter_context,
        capture_feedback=writer is not None, target_id=cfg.target_id, capture_features=capture), suffix=cache)
    for did, estimate in estimates.items():  # each version starts from what its learners measured
        engine.k_controller.start_version(did, overall(estimate))
    return build_state(engine, tokenizer, cfg.target_id, writer=writer, watcher=watcher, redis=redis,
                       max_active=s.max_active, max_queue=s.max_queue, prefill_tokens=s.prefill_tokens,
                       kv_cache_tokens=s.kv_cache_tokens or None, prefix_cache_tokens=s.prefix_cache_tokens,
                       prefix_cache_scope=s.prefix_cache_scope,
                       max_prompt_tokens=s.max_prompt_tokens, max_request_bytes=s.max_request_bytes,
                       max_tokens=s.max_tokens, drafters=drafters, api_keys=cfg.api_keys, router=router,
                       max_requests_per_tenant=s.max_requests_per_tenant)


def _vllm_state(cfg, tokenizer, drafters, writer, watcher, redis, router, registry=None, specs=None):
    """The server state around vLLM's engine (``serving.engine: vllm``), OnlineSpec's drafters inside it."""
    from onlinespec.models import resolve_model_path
    from onlinespec.vllm_backend.engine import start_engine
    from serving.server import build_state
    from serving.vllm_loop import VllmLoop, vllm_exposition

    s = cfg.serving
    # where vLLM runs the proposer in other processes, each builds the drafters from these
    drafter_specs = [{"id": did, "version": h.version,
                      "dir": str(registry.path(did, h.version)) if registry is not None else None,
                      "model": (specs or {}).get(did)} for did, h in drafters.items()]
    engine, link = start_engine(cfg, resolve_model_path(cfg.target_model),
                                speculate=bool(drafters) or s.suffix.enabled, drafters=drafters,
                                drafter_specs=drafter_specs, registry_root=str(cfg.registry))
    if link is not None and link.suffix_config is not None and redis is not None:
        # a restart keeps what suffix speculation learned
        from onlinespec.decode.suffix import copyable_outputs
        from onlinespec.feedback.stream import recent_records

        records, bad = recent_records(redis, cfg.target_id, s.suffix.max_tokens)
        warmed = 0
        for prompt, generated, scope in copyable_outputs(records, link.suffix_config):
            link.add_output(prompt, generated, scope)
            warmed += 1
        link.flush()
        log.info("suffix speculation: warmed from %d logged outputs%s", warmed,
                 f"; {bad} malformed records skipped" if bad else "")

    def make_loop(metrics):
        metrics.expose(vllm_exposition)
        if link is not None:
            from serving.metrics import Counter

            metrics.sample(Counter("vllm_step_draft_length_total",
                                   "vLLM steps by the length the drafter models drafted (0: muted; copies go at full length)."),
                           lambda: {(("k", k),): n for k, n in link.stats["chosen"].items()})
            metrics.sample(Counter("vllm_steps_with_drafter_model_total",
                                   "vLLM steps where the drafter models drafted (the others: copies or nothing)."),
                           lambda: {(): link.stats["modelled"]})
            metrics.sample(Counter("vllm_drafter_weight_updates_total",
                                   "Drafter versions copied into vLLM through its weight-update API."),
                           lambda: {(): link.stats["updates"]})
            metrics.sample(Counter("vllm_drafter_weight_update_seconds_total",
                                   "Time vLLM's weight updates of the drafters took (reading and checking included)."),
                           lambda: {(): link.stats["update_seconds"]})
        return VllmLoop(engine, link, metrics, cfg.target_id, writer=writer, watcher=watcher,
                        max_active=s.max_active, max_queue=s.max_queue, drafters=drafters, router=router,
                        k=s.k, feedback_topk=s.feedback_topk, prefix_scope=s.prefix_cache_scope)

    return build_state(None, tokenizer, cfg.target_id, writer=writer, watcher=watcher, redis=redis,
                       max_active=s.max_active, max_queue=s.max_queue, max_prompt_tokens=s.max_prompt_tokens,
                       max_tokens=s.max_tokens, drafters=drafters, api_keys=cfg.api_keys, router=router,
                       make_loop=make_loop, max_request_bytes=s.max_request_bytes,
                       max_requests_per_tenant=s.max_requests_per_tenant)


def _maybe_tokenizer(name: str):
    try:
        from onlinespec.models import load_tokenizer

        return load_tokenizer(name)
    except Exception:  # noqa: BLE001 - a drafter without its own tokenizer shares the target's
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="onlinespec serve", description=__doc__)
    ap.add_argument("--config", default=os.environ.get("ONLINESPEC_CONFIG"))
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--no-redis", action="store_true", help="serve without feedback logging and hot swap")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    import uvicorn

    from serving.deadline import StopDeadline

    # in-flight requests get serving.stop_timeout seconds to finish (uvicorn), then what the server
    # owns gets as long again to stop, or the deadline ends the process and its children
    deadline = StopDeadline()
    app, state, cfg, cleanup = build(args.config, args.no_redis,
                                     on_stop=lambda: deadline.arm(cfg.serving.stop_timeout))
    host = args.host or cfg.serving.host  # ONLINESPEC_HOST / ONLINESPEC_PORT: through the config
    port = args.port or cfg.serving.port
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=cfg.serving.stop_timeout)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
