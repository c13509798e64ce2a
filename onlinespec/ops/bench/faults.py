"""``onlinespec bench faults``: the service under the faults an operator meets, measured.

Each scenario starts the real service on loopback (a private Redis with an append-only file,
the HTTP server and one worker as child processes, supervised and restarted exactly as
``onlinespec up`` does), sends traffic from client threads, injects one fault, and reports:

- requests ``sent`` / ``completed`` (200) / ``refused`` (a 4xx/5xx with an OpenAI-style JSON
  error) / ``broken`` (anything else: a hang, a dropped connection, a body that is not JSON);
- ``feedback_lost``: records the server counted as lost (``feedback_dropped_total``);
- ``relearned``: entries a second version learned (``learner_relearned_entries_total``);
- ``resumed_s``: seconds from the fault until a version learned after it is published;
- per scenario a check of what must hold (dead letters, refusals, restarts).

Scenarios: ``redis_kill`` (SIGKILL under traffic, restarted by the supervisor), ``worker_kill``
(SIGKILL mid-round), ``worker_kill_after_publish`` (SIGKILL between publish and acknowledge),
``poison`` (invalid records and a wrong-shape version injected), ``hostile_seed`` (a request
with ``seed=2**64``, then normal traffic). The slow tests run the same scenarios on tiny
models and assert on these figures.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

from onlinespec.feedback import keys
from onlinespec.learn.control import Control
from onlinespec.config import DEFAULT_CONFIG, load_config
from onlinespec.redis_server import EmbeddedRedis, _free_port, connect
from onlinespec.ops.up import Supervisor, _RedisProc, server_command, spawn, wait_ready, worker_command

__all__ = ["SCENARIOS", "ScenarioResult", "Service", "run_scenario", "run"]

SCENARIOS = ("redis_kill", "worker_kill", "worker_kill_after_publish", "poison", "hostile_seed")
PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n", "class Stack:\n    def push(self, x):",
           "To be, or not to be,", "for i in range(10):\n    print(", "The module provides")


@dataclass
class ScenarioResult:
    scenario: str
    sent: int = 0
    completed: int = 0
    refused: int = 0
    broken: int = 0
    feedback_lost: int = 0
    relearned: int = 0
    resumed_s: float | None = None
    checks: dict = field(default_factory=dict)  # what must hold, by name -> bool
    notes: str = ""

    @property
    def ok(self) -> bool:
        return (self.broken == 0 and self.relearned == 0 and self.resumed_s is not None
                and all(self.checks.values()))


class Traffic:
    """Client threads sending completions until stopped; every outcome classified."""

    def __init__(self, url: str, model: str, concurrency: int = 2, max_tokens: int = 16, timeout: float = 120):
        self.url, self.model, self.max_tokens, self.timeout = url, model, max_tokens, timeout
        self.counts = {"sent": 0, "completed": 0, "refused": 0, "broken": 0}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def send(self, body: dict, client: httpx.Client | None = None) -> int:
        own = client is None
        client = client or httpx.Client(timeout=self.timeout)
        outcome, status = "broken", 0
        try:
            r = client.post(self.url + "/v1/completions", json={"model": self.model, "max_tokens": self.max_tokens,
                                                                 "temperature": 0, **body},
                            headers={"Authorization": "Bearer bench-faults"})
            status = r.status_code
            if status == 200:
                outcome = "completed" if r.json()["choices"][0]["text"] is not None else "broken"
            elif r.json().get("error", {}).get("message"):
                outcome = "refused"
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a clear answer
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
        finally:
            if own:
                client.close()
        with self._lock:
            self.counts["sent"] += 1
            self.counts[outcome] += 1
        return status

    def _run(self, worker: int) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            i = worker
            while not self._stop.is_set():
                self.send({"prompt": PROMPTS[i % len(PROMPTS)] + " " * (i % 3)}, client)
                i += len(self._threads)

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return dict(self.counts)


class Service:
    """Redis + server + worker(s) as supervised child processes, on loopback, in ``workdir``."""

    def __init__(self, config: str, workdir: Path, round_records: int = 8, period: float = 2.0,
                 min_idle_ms: int = 60_000):
        self.workdir = Path(workdir)
        cfg = load_config(config)
        raw = yaml.safe_load(Path(cfg.source).read_text())
        raw["registry"] = str(self.workdir / "registry")
        if raw.get("learner"):
            raw["learner"] = cfg.learner  # resolved against the original file, not the copy
        raw.setdefault("serving", {})["port"] = _free_port()
        raw["serving"]["host"] = "127.0.0.1"
        for spec in [raw["target"], *raw.get("drafters", [])]:  # model paths as the original file meant them
            model = str(spec["model"])
            if not model.startswith("demo:") and (Path(cfg.source).parent / model).exists():
                spec["model"] = str((Path(cfg.source).parent / model).resolve())
        self.config = self.workdir / "service.yaml"
        self.config.write_text(yaml.safe_dump(raw))
        self.cfg = load_config(self.config)
        self.url = f"http://127.0.0.1:{raw['serving']['port']}"
        self.round_records, self.period, self.min_idle_ms = round_records, period, min_idle_ms
        self.sup = Supervisor(log=open(self.workdir / "supervisor.log", "a"))
        self.redis_server = EmbeddedRedis(appendonly=True, data_dir=str(self.workdir / "redis"))
        self.redis = None

    def env(self, **extra) -> dict:
        root = str(Path(__file__).resolve().parents[3])
        return {**os.environ, "REDIS_URL": self.redis_server.url, "ONLINESPEC_REGISTRY": self.cfg.registry,
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "ONLINESPEC_MIN_IDLE_MS": str(self.min_idle_ms), **extra}

    def start(self, worker_env: dict | None = None, timeout: float = 180, workers: int = 1) -> Service:
        self.sup.add("redis", lambda: _RedisProc(self.redis_server))
        self.redis = connect(self.redis_server.url, socket_timeout=5, socket_connect_timeout=2)
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.sup.add("server", lambda: spawn(server_command(self.config, host, int(port)), self.env(),
                                             self.workdir / "server.log"))
        wait_ready(self.url, self.sup, timeout)
        for _ in range(workers):
            self.add_worker(worker_env or {})
        return self

    def add_worker(self, extra_env: dict) -> None:
        cmd = worker_command(self.cfg, self.round_records, self.period, log_level="WARNING")
        n = sum(c.name.startswith("worker") for c in self.sup.children) + 1
        self.sup.add(f"worker-{n}", lambda: spawn(cmd, self.env(**extra_env), self.workdir / f"worker-{n}.log"))

    def child(self, name: str):
        return next(c for c in self.sup.children if c.name == name)

    def supervise(self, seconds: float, until=None) -> bool:
        """Keep restarting what exits for ``seconds`` (or until ``until()`` is true)."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            self.sup.poll()
            if until is not None and until():
                return True
            time.sleep(0.2)
        return bool(until and until())

    def drafters(self) -> list[str]:
        return [d.id for d in self.cfg.drafters]

    def latest(self) -> dict[str, int | None]:
        out = {}
        for d in self.drafters():
            try:
                value = self.redis.get(keys.latest_key(d))
            except Exception:  # noqa: BLE001 - Redis restarting
                value = None
            out[d] = int(value) if value is not None else None
        return out

    def published_since(self, t0: float, drafter: str | None = None) -> float | None:
        """Seconds from ``t0`` to the first version (of ``drafter``, or any) published after it."""
        try:
            entries = self.redis.xrange(keys.events_stream, min=f"{int(t0 * 1000)}-0")
        except Exception:  # noqa: BLE001
            return None
        for entry_id, fields in entries:
            if fields.get(b"type") == b"published" and drafter in (None, fields.get(b"drafter", b"").decode()):
                return int(entry_id.decode().split("-")[0]) / 1000 - t0
        return None

    def dead_letters(self) -> list:
        try:
            return self.redis.xrange(keys.dead_letter_stream(self.cfg.target_id))
        except Exception:  # noqa: BLE001
            return []

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(rf"^onlinespec_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> None:
        self.sup.stop()
        try:
            self.redis.close()
        except Exception:  # noqa: BLE001
            pass


def _wrong_shape_version(svc: Service, drafter: str) -> int:
    """Write a version whose weights fit another architecture straight to disk and point the
    drafter at it, as a broken tool or an old deployment would (the registry's API refuses it)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from onlinespec.learn.registry import Manifest, _sha256

    vocab = json.loads(svc.redis.get(keys.spec_key(drafter)))["arch"]["vocab_size"]
    other = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))
    latest = int(svc.redis.get(keys.latest_key(drafter)))
    version = int(svc.redis.incr(keys.version_counter(drafter)))
    tmp = svc.workdir / "injected-version"
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp / "model.safetensors"))
    other.config.to_json_file(str(tmp / "config.json"))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    manifest = Manifest(drafter, version, latest, time.time(), files, None, {}, "injected: wrong shape")
    (tmp / "manifest.json").write_text(manifest.to_json())
    os.rename(tmp, Path(svc.cfg.registry) / drafter / f"v{version}")
    svc.redis.set(keys.latest_key(drafter), version)
    svc.redis.xadd(keys.events_stream, {"type": "injected", "drafter": drafter, "version": version})
    return version


def _poison_payloads(svc: Service) -> list[bytes]:
    """Two entries that decode but must never be learned: no generated positions, and token ids
    outside the vocabulary (built from a real record of the stream)."""
    import msgpack
    import numpy as np

    from onlinespec.feedback.codec import encode
    from onlinespec.feedback.stream import _decode_entry

    entries = svc.redis.xrevrange(keys.feedback_stream(svc.cfg.target_id), count=1)
    record = _decode_entry(entries[0][1])
    body = msgpack.unpackb(encode(record), raw=False)

    def arr(a, dtype):
        a = np.asarray(a, dtype=dtype)
        return {"shape": list(a.shape), "data": a.tobytes()}

    empty = {**body, "request_id": "poison-empty", "tokens": arr(record.tokens[: record.prompt_len], "<i4"),
             "topk_ids": arr(record.topk_ids[:0], "<i4"), "topk_logprobs": arr(record.topk_logprobs[:0], "<f2"),
             **{k: arr([], dt) for k, dt in (("drafted", "|b1"), ("accepted", "|b1"), ("block_index", "<i2"),
                                               ("draft_tokens", "<i4"))}}
    spec = json.loads(svc.redis.get(keys.spec_key(svc.drafters()[0])))
    wide = record.tokens.copy()
    wide[-1] = spec["arch"]["vocab_size"] + 7
    huge = {**body, "request_id": "poison-vocab", "tokens": arr(wide, "<i4")}
    return [msgpack.packb(empty, use_bin_type=True), msgpack.packb(huge, use_bin_type=True)]


def run_scenario(name: str, config: str, workdir: Path, warmup: float = 20.0, after: float = 90.0,
                 concurrency: int = 2, min_idle_ms: int = 60_000) -> ScenarioResult:
    """One scenario on a fresh service in ``workdir``; ``warmup`` seconds of traffic before the
    fault, at most ``after`` seconds after it for learning to resume (and, after a worker was
    killed between publish and acknowledge, for its entries to be redelivered: ``min_idle_ms``,
    the workers' reclaim delay, 60 s by default)."""
    assert name in SCENARIOS, f"unknown scenario {name!r}; known: {SCENARIOS}"
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    worker_env = {}
    if name.startswith("worker_kill"):
        worker_env = {"ONLINESPEC_FAILPOINTS": "before_ack" if name.endswith("after_publish") else "before_publish",
                      "ONLINESPEC_FAILPOINT_ONCE": str(workdir / "failpoint-fired")}
    svc = Service(config, workdir, min_idle_ms=min_idle_ms)
    result = ScenarioResult(name)
    traffic = None
    try:
        svc.start(worker_env=worker_env)
        traffic = Traffic(svc.url, svc.cfg.target_id, concurrency=concurrency).start()
        if name.startswith("worker_kill"):
            # the armed worker dies at its first round; the supervisor restarts it (unarmed now)
            fired = svc.supervise(warmup + after, until=lambda: (workdir / "failpoint-fired").exists())
            result.checks["worker killed"] = fired
            t_fault = time.time()
            killed = (workdir / "failpoint-fired").read_text() if fired else ""
        else:
            svc.supervise(warmup, until=lambda: all(v and v >= 2 for v in svc.latest().values()))
            t_fault = time.time()
        if name == "redis_kill":
            redis = svc.child("redis")
            redis.proc.send_signal(signal.SIGKILL)
            svc.supervise(after, until=lambda: redis.restarts >= 1)
            result.checks["redis restarted"] = redis.restarts >= 1
        settled = None  # what else must have happened before the figures are read
        resumed_by = None  # the drafter whose learning must resume (None: any)
        if name == "poison":
            for payload in _poison_payloads(svc):
                svc.redis.xadd(keys.feedback_stream(svc.cfg.target_id), {"r": payload})
            resumed_by = svc.drafters()[0]
            # learning paused while the server meets the broken version: a round publishing from
            # the last good one right after the injection would supersede it before the server's
            # watcher looked (seen once under a loaded CI machine); a round in flight cannot (its
            # publish expects its parent as the latest)
            control = Control(svc.redis)
            control.pause(resumed_by)
            bad = _wrong_shape_version(svc, resumed_by)
            result.notes = f"wrong-shape {resumed_by} v{bad} injected"
            svc.supervise(after, until=lambda: svc.metric("drafter_refusals_total") >= 1)
            control.resume(resumed_by)
            t_fault = time.time()  # a round that finished before the injection does not count
            settled = lambda: len(svc.dead_letters()) >= 2  # noqa: E731
        elif name == "hostile_seed":
            status = traffic.send({"prompt": "hello", "seed": 2**64, "temperature": 1.0})
            result.checks["seed 2**64 refused with 400"] = status == 400
        elif name.startswith("worker_kill"):
            resumed_by = killed or None  # the drafter whose round was killed must learn again
            if name.endswith("after_publish"):
                settled = lambda: svc.metric("learner_redelivered_skipped_total") > 0  # noqa: E731
        svc.supervise(after, until=lambda: svc.published_since(t_fault, resumed_by) is not None
                      and (settled is None or settled()))
        result.resumed_s = svc.published_since(t_fault, resumed_by)
        svc.supervise(3.0)  # a few more requests after the fault has settled
        counts = traffic.stop()
        if traffic.errors:
            result.notes += f"; client errors: {traffic.errors[:3]}"
        traffic = None
        for k, v in counts.items():
            setattr(result, k, v)
        result.feedback_lost = int(svc.metric("feedback_dropped_total"))
        result.relearned = int(svc.metric("learner_relearned_entries_total"))
        if name == "poison":
            dead = svc.redis.xrange(keys.dead_letter_stream(svc.cfg.target_id))
            result.checks["poison put aside once each"] = len(dead) == 2
            result.checks["wrong shape refused by the server"] = svc.metric("drafter_refusals_total") >= 1
            ready = httpx.get(svc.url + "/ready", timeout=5).json()
            result.checks["server ready"] = bool(ready["ready"])
            latest = svc.latest()[svc.drafters()[0]]
            from onlinespec.learn.registry import CheckpointError, Registry

            try:
                Registry(svc.cfg.registry, svc.redis).load_model(svc.drafters()[0], latest)
                result.checks["latest loads"] = True
            except CheckpointError:
                result.checks["latest loads"] = False
        if name.startswith("worker_kill"):
            skipped = int(svc.metric("learner_redelivered_skipped_total"))
            result.notes = f"{killed} killed; {skipped} redelivered entries acknowledged as already learned"
            if name.endswith("after_publish"):  # relearned == 0 is part of ok
                result.checks["redelivered entries acknowledged, not relearned"] = skipped > 0
    finally:
        if traffic is not None:
            traffic.stop()
        svc.stop()
    return result


def run(args) -> int:
    config = args.config or str(DEFAULT_CONFIG)
    names = args.scenarios or list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="onlinespec-faults-"))
    results = []
    for name in names:
        print(f"scenario {name} ...", flush=True)
        r = run_scenario(name, config, root / name, warmup=10 if args.quick else 20, after=120)
        results.append(r)
        print(f"  sent {r.sent}  completed {r.completed}  refused {r.refused}  broken {r.broken}  "
              f"feedback_lost {r.feedback_lost}  relearned {r.relearned}  resumed_s "
              f"{'never' if r.resumed_s is None else f'{r.resumed_s:.1f}'}  "
              f"checks {'ok' if all(r.checks.values()) else r.checks}  {r.notes}", flush=True)
    header = f"{'scenario':<27}{'sent':>6}{'done':>6}{'400s':>6}{'broken':>8}{'fb lost':>9}{'relearned':>11}{'resumed s':>11}  ok"
    print("\n" + header)
    for r in results:
        resumed = "never" if r.resumed_s is None else f"{r.resumed_s:.1f}"
        print(f"{r.scenario:<27}{r.sent:>6}{r.completed:>6}{r.refused:>6}{r.broken:>8}{r.feedback_lost:>9}"
              f"{r.relearned:>11}{resumed:>11}  {'yes' if r.ok else 'NO'}")
    print(f"logs: {root}")
    if args.json:
        print(json.dumps({"config": config, "scenarios": [{**asdict(r), "ok": r.ok} for r in results]}, sort_keys=True))
    return 0 if all(r.ok for r in results) else 1
