"""``onlinespec traffic``: generation traffic through the HTTP API, with domain shifts.

Prompts are the held-out snippets of the demo domains (``python``, ``shakespeare``, ``docs``:
never trained on), sent as completions, or instruct conversations of the chat domains (``edit``,
``json``, ``explain``, ``summarize``, ``question``, ``story``, ``data``: :mod:`onlinespec.decode.chat`),
sent as chat completions; with ``--turns N`` each chat conversation goes on for N turns (its
answers sent back, with a follow-up question), so its later prompts begin with its earlier text,
as a chat client's do (the server's prefix cache reads them once: the summary gives the share of
prompt tokens it served). Every
request carries ``--api-key`` (one tenant: suffix speculation copies across its requests). The
schedule is a list of ``domain:seconds`` (or ``domain:requests`` with ``--by-count``) phases,
played in order; ``--concurrency`` clients send requests, ``--rate`` caps requests per second overall.
A progress line runs while it works; the summary tables give requests, tokens and the mean
accepted length (tokens per draft step, pooled over requests) per drafter version and per phase,
from the responses' ``speculative`` fields.
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

from onlinespec.decode.chat import DOMAINS as CHAT_DOMAINS
from onlinespec.decode.chat import FOLLOW_UPS, chat_prompts
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


@dataclass
class _Tally:
    requests: int = 0
    tokens: int = 0
    accepted: int = 0  # draft tokens accepted
    draft_steps: int = 0  # steps that verified drafts
    copied_accepted: int = 0  # of the accepted drafts, copied by suffix speculation
    own_accepted: int = 0  # the drafter model's own accepted drafts
    own_steps: int = 0  # steps with own drafts

    def add(self, tokens: int, accepted: int, draft_steps: int, copied_accepted: int = 0, own: dict | None = None
            ) -> None:
        self.own_accepted += int((own or {}).get("accepted_tokens") or 0)
        self.own_steps += int((own or {}).get("draft_steps") or 0)
        self.requests += 1
        self.tokens += tokens
        self.accepted += accepted
        self.draft_steps += draft_steps
        self.copied_accepted += copied_accepted

    @property
    def copied_share(self) -> float | None:
        """Share of the accepted drafts that suffix speculation copied."""
        return self.copied_accepted / self.accepted if self.accepted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens per draft step over all the requests (not a mean of per-request means)."""
        return (self.accepted + self.draft_steps) / self.draft_steps if self.draft_steps else None

    @property
    def own_accepted_length(self) -> float | None:
        """The drafter model's own accepted drafts per step it drafted in, plus one (copies apart)."""
        return 1.0 + self.own_accepted / self.own_steps if self.own_steps else None


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.errors = self.tokens = 0
        self.prompt_tokens = self.cached_tokens = 0  # cached: read from the server's prefix cache
        self.by_version: dict[tuple, _Tally] = defaultdict(_Tally)  # (drafter, version)
        self.by_phase: dict[int, _Tally] = defaultdict(_Tally)  # phase index at the time of sending

    def add(self, body: dict, phase: int) -> None:
        spec = body.get("speculative") or {}
        n = body["usage"]["completion_tokens"]
        accepted = int(spec.get("accepted_tokens") or 0)
        steps = spec.get("draft_steps")
        if steps is None:  # a server without draft_steps: recover it from the mean
            mal = spec.get("mean_accepted_length") or 1.0
            steps = round(accepted / (mal - 1)) if mal > 1 else 0
        copied = int(spec.get("copied_accepted_tokens") or 0)
        key = (spec.get("drafter_id"), spec.get("drafter_version"))
        usage = body["usage"]
        with self.lock:
            self.requests += 1
            self.tokens += n
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.cached_tokens += int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            self.by_version[key].add(n, accepted, int(steps), copied, spec.get("own"))
            self.by_phase[phase].add(n, accepted, int(steps), copied, spec.get("own"))


