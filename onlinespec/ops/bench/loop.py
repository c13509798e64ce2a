"""``onlinespec bench loop``: what the learning loop costs the server, and whether workers keep up.

Real Redis (``REDIS_URL``, or a private server started here), the real writer, updater, registry
and swap watcher, on the demo models (or ``--target``/``--drafter``):

- ``logging_overhead``: seconds spent capturing feedback (top-K copies, building the record,
  queuing it) / seconds of decoding, over the same requests. Goal <= 0.03.
- ``swap_stall_ms``: the longest engine stall a swap caused: the longest step that began with a
  swap, minus the median ordinary step (prefill steps excluded from both). Goal <= 20. Beside
  it: ``swap_apply_ms_max`` (the swap itself) and ``p99_ordinary_step_excess_ms`` (how far an
  ordinary step strays above the median on this machine without any swap: the noise floor).
- ``worker_rate_ratio``: generated tokens per second one worker learns from (rounds through the
  updater: read, learn, publish, ack) / generated tokens per second one server produces, with
  the shipped learner settings (``configs/learner.yaml``, or ``--learner-config``). Goal >= 3.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time

import torch

from onlinespec.feedback import keys
from onlinespec.ops.bench.common import emit, machine, setup
from onlinespec.config import CONFIGS
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from serving.hotswap import SwapWatcher
from onlinespec.learn.learner import LearnerConfig
from onlinespec.redis_server import EmbeddedRedis, connect
from onlinespec.learn.registry import Registry
from onlinespec.decode.sampling import SamplingParams
from onlinespec.feedback.stream import FeedbackWriter
from onlinespec.learn.round import Updater

__all__ = ["run"]

TARGET = "bench-target"
DRAFTER = "bench-drafter"


def _serve(engine, prompts, params, writer, watcher=None, step_times=None):
    """Decode every prompt; returns (decode seconds, capture seconds, generated tokens)."""
    decode = capture = 0.0
    tokens = 0
    for i, prompt in enumerate(prompts):
        gen = engine.start(prompt, SamplingParams(**{**params.__dict__, "seed": i}))
        while not gen.finished:
            t0 = time.perf_counter()
            swapped = watcher.apply() if watcher is not None else []
            first = not gen.generated  # this step prefills the prompt: not comparable
            gen.step()
            dt = time.perf_counter() - t0
            if step_times is not None and not first:
                step_times.append((dt, bool(swapped)))
            decode += dt
        t0 = time.perf_counter()
        if writer is not None:
            writer.submit(gen.record())
        capture += gen.stats.capture_seconds + (time.perf_counter() - t0)
        decode += time.perf_counter() - t0
        tokens += len(gen.generated)
    return decode, capture, tokens


def _learner_config(path: str | None) -> LearnerConfig:
    if path:
        return LearnerConfig.from_yaml(path)
    shipped = CONFIGS / "learner.yaml"
    return LearnerConfig.from_yaml(shipped) if shipped.exists() else LearnerConfig()


def run(args) -> int:
    s = setup(args)
    threads, target_name, drafter_name = s.threads, s.target_name, s.drafter_name
    tokenizer, target, base, prompts, max_new = s.tokenizer, s.target, s.drafter, s.prompts, s.max_new_tokens
    n = len(prompts)
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0)

    server = None
    url = args.redis_url
    if not url:
        server = EmbeddedRedis().start()
        url = server.url
    client = connect(url)
    root = tempfile.mkdtemp(prefix="onlinespec-bench-registry-")
    try:
        registry = Registry(root, client, keep=5)
        for key in client.scan_iter(match="onlinespec:*bench-*"):
            client.delete(key)
        registry.bootstrap(DRAFTER, base)
        served = HFDrafter(registry.load_model(DRAFTER, registry.latest(DRAFTER))[0], DRAFTER,
                           version=registry.latest(DRAFTER))
        config = EngineConfig(k=args.k, target_id=TARGET)
        engine = SpeculativeEngine(target, served, tokenizer=tokenizer, config=config)
        writer = FeedbackWriter(client, TARGET)
        _serve(engine, prompts[:1], SamplingParams(max_new_tokens=8), None)  # warm-up

        # 1. logging overhead on the served path
        decode, capture, tokens = _serve(engine, prompts, params, writer)
        writer.flush()
        server_rate = tokens / decode

        # 2. worker rate: rounds over what was just logged (and more of the same if needed)
        updater = Updater(client, registry, TARGET, consumer="bench", round_records=args.round_records)
        client.set(keys.learner_config(DRAFTER), json.dumps(_learner_config(args.learner_config).to_dict()))
        learned_tokens, learn_seconds = 0, 0.0
        while True:
            result = updater.run_round(DRAFTER)
            if result.status != "published":
                break
            learned_tokens += result.metrics["generated_tokens"]
            learn_seconds += result.seconds
        worker_rate = learned_tokens / learn_seconds if learn_seconds else 0.0

        # 3. swap stall: serve while the latest version keeps changing. Versions are written
        # beforehand (in a deployment a worker process writes them); during serving a thread only
        # moves the latest pointer, so what runs in this process is what a server really does:
        # the watcher loading and validating each version, and the swap between steps.
        model = registry.load_model(DRAFTER, registry.latest(DRAFTER))[0]
        kept = []
        for _ in range(4):
            with torch.no_grad():
                model.lm_head.weight.mul_(1.0 + 1e-4)
            kept.append(registry.publish(DRAFTER, model, parent=registry.latest(DRAFTER)).version)
        watcher = SwapWatcher(client, registry, {DRAFTER: served}, poll_seconds=0.05, rollback=False)
        watcher.check(DRAFTER)
        watcher.apply()
        watcher.start()
        stop = threading.Event()

        def publisher():
            i = 0
            while not stop.wait(0.5):
                registry.rollback(DRAFTER, kept[i % len(kept)], reason="bench")
                watcher.refused.clear()
                i += 1

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        steps: list[tuple[float, bool]] = []
        _serve(engine, prompts, params, None, watcher, steps)
        stop.set()
        thread.join()
        watcher.stop()
        writer.close()
        plain_steps = sorted(dt for dt, swapped in steps if not swapped)
        plain = statistics.median(plain_steps)
        stalls = [(dt - plain) * 1000 for dt, swapped in steps if swapped]
        p99_plain = plain_steps[int(0.99 * (len(plain_steps) - 1))]
    finally:
        client.close()
        if server:
            server.stop()

    result = {
        "logging_overhead": capture / decode,
        "swap_stall_ms": max(stalls) if stalls else 0.0,
        "swaps": len(stalls),
        "swap_apply_ms_max": watcher.stats.max_apply_ms,
        "p99_ordinary_step_excess_ms": (p99_plain - plain) * 1000,
        "worker_rate_ratio": worker_rate / server_rate,
        "server_tokens_per_s": server_rate,
        "worker_tokens_per_s": worker_rate,
        "median_step_ms": plain * 1000,
        "writer_dropped": writer.stats.dropped,
        "target": target_name, "drafter": drafter_name, "k": args.k, "prompts": n,
        "max_new_tokens": max_new, "round_records": args.round_records, "threads": threads, "machine": machine(),
    }
    table = [(k, result[k]) for k in ("logging_overhead", "swap_stall_ms", "swaps", "swap_apply_ms_max",
                                      "p99_ordinary_step_excess_ms", "worker_rate_ratio",
                                      "server_tokens_per_s", "worker_tokens_per_s", "median_step_ms", "writer_dropped")]
    emit(table, result, args.json)
    return 0
