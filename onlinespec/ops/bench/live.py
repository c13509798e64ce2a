"""``onlinespec bench live``: does what the drafters learn reach the served speed?

Starts the real service on loopback (a private Redis, the HTTP server and one worker, supervised
as ``onlinespec up`` runs them) on a config's models, and sends a stream of greedy completions
from a domain the drafters were not started on: IDLE's change log (``idlelib/NEWS*.txt``, shipped
with Python and used nowhere else in the project), each prompt a few consecutive entries to
continue, sent in an order shuffled once with a fixed seed and cycled (``--order file``: in file
order, as the figures before stop 49 were measured), so that every quarter of the run is a
sample of the whole domain rather than its own stretch of the change log: entries of one stretch
are alike, and in file order the quarters' figures drifted by 1.14x with no learning at all.
Every request has its own ``user``, so suffix speculation cannot carry copies from one
request to the next: what improves must be the drafters. Requests declare
``metadata.domain: changelog``.

Reported per quarter of the run (by completion time): the drafters' own accepted length (their
accepted drafts per step they drafted in, plus one; copies apart), the share of generated tokens
that were the drafters' accepted drafts and the share that were accepted copies, aggregate
tokens/s, and the drafter versions serving; and, since a block of ``k`` drafts yields at most
``k + 1`` tokens whatever the drafter could do, what the accepted length is made of: the drafters'
acceptance per drafted position (``own_acceptance``: their accepted drafts / their drafts), their
acceptance per position (``own_position_acceptance``: their accepted drafts / their drafts the
target judged on its own text, up to each block's first rejection: the figure the learners
measure teacher-forced, which drafts past a rejection do not dilute) and
how many they drafted per step they drafted in (``own_draft_length``, the draft lengths the
controller gave them); and what the learners measured of the drafters without drafting
(``learned_acceptance``, per drafter: each learning round scores the version serving then on
every position of its records, drafted or not, before learning from them; the rounds that ran
in the quarter, weighted by positions): a figure the draft lengths the server chose do not
shape; how the learning kept up (``learning``, per drafter: rounds, the share of the time they
ran, tokens learned per second, how long records waited to be learned: :func:`learning_pace`);
and the prompts' mean length (``prompt_tokens``: their prefill is part of the time, and
the domain's prompts differ in length by a factor of 2 from one stretch to the next). Then
learning stops, and the last quarter's prompts, in the order they were sent (cycled), are served
for a quarter's length in turns (``--slices``, spec, off, off, spec, ...), after an unmeasured
warm-up of up to 15 s on each server (without it the first turn, right after the learning phase
ends and the off server starts, ran slowest): by the service with the versions learning left, and by the same target with speculation off (no drafters, no suffix
speculation; a server of its own). ``paired`` reports both and ``spec_vs_off``, on over off, on
the same prompts in the same stretch of the machine's time (on a shared machine whose speed
drifts by a third within an hour, a figure measured after the run compares badly with one
measured during it); ``nospec_tokens_per_s`` is the off side's, and the last quarter over it is
speculation while learning beside it (on 2 cores the learner takes CPU from the server).

The quarters cannot say what learning changed from the start: the first quarter is served by
versions that already learn (24-33 feature drafter versions were published in it in stop 50's
runs). So ``--probe-prompts`` (default 24) of the domain's prompts are held out of the stream
and served once each twice, with no learner running: by the first versions, after a warm-up and
before the worker starts, and by the versions learning left, after it stops (each pass with a
prefix cache salt of its own). The first pass's feedback is deleted before any learner reads
it, so no version learned from the probe. ``probe``: both passes' figures and ``gain``, last
over first.

JSON (last line with ``--json``): ``{"quarters": [{"own_accepted_length", "own_acceptance",
"own_position_acceptance", "own_draft_length", "own_draft_share", "copied_share", "tokens_per_s", "prompt_tokens", "versions", "requests",
"learned_acceptance", "learned_acceptance_deeper", "learning"}], "nospec_tokens_per_s", "nospec_prompt_tokens",
"paired": {"spec_tokens_per_s", "off_tokens_per_s", "spec_vs_off", "spec_prompt_tokens", "off_prompt_tokens",
"slices": [{"side", "tokens_per_s"}]}, "gain": {"own_accepted_length", "own_acceptance", "own_position_acceptance", "tokens_per_s",
"learned_acceptance"}, "probe": {"prompts", "before", "after", "gain"} (null with --probe-prompts 0),
"engine": {"spec", "off"}, "config", "minutes", "order", "machine"}``;
``engine`` is where each server's engine spent its time (:func:`engine_profile`).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from onlinespec.ops.bench.common import emit, machine
from onlinespec.config import DEFAULT_CONFIG, load_config
from onlinespec.feedback import keys

__all__ = ["changelog_prompts", "stream_order", "split_probe", "summarize", "turns", "paired_summary", "learned_acceptance", "engine_profile", "run"]

DOMAIN = "changelog"
WARMUP_SECONDS = 15.0  # each server's unmeasured warm-up before the paired turns
PROBE_PROMPTS = 24  # prompts held out of the stream, served once before learning and once after it


def changelog_prompts(entries_per_prompt: int = 3) -> list[str]:
    """Prompts of consecutive change-log entries from IDLE's NEWS files, in file order."""
    spec = importlib.util.find_spec("idlelib")
    if spec is None or not spec.origin:
        raise RuntimeError("idlelib is not installed with this Python: bench live takes its prompts from "
                           "idlelib/NEWS*.txt (Debian: apt-get install idle-python3.11)")
    texts = sorted(Path(spec.origin).parent.glob("NEWS*.txt"))
    if not texts:
        raise RuntimeError(f"no NEWS*.txt under {Path(spec.origin).parent}")
    entries = []
    for path in texts:
        for block in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            block = block.strip()
            if block and not block.startswith(("What's New", "=")) and len(block) > 40:
                entries.append(block)
    n = entries_per_prompt
    return ["\n\n".join(entries[i:i + n]) + "\n\n" for i in range(0, len(entries) - n, n)]


