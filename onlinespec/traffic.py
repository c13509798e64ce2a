"""``onlinespec traffic``: generation traffic through the HTTP API, with domain shifts.

Prompts are the held-out snippets of the demo domains (never trained on). The schedule is a
list of ``domain:seconds`` (or ``domain:requests`` with ``--by-count``) phases, played in
order; ``--concurrency`` clients send requests, ``--rate`` caps requests per second overall.
A progress line runs while it works; the summary table gives requests, tokens/s and the mean
accepted length per drafter version, as the responses' ``speculative`` fields report them.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import httpx

from onlinespec.demo.prompts import load_prompts

__all__ = ["Phase", "parse_schedule", "run"]


@dataclass(frozen=True)
class Phase:
    domain: str
    amount: float  # seconds, or requests with by_count


def parse_schedule(text: str) -> list[Phase]:
    phases = []
    for part in text.split(","):
        domain, _, amount = part.strip().partition(":")
        if not domain or not amount:
            raise ValueError(f"bad schedule item {part!r}: expected domain:amount")
        phases.append(Phase(domain, float(amount)))
    return phases


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.errors = self.tokens = 0
        self.by_version = defaultdict(lambda: [0, 0, 0.0])  # (drafter, version) -> requests, tokens, sum(mal*steps)
        self.steps = defaultdict(float)

    def add(self, body: dict) -> None:
        spec = body.get("speculative") or {}
        n = body["usage"]["completion_tokens"]
        key = (spec.get("drafter_id"), spec.get("drafter_version"))
        with self.lock:
            self.requests += 1
            self.tokens += n
            row = self.by_version[key]
            row[0] += 1
            row[1] += n
            if spec.get("mean_accepted_length"):
                row[2] += spec["mean_accepted_length"] * n  # token-weighted mean
                self.steps[key] += n


def run(args) -> int:
    phases = parse_schedule(args.schedule)
    prompts = {p.domain: [r.text for r in load_prompts(p.domain)] for p in phases}
    rng = random.Random(args.seed)
    stats = _Stats()
    stop = threading.Event()
    current = {"phase": phases[0], "index": 0}
    interval = 1.0 / args.rate if args.rate else 0.0
    next_slot = [time.monotonic()]
    slot_lock = threading.Lock()
    counter = itertools.count()

    def client():
        with httpx.Client(base_url=args.url, timeout=args.timeout) as http:
            while not stop.is_set():
                if interval:
                    with slot_lock:
                        wait = next_slot[0] - time.monotonic()
                        next_slot[0] = max(next_slot[0], time.monotonic()) + interval
                    if wait > 0 and stop.wait(wait):
                        return
                domain = current["phase"].domain
                body = {"model": args.model, "prompt": rng.choice(prompts[domain]), "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "seed": next(counter)}
                try:
                    r = http.post("/v1/completions", json=body)
                    if r.status_code == 200:
                        stats.add(r.json())
                    else:
                        with stats.lock:
                            stats.errors += 1
                except httpx.HTTPError:
                    with stats.lock:
                        stats.errors += 1

    if args.model is None:
        args.model = httpx.get(args.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
    t_start = time.monotonic()
    [t.start() for t in threads]
    try:
        for i, phase in enumerate(phases):
            current.update(phase=phase, index=i)
            t0, r0 = time.monotonic(), stats.requests
            while True:
                done = (stats.requests - r0) / phase.amount if args.by_count else (time.monotonic() - t0) / phase.amount
                elapsed = time.monotonic() - t_start
                bar = "#" * int(min(1.0, done) * 30)
                print(f"\r[{i + 1}/{len(phases)}] {phase.domain:<12} [{bar:<30}] {stats.requests} req "
                      f"{stats.tokens / max(elapsed, 1e-9):6.1f} tok/s {stats.errors} errors", end="", file=sys.stderr)
                if done >= 1.0:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        [t.join(args.timeout) for t in threads]
    elapsed = time.monotonic() - t_start
    print(file=sys.stderr)
    rows = []
    for (drafter, version), (n, tokens, mal_sum) in sorted(stats.by_version.items(), key=lambda kv: str(kv[0])):
        steps = stats.steps[(drafter, version)]
        rows.append({"drafter": drafter, "version": version, "requests": n, "tokens": tokens,
                     "mean_accepted_length": mal_sum / steps if steps else None})
    print(f"{'drafter':<14}{'version':>8}{'requests':>10}{'tokens':>9}{'mean acc. len':>15}")
    for r in rows:
        mal = f"{r['mean_accepted_length']:.3f}" if r["mean_accepted_length"] else "-"
        print(f"{str(r['drafter']):<14}{str(r['version']):>8}{r['requests']:>10}{r['tokens']:>9}{mal:>15}")
    summary = {"requests": stats.requests, "errors": stats.errors, "seconds": elapsed,
               "tokens_per_s": stats.tokens / elapsed if elapsed else 0.0, "by_version": rows}
    print(f"total: {stats.requests} requests, {stats.errors} errors, {summary['tokens_per_s']:.1f} tokens/s")
    if args.json:
        print(json.dumps(summary))
    return 0 if stats.requests else 1