def run(args) -> int:
    if args.turns < 1:
        raise SystemExit(f"--turns must be at least 1, got {args.turns}")
    phases = parse_schedule(args.schedule)
    prompts = {p.domain: (chat_prompts(p.domain, 200) if p.domain in CHAT_DOMAINS else
                          [r.text for r in load_prompts(p.domain)]) for p in phases}
    rng = random.Random(args.seed)
    stats = _Stats()
    stop = threading.Event()
    current = {"phase": phases[0], "index": 0}
    interval = 1.0 / args.rate if args.rate else 0.0
    next_slot = [time.monotonic()]
    slot_lock = threading.Lock()
    counter = itertools.count()

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def client():
        # a chat conversation goes on for args.turns turns (its answers and a follow-up each time)
        # before the client starts another; a new phase or a failed request starts another too
        conversation, turn = None, 0
        with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as http:
            while not stop.is_set():
                if interval:
                    with slot_lock:
                        wait = next_slot[0] - time.monotonic()
                        next_slot[0] = max(next_slot[0], time.monotonic()) + interval
                    if wait > 0 and stop.wait(wait):
                        return
                phase, domain = current["index"], current["phase"].domain
                with slot_lock:  # one generator shared by the clients
                    prompt, seed = rng.choice(prompts[domain]), next(counter)
                body = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                        "seed": seed, "metadata": {"domain": domain}}
                chat = domain in CHAT_DOMAINS
                if chat and conversation is not None and conversation[0] == phase and turn < args.turns:
                    prompt = conversation[1] + [{"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
                else:
                    turn = 0
                body.update({"messages": prompt} if chat else {"prompt": prompt})
                conversation = None
                try:
                    r = http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
                    if r.status_code == 200:
                        answer = r.json()
                        stats.add(answer, phase)
                        turn += 1
                        if chat and turn < args.turns:
                            said = answer["choices"][0]["message"]["content"]
                            conversation = (phase, prompt + [{"role": "assistant", "content": said}])
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
    tty = sys.stderr.isatty()  # a redrawn bar on a terminal; in a log, a plain line every 10 s
    last_line = 0.0
    [t.start() for t in threads]
    try:
        for i, phase in enumerate(phases):
            current.update(phase=phase, index=i)
            t0, r0 = time.monotonic(), stats.requests
            while True:
                done = (stats.requests - r0) / phase.amount if args.by_count else (time.monotonic() - t0) / phase.amount
                elapsed = time.monotonic() - t_start
                bar = "#" * int(min(1.0, done) * 30)
                line = (f"[{i + 1}/{len(phases)}] {phase.domain:<12} [{bar:<30}] {stats.requests} req "
                        f"{stats.tokens / max(elapsed, 1e-9):6.1f} tok/s {stats.errors} errors")
                if tty:
                    print("\r" + line, end="", file=sys.stderr)
                elif elapsed - last_line >= 10.0 or done >= 1.0:
                    print(line, file=sys.stderr, flush=True)
                    last_line = elapsed
                if done >= 1.0:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        [t.join(args.timeout) for t in threads]
    elapsed = time.monotonic() - t_start
    if tty:
        print(file=sys.stderr)
    rows = []
    def by_drafter_then_version(item):
        (drafter, version), _ = item
        return str(drafter), version if isinstance(version, int) else -1

    for (drafter, version), t in sorted(stats.by_version.items(), key=by_drafter_then_version):
        rows.append({"drafter": drafter, "version": version, "requests": t.requests, "tokens": t.tokens,
                     "mean_accepted_length": t.mean_accepted_length, "own_accepted_length": t.own_accepted_length,
                     "copied_share": t.copied_share})
    phase_rows = [{"phase": i, "domain": phases[i].domain, "requests": t.requests, "tokens": t.tokens,
                   "mean_accepted_length": t.mean_accepted_length, "own_accepted_length": t.own_accepted_length,
                   "copied_share": t.copied_share}
                  for i, t in sorted(stats.by_phase.items())]

    def mal(value):
        return f"{value:.3f}" if value else "-"

    def share(value):
        return f"{value:.2f}" if value is not None else "-"

    print(f"{'drafter':<14}{'version':>8}{'requests':>10}{'tokens':>9}{'mean acc. len':>15}{'own':>7}{'copied':>8}")
    for r in rows:
        print(f"{str(r['drafter']):<14}{str(r['version']):>8}{r['requests']:>10}{r['tokens']:>9}"
              f"{mal(r['mean_accepted_length']):>15}{mal(r['own_accepted_length']):>7}{share(r['copied_share']):>8}")
    print(f"\n{'phase':<22}{'requests':>10}{'tokens':>9}{'mean acc. len':>15}{'own':>7}{'copied':>8}")
    for r in phase_rows:
        print(f"{str(r['phase'] + 1) + ' ' + r['domain']:<22}{r['requests']:>10}{r['tokens']:>9}"
              f"{mal(r['mean_accepted_length']):>15}{mal(r['own_accepted_length']):>7}{share(r['copied_share']):>8}")
    print("own: the drafter model's own accepted length (copies apart); "
          "copied: share of the accepted drafts that suffix speculation copied")
    summary = {"requests": stats.requests, "errors": stats.errors, "seconds": elapsed,
               "tokens_per_s": stats.tokens / elapsed if elapsed else 0.0, "by_version": rows, "by_phase": phase_rows,
               "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
               "cached_share": stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else None}
    print(f"total: {stats.requests} requests, {stats.errors} errors, {summary['tokens_per_s']:.1f} tokens/s; "
          f"{stats.prompt_tokens} prompt tokens, {share(summary['cached_share'])} of them from the prefix cache")
    if args.json:
        print(json.dumps(summary))
    return 0 if stats.requests else 1