def stream_order(n: int, order: str = "shuffled", seed: int = 0) -> list[int]:
    """The indices of ``n`` prompts in the order the clients send them (cycled): ``file`` as they
    come, ``shuffled`` a permutation fixed by ``seed``, the same in every run."""
    if order == "file":
        return list(range(n))
    if order != "shuffled":
        raise ValueError(f"order is shuffled or file, got {order!r}")
    return random.Random(seed).sample(range(n), n)


def split_probe(order: list[int], probes: int) -> tuple[list[int], list[int]]:
    """``(stream, probe)``: the last ``probes`` prompts of the order held out of the stream (never
    sent while learning, nor learned from), and the rest, sent in turn."""
    if probes < 0 or probes >= len(order):
        raise ValueError(f"the probe holds 0 to {len(order) - 1} of the {len(order)} prompts, got {probes}")
    return (order[:-probes], order[-probes:]) if probes else (list(order), [])


def probe_gain(before: dict, after: dict) -> dict:
    """After over before, for the probe's figures that both have."""
    return {key: after[key] / before[key] if before.get(key) and after.get(key) else None
            for key in ("own_accepted_length", "own_position_acceptance", "own_draft_share", "tokens_per_s")}


def _part(t: float, t0: float, t1: float, parts: int) -> int | None:
    """Which of ``parts`` equal parts of [t0, t1] the moment ``t`` falls in (``t1`` in the last;
    None outside): requests and learning rounds are put in quarters alike."""
    if not t0 <= t <= t1 or t1 <= t0:
        return None
    return min(parts - 1, int((t - t0) / ((t1 - t0) / parts)))


def summarize(results: list[dict], t0: float, t1: float, parts: int = 4) -> list[dict]:
    """Per part of [t0, t1] (by completion time) the figures of the requests that finished in it."""
    width = (t1 - t0) / parts
    out = []
    for q in range(parts):
        rows = [r for r in results if _part(r["done"], t0, t1, parts) == q]
        tokens = sum(r["tokens"] for r in rows)
        own_acc = sum(r["spec"]["own"]["accepted_tokens"] for r in rows)
        own_steps = sum(r["spec"]["own"]["draft_steps"] for r in rows)
        own_drafted = sum(r["spec"]["own"]["drafted_tokens"] for r in rows)
        own_judged = sum(r["spec"]["own"].get("judged_tokens", 0) for r in rows)
        copied = sum(r["spec"]["copied"]["accepted_tokens"] for r in rows)
        versions: dict[str, list[int]] = {}
        for r in rows:
            d, v = r["spec"].get("drafter_id"), r["spec"].get("drafter_version")
            if d is not None:
                seen = versions.setdefault(d, [v, v])
                seen[0], seen[1] = min(seen[0], v), max(seen[1], v)
        out.append({"requests": len(rows), "tokens": tokens,
                    "own_accepted_length": 1 + own_acc / own_steps if own_steps else None,
                    "own_acceptance": own_acc / own_drafted if own_drafted else None,
                    # per own draft the target judged on its own text: the learners' figure, served
                    "own_position_acceptance": own_acc / own_judged if own_judged else None,
                    "own_draft_length": own_drafted / own_steps if own_steps else None,
                    "own_draft_share": own_acc / tokens if tokens else 0.0,
                    "copied_share": copied / tokens if tokens else 0.0,
                    "tokens_per_s": tokens / width if width > 0 else 0.0,
                    # the prompts' mix differs by quarter (their prefill is part of tokens/s)
                    "prompt_tokens": (sum(r.get("prompt_tokens", 0) for r in rows) / len(rows)) if rows else None,
                    "own_draft_steps": own_steps,
                    "versions": {d: (f"v{a}" if a == b else f"v{a}-v{b}") for d, (a, b) in sorted(versions.items())}})
    return out


def last_quarter_prompts(results: list[dict], t0: float, t1: float, parts: int = 4) -> list[int]:
    """The prompts of the requests that finished in the last part of [t0, t1], in the order
    they were sent: what the speculation-off server is given to serve, cycled, so that the two
    throughputs compare the same prompts (their lengths differ by a factor of 2 across the
    domain, and prefill is part of the time)."""
    rows = [r for r in results if _part(r["done"], t0, t1, parts) == parts - 1]
    return [r["prompt"] for r in sorted(rows, key=lambda r: r["i"])]


def turns(slices: int) -> list[str]:
    """The order of the paired comparison's slices: ``spec, off, off, spec, ...`` (ABBA), so
    that a machine drifting steadily through the comparison favours neither side."""
    if slices < 2 or slices % 2:
        raise ValueError("the paired comparison needs an even number of slices, at least 2")
    return [("spec", "off", "off", "spec")[i % 4] for i in range(slices)]


def paired_summary(slices: list[tuple[str, list[dict], float, float]]) -> dict:
    """The paired comparison from its slices, ``(side, results, t0, t1)`` each: per side the
    tokens/s over the slices' wall time together and the prompts' mean length, each slice's
    tokens/s, and ``spec_vs_off``, speculation on over off."""
    each = [(side, summarize(results, t0, t1, parts=1)[0], t1 - t0) for side, results, t0, t1 in slices]
    out: dict = {"slices": [{"side": side, "tokens_per_s": q["tokens_per_s"]} for side, q, _ in each]}
    for side in ("spec", "off"):
        mine = [(q, w) for s, q, w in each if s == side]
        seconds = sum(w for _, w in mine)
        done = [q for q, _ in mine if q["requests"]]
        out[f"{side}_tokens_per_s"] = sum(q["tokens"] for q, _ in mine) / seconds if seconds else 0.0
        out[f"{side}_prompt_tokens"] = (sum(q["prompt_tokens"] * q["requests"] for q in done)
                                        / sum(q["requests"] for q in done)) if done else None
    out["spec_vs_off"] = out["spec_tokens_per_s"] / out["off_tokens_per_s"] if out["off_tokens_per_s"] else None
    return out


def learned_acceptance(rounds: dict[str, list[dict]], t0: float, t1: float, parts: int = 4,
                       key: str = "mean_alpha") -> list[dict[str, float]]:
    """Per part of [t0, t1], per drafter: the acceptance its learners measured of the version
    serving, on the records of the rounds that ran in that part (each round's ``mean_alpha``,
    scored on every position before learning from it: :mod:`onlinespec.learn.estimate`),
    weighted by the rounds' positions. ``rounds``: each drafter's round metrics, as its learner
    stream holds them (``time``, ``mean_alpha``, ``positions``). A drafter without a round in a
    part is left out of it. ``key="mean_alpha_deeper"``: a feature drafter's acceptance at a
    block's second position (drafted on its own feature, the first accepted), as its rounds score it."""
    out: list[dict[str, float]] = [{} for _ in range(parts)]
    for drafter, metrics in rounds.items():
        sums = [[0.0, 0] for _ in range(parts)]
        for m in metrics:
            q = _part(m.get("time", t0 - 1.0), t0, t1, parts)
            if q is None or m.get(key) is None or not m.get("positions"):
                continue
            sums[q][0] += m[key] * m["positions"]
            sums[q][1] += m["positions"]
        for q, (total, n) in enumerate(sums):
            if n:
                out[q][drafter] = total / n
    return out


def learning_pace(rounds: dict[str, list[dict]], t0: float, t1: float, parts: int = 4) -> list[dict[str, dict]]:
    """Per part of [t0, t1], per drafter, how its learning kept up with the traffic: the rounds
    that ended in it, the share of the part they ran for (``busy``: a worker at 1.0 was never idle),
    the generated tokens of their records per second of the part (``tokens_per_s``, against the
    served tokens/s), and the mean and largest wait of a round's oldest record between its
    request's end and the version that learned it (``lag_s``, ``max_lag_s``)."""
    width = (t1 - t0) / parts
    out: list[dict[str, dict]] = [{} for _ in range(parts)]
    for drafter, metrics in rounds.items():
        for q in range(parts):
            mine = [m for m in metrics if _part(m.get("time", t0 - 1.0), t0, t1, parts) == q]
            if not mine or width <= 0:
                continue
            lags = [m["lag_seconds"] for m in mine if m.get("lag_seconds") is not None]
            out[q][drafter] = {"rounds": len(mine), "busy": sum(m.get("seconds", 0.0) for m in mine) / width,
                               "tokens_per_s": sum(m.get("generated_tokens", 0) for m in mine) / width,
                               "lag_s": sum(lags) / len(lags) if lags else None,
                               "max_lag_s": max(lags) if lags else None}
    return out


def _rounds(service) -> dict[str, list[dict]]:
    """Every drafter's learning rounds so far (the learner metrics stream, oldest first)."""
    out = {}
    for drafter in service.cfg.drafters:
        entries = service.redis.xrange(keys.learner_metrics_stream(drafter.id))
        out[drafter.id] = [json.loads(fields[b"m"]) for _, fields in entries]
    return out


class _Clients:
    """``concurrency`` threads sending the prompts in turn until stopped; each answer recorded."""

    def __init__(self, url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                 order: list[int] | None = None, users: str = "live", cache_salt: str | None = None):
        self.url, self.model, self.prompts, self.max_tokens = url, model, prompts, max_tokens
        self.order = order or list(range(len(prompts)))  # the prompts' indices, sent in turn, cycled
        self.users = users  # request i's user is "{users}-{i}": give every set of clients its own
        self.cache_salt = cache_salt  # reads only the prefix cache its own requests left
        self.limit: int | None = None  # run_once: requests beyond are not sent
        self.results: list[dict] = []
        self.errors = 0
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)]

    def _run(self) -> None:
        with httpx.Client(timeout=300, headers={"Authorization": "Bearer bench-live"}) as client:
            while not self._stop.is_set():
                with self._lock:
                    i, self._next = self._next, self._next + 1
                if self.limit is not None and i >= self.limit:
                    return
                prompt = self.order[i % len(self.order)]
                body = {"model": self.model, "prompt": self.prompts[prompt],
                        "max_tokens": self.max_tokens, "temperature": 0, "user": f"{self.users}-{i}",
                        "metadata": {"domain": DOMAIN}}
                if self.cache_salt:
                    body["cache_salt"] = self.cache_salt
                try:
                    r = client.post(self.url + "/v1/completions", json=body)
                    r.raise_for_status()
                    data = r.json()
                except (httpx.HTTPError, ValueError):
                    with self._lock:
                        self.errors += 1
                    continue
                with self._lock:
                    self.results.append({"i": i, "prompt": prompt, "done": time.time(),
                                         "tokens": data["usage"]["completion_tokens"],
                                         "prompt_tokens": data["usage"]["prompt_tokens"], "spec": data["speculative"]})

    def run(self, seconds: float) -> tuple[float, float]:
        t0 = time.time()
        for t in self._threads:
            t.start()
        time.sleep(seconds)
        t1 = time.time()
        self._stop.set()
        for t in self._threads:
            t.join(300)
        return t0, t1

    def run_once(self) -> tuple[float, float]:
        """Each prompt of the order sent once; returns (start, end) when all are answered."""
        self.limit = len(self.order)
        t0 = time.time()
        for t in self._threads:
            t.start()
        for t in self._threads:
            t.join()
        return t0, max([t0, *(r["done"] for r in self.results)])


def _forget_feedback(service, sent: int, timeout: float = 15.0) -> int:
    """Delete the feedback stream's records (before any learner read them: the consumer groups
    start from the first record), once the ``sent`` requests' records are in it (the server writes
    them behind its answers), or after ``timeout``. Returns how many were deleted."""
    stream = keys.feedback_stream(service.cfg.target_id)
    deadline = time.time() + timeout
    while service.redis.xlen(stream) < sent and time.time() < deadline:
        time.sleep(0.1)
    return service.redis.xtrim(stream, maxlen=0, approximate=False)


def engine_profile(url: str) -> dict:
    """Where the server's engine spent its time (from its ``/metrics``): seconds per phase, and
    decode milliseconds per settled token by the batch's draft length (``0``: plain steps)."""
    text = httpx.get(url + "/metrics", timeout=10).text

    def by(name: str, label: str) -> dict[str, float]:
        return {m[0]: float(m[1]) for m in re.findall(rf'^onlinespec_{name}{{{label}="([^"]*)"}} (\S+)$', text, re.M)}

    phases = by("engine_seconds_total", "phase")
    seconds, tokens = by("engine_step_seconds_total", "k"), by("engine_step_tokens_total", "k")
    steps = by("engine_step_draft_length_total", "k")
    spec = [k for k in seconds if k != "0"]
    spec_s, spec_t = sum(seconds[k] for k in spec), sum(tokens.get(k, 0) for k in spec)
    return {"seconds": {p: round(v, 2) for p, v in sorted(phases.items())},
            "plain_steps": int(steps.get("0", 0)), "spec_steps": int(sum(steps.get(k, 0) for k in spec)),
            "plain_ms_per_token": round(1000 * seconds["0"] / tokens["0"], 2) if tokens.get("0") else None,
            "spec_ms_per_token": round(1000 * spec_s / spec_t, 2) if spec_t else None}


def _variant(config: str, workdir: Path, plain: bool) -> str:
    """The config as the benchmark serves it: with ``plain``, speculation off (no drafters, no
    suffix speculation), the same target and serving settings."""
    cfg = load_config(config)
    raw = yaml.safe_load(Path(cfg.source).read_text())
    base = Path(cfg.source).parent
    for spec in [raw["target"], *raw.get("drafters", [])]:
        if not str(spec["model"]).startswith(("demo:", "pypi:")) and (base / str(spec["model"])).exists():
            spec["model"] = str((base / str(spec["model"])).resolve())
    if raw.get("learner"):
        raw["learner"] = cfg.learner
    if plain:
        raw["drafters"] = []
        raw.setdefault("serving", {})["suffix"] = {**(raw["serving"].get("suffix") or {}), "enabled": False}
    path = workdir / ("plain.yaml" if plain else "live.yaml")
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def plot(path: str, quarters: list[dict], nospec: float, learned: float | None = None, probe: dict | None = None) -> None:
    """Own accepted length and tokens/s per quarter; speculation off, and the versions learning
    left (``learned``: served in turns with it), as lines; the held-out probe's first and last
    versions (``probe``: its ``before`` and ``after``) as lines on the accepted length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(quarters) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(x, [q["own_accepted_length"] or float("nan") for q in quarters], "o-", label="drafters' own drafts")
    for side, style, label in (("before", ":", "held-out probe, first versions"), ("after", "-.", "held-out probe, last versions")):
        value = ((probe or {}).get(side) or {}).get("own_accepted_length")
        if value:
            left.axhline(value, color="tab:purple", linestyle=style, label=label)
    if probe:
        left.legend(fontsize=8, loc="lower right")
    left.set(xlabel="quarter of the run", ylabel="accepted length", title="drafters' own accepted length")
    left.set_xticks(x)
    right.plot(x, [q["tokens_per_s"] for q in quarters], "o-", label="speculation on (learning)")
    if learned:
        right.axhline(learned, color="tab:green", linestyle=":", label="learned versions, learning stopped")
    right.axhline(nospec, color="grey", linestyle="--", label="speculation off")
    right.set(xlabel="quarter of the run", ylabel="tokens/s", title="aggregate throughput")
    right.set_xticks(x)
    low = min([nospec, *(q["tokens_per_s"] for q in quarters)])
    high = max([nospec, learned or 0.0, *(q["tokens_per_s"] for q in quarters)])
    right.set_ylim(low - 0.6 * (high - low), high + 0.1 * (high - low))  # room below for the legend
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    from onlinespec.ops.bench.faults import Service

    config = args.config or DEFAULT_CONFIG
    try:  # a bad --slices fails now, not after the run
        order_of_turns = turns(args.slices)
    except ValueError as exc:
        print(f"bench live: --slices {args.slices}: {exc}", file=sys.stderr)
        return 2
    prompts = changelog_prompts()
    seconds = args.minutes * 60
    try:
        stream, probe = split_probe(stream_order(len(prompts), args.order), getattr(args, "probe_prompts", PROBE_PROMPTS))
    except ValueError as exc:
        print(f"bench live: --probe-prompts: {exc}", file=sys.stderr)
        return 2
    probed: dict[str, tuple[list[dict], float, float]] = {}
    errors_before = 0
    with tempfile.TemporaryDirectory(prefix="onlinespec-live-") as tmp:
        workdir = Path(tmp)
        live_dir, plain_dir = workdir / "live", workdir / "plain"
        live_dir.mkdir()
        plain_dir.mkdir()
        service = Service(_variant(config, workdir, plain=False), live_dir, round_records=args.round_records,
                          period=args.period)
        plain = Service(_variant(config, workdir, plain=True), plain_dir)
        try:
            service.start(workers=0)
            model = httpx.get(service.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            if probe:  # the first versions on the held-out prompts, warmed up first, nothing learning
                warm = _Clients(service.url, model, prompts, args.concurrency, args.max_tokens, order=stream,
                                users="warmup-first")
                warm.run(WARMUP_SECONDS)
                first = _Clients(service.url, model, prompts, args.concurrency, args.max_tokens, order=probe,
                                 users="probe-first", cache_salt="probe-first")
                probed["before"] = (first.results, *first.run_once())
                errors_before = warm.errors + first.errors
                # their records teach nothing: the probe stays unseen by the learners
                _forget_feedback(service, len(warm.results) + len(first.results))
            if not args.no_learning:
                service.add_worker({})
            clients = _Clients(service.url, model, prompts, args.concurrency, args.max_tokens, order=stream)
            t0, t1 = clients.run(seconds)
            results, errors = clients.results, clients.errors + errors_before
            profile = {"spec": {**engine_profile(service.url), "wall": round(t1 - t0, 2)}}
            rounds = _rounds(service)
            # then learning stops, and the versions it left serve the last quarter's prompts (in
            # their order, cycled) in turns with a server of their own that does not speculate,
            # a quarter's length in all: the same prompts, the same stretch of the machine's time
            service.sup.stop(only="worker")
            plain.start()
            order = last_quarter_prompts(results, t0, t1)
            # first a warm-up on each server, not measured: in three runs of stop 49 the first turn
            # (speculating) was the slowest of the four, 0.67-0.89 of the last spec turn (a
            # transient after the learning phase ends and the off server starts; its cause not found)
            warm_walls = {}
            for side, url in (("spec", service.url), ("off", plain.url)):
                warm = _Clients(url, model, prompts, args.concurrency, args.max_tokens, order=order,
                                users=f"warmup-{side}")
                w0, w1 = warm.run(min(WARMUP_SECONDS, seconds / 4 / len(order_of_turns)))
                warm_walls[side] = w1 - w0
            if probe:  # the versions learning left, on the same held-out prompts
                last = _Clients(service.url, model, prompts, args.concurrency, args.max_tokens, order=probe,
                                users="probe-last", cache_salt="probe-last")
                probed["after"] = (last.results, *last.run_once())
                errors += last.errors
            slices = []
            for n, side in enumerate(order_of_turns):
                url = service.url if side == "spec" else plain.url
                # users of their own: a turn repeats the prompts, and copies of a user's earlier
                # outputs (suffix speculation) would carry over from one spec turn to the next
                turn = _Clients(url, model, prompts, args.concurrency, args.max_tokens, order=order,
                                users=f"turn{n}")
                p0, p1 = turn.run(seconds / 4 / len(order_of_turns))
                slices.append((side, turn.results, p0, p1))
                errors += turn.errors
            profile["off"] = {**engine_profile(plain.url), "wall": round(warm_walls["off"] + sum(p1 - p0 for s, _, p0, p1 in slices
                                                                                        if s == "off"), 2)}
        finally:
            plain.sup.stop()
            service.sup.stop()
        quarters = summarize(results, t0, t1)
        for quarter, learned, deeper in zip(quarters, learned_acceptance(rounds, t0, t1),
                                            learned_acceptance(rounds, t0, t1, key="mean_alpha_deeper")):
            quarter["learned_acceptance"] = learned
            quarter["learned_acceptance_deeper"] = deeper
        for quarter, pace in zip(quarters, learning_pace(rounds, t0, t1)):
            quarter["learning"] = pace
        paired = paired_summary(slices)
        nospec = paired["off_tokens_per_s"]
        probe_figures = None
        if probe:
            probe_figures = {side: summarize(rows, p0, p1, parts=1)[0] for side, (rows, p0, p1) in probed.items()}
            probe_figures.update(prompts=len(probe), gain=probe_gain(probe_figures["before"], probe_figures["after"]))

    first, last = quarters[0], quarters[-1]
    gain = {key: last[key] / first[key] if first[key] and last[key] else None
            for key in ("own_accepted_length", "own_acceptance", "own_position_acceptance")}
    gain.update(tokens_per_s=last["tokens_per_s"] / first["tokens_per_s"] if first["tokens_per_s"] else None,
                learned_acceptance={d: a / first["learned_acceptance"][d] for d, a in last["learned_acceptance"].items()
                                    if first["learned_acceptance"].get(d)})
    print(f"bench live: {config}, {args.minutes:g} min, {len(results)} requests ({errors} errors), "
          f"concurrency {args.concurrency}, {args.max_tokens} tokens each, domain {DOMAIN!r}, {args.order} order")
    print(f"{'quarter':>8}{'requests':>10}{'prompt':>8}{'own acc. len':>14}{'own accept.':>13}{'per pos.':>10}{'own k':>7}{'own share':>11}"
          f"{'copied share':>14}{'tokens/s':>10}{'learned a':>11}{'2nd pos.':>10}  versions")
    for i, q in enumerate(quarters):
        mal, acc, pos, k = (f"{q[key]:.3f}" if q[key] else "-" for key in
                            ("own_accepted_length", "own_acceptance", "own_position_acceptance", "own_draft_length"))
        print(f"{i + 1:>8}{q['requests']:>10}{q['prompt_tokens'] or 0:>8.0f}{mal:>14}{acc:>13}{pos:>10}{k:>7}{q['own_draft_share']:>11.3f}{q['copied_share']:>14.3f}"
              f"{q['tokens_per_s']:>10.1f}{'/'.join(f'{a:.3f}' for a in q['learned_acceptance'].values()) or '-':>11}"
              f"{'/'.join(f'{a:.3f}' for a in q['learned_acceptance_deeper'].values()) or '-':>10}  "
              f"{' '.join(f'{d} {v}' for d, v in q['versions'].items())}")
    for i, q in enumerate(quarters):
        for d, p in q["learning"].items():
            lag = f"{p['lag_s']:.0f} s (largest {p['max_lag_s']:.0f} s)" if p["lag_s"] is not None else "-"
            print(f"quarter {i + 1}, learning {d}: {p['rounds']} rounds, busy {p['busy']:.2f}, "
                  f"{p['tokens_per_s']:.1f} tokens/s learned against {q['tokens_per_s']:.1f} served, lag {lag}")
    turns_text = ", ".join(f"{t['side']} {t['tokens_per_s']:.1f}" for t in paired["slices"])
    print(f"learning stopped; the last quarter's prompts ({paired['off_prompt_tokens'] or 0:.0f} tokens each) in "
          f"{len(paired['slices'])} turns: speculating (the last versions) {paired['spec_tokens_per_s']:.1f} tokens/s, "
          f"speculation off {nospec:.1f} tokens/s: on / off = "
          f"{paired['spec_vs_off'] if paired['spec_vs_off'] else float('nan'):.2f} (turns: "
          f"{turns_text}); "
          f"last quarter (learning beside it) / off = {last['tokens_per_s'] / nospec if nospec else float('nan'):.2f}")
    if probe_figures:
        b, a = probe_figures["before"], probe_figures["after"]

        def fmt(x):
            return f"{x:.3f}" if x else "-"
        print(f"held-out probe ({len(probe)} prompts, each once, nothing learning): first versions -> last: own accepted "
              f"length {fmt(b['own_accepted_length'])} -> {fmt(a['own_accepted_length'])}, acceptance per position "
              f"{fmt(b['own_position_acceptance'])} -> {fmt(a['own_position_acceptance'])}, own share "
              f"{b['own_draft_share']:.3f} -> {a['own_draft_share']:.3f}, tokens/s {b['tokens_per_s']:.1f} -> "
              f"{a['tokens_per_s']:.1f} ({' '.join(f'{d} {v}' for d, v in b['versions'].items())} -> "
              f"{' '.join(f'{d} {v}' for d, v in a['versions'].items())})")
    for phase, prof in profile.items():
        print(f"engine, {phase}: seconds {prof['seconds']} of {prof['wall']:.0f} s; ms per token: plain steps {prof['plain_ms_per_token']} "
              f"({prof['plain_steps']} steps), speculative steps {prof['spec_ms_per_token']} ({prof['spec_steps']} steps)")
    if gain["own_accepted_length"]:
        print(f"last / first quarter: own accepted length {gain['own_accepted_length']:.2f}x, "
              f"own acceptance {gain['own_acceptance'] or float('nan'):.2f}x, tokens/s {gain['tokens_per_s']:.2f}x, "
              f"learned acceptance {' '.join(f'{d} {g:.2f}x' for d, g in gain['learned_acceptance'].items()) or '-'}")
    summary = {"quarters": quarters, "nospec_tokens_per_s": nospec, "nospec_prompt_tokens": paired["off_prompt_tokens"],
               "paired": paired, "gain": gain, "probe": probe_figures, "errors": errors,
               "requests": len(results), "engine": profile, "config": str(config), "minutes": args.minutes, "domain": DOMAIN,
               "order": args.order,
               "concurrency": args.concurrency, "max_tokens": args.max_tokens, "machine": machine()}
    if getattr(args, "plot", None):
        plot(args.plot, quarters, nospec, paired["spec_tokens_per_s"], probe_figures)
    emit([], summary, args.json)
    return 0 if results else 1
