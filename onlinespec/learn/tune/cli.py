"""The ``onlinespec tune`` verbs: export, import, run, show, apply."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml

from onlinespec.feedback import keys
from onlinespec.learn.learner import LearnerConfig

__all__ = ["run", "study_dir", "STUDIES"]

STUDIES = ".onlinespec/studies"  # where named studies live (ONLINESPEC_STUDIES overrides)
TUNE_JOB_TIMEOUT = 24 * 3600


def study_dir(name: str) -> Path:
    """A study by name (under ``ONLINESPEC_STUDIES``, default ``.onlinespec/studies``) or by path."""
    p = Path(name)
    if len(p.parts) > 1 or p.is_dir():
        return p
    return Path(os.environ.get("ONLINESPEC_STUDIES") or STUDIES) / name


def _fail(message: str, code: int = 2) -> int:
    print(f"onlinespec tune: {message}", file=sys.stderr)
    return code


def _redis(args, cfg):
    from onlinespec.redis_server import connect

    return connect(args.redis_url or cfg.redis_url)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v).lower() if isinstance(v, bool) else str(v)


def settings_text(settings: dict) -> str:
    """``lr=0.001 hint=ema`` (the last part of each dotted name), not a JSON dict."""
    return " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in sorted(settings.items())) or "(baseline)"


class Progress:
    """Per trial and per round, with elapsed time and ETA: a redrawn line on a terminal, plain
    lines (one per trial, and every quarter of a trial) in a log."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.time()
        self.finished: list[float] = []
        self.last_quarter = (-1, -1)

    def round(self, number: int, done: int, rounds: int, seconds: float) -> None:
        eta_trial = seconds / done * (rounds - done) if done else 0.0
        per_trial = (sum(self.finished) / len(self.finished)) if self.finished else (seconds / max(done, 1) * rounds)
        left = max(0, self.total - len(self.finished) - 1)
        eta = eta_trial + left * per_trial
        line = (f"trial {number} ({len(self.finished) + 1}/{self.total}) round {done}/{rounds}  "
                f"elapsed {self._t(time.time() - self.start)}  ETA {self._t(eta)}")
        if self.tty:
            print(f"\r{line:<90}", end="", file=self.stream, flush=True)
        elif (number, 4 * done // rounds) != self.last_quarter:
            self.last_quarter = (number, 4 * done // rounds)
            print(line, file=self.stream, flush=True)
        if done == rounds:
            self.finished.append(seconds)
            if self.tty:
                print(file=self.stream)

    @staticmethod
    def _t(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------- export / import


def _export(args, cfg) -> int:
    from onlinespec.learn.tune.exports import export_stream

    target = args.target or cfg.target_id
    out = Path(args.out or f"feedback-{target}-{time.strftime('%Y%m%d-%H%M%S')}.msgpack")
    if out.exists():
        return _fail(f"{out} exists; exports never overwrite a file: pass another --out")
    n = export_stream(_redis(args, cfg), target, out, args.count)
    print(f"exported {n} records of {target} to {out}")
    return 0


def _import(args, cfg) -> int:
    from onlinespec.learn.tune.exports import import_stream

    if not args.file:
        return _fail("import needs --file (an exported feedback file)")
    try:
        n = import_stream(_redis(args, cfg), args.target or cfg.target_id, args.file)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"imported {n} records into {keys.feedback_stream(args.target or cfg.target_id)}")
    return 0


# ---------------------------------------------------------------------- run


def _live(args, cfg, space):
    """(drafter model, where from, baseline config, where from, round_records): the live drafter's
    current version and learner settings when Redis answers, else the configured ones."""
    from onlinespec.models import load_model
    from onlinespec.learn.registry import Registry
    from onlinespec.learn.round import learner_config

    drafter_id = args.drafter_id or (cfg.drafters[0].id if cfg.drafters else None)
    spec = next((d for d in cfg.drafters if d.id == drafter_id), None)
    redis = None
    if not args.offline:
        try:
            redis = _redis(args, cfg)
            redis.ping()
        except Exception as exc:  # noqa: BLE001 - no live service: start from the configured models
            print(f"no live service ({type(exc).__name__}: {exc}); starting from the configured drafter and learner",
                  file=sys.stderr)
            redis = None
    model = version = None
    if args.drafter:
        model, drafter_from = load_model(args.drafter), f"model {args.drafter}"
    elif redis is not None and drafter_id:
        registry = Registry(cfg.registry, redis)
        version = registry.latest(drafter_id)
        if version is not None:
            model, _ = registry.load_model(drafter_id, version)
            drafter_from = f"live {drafter_id} v{version} (registry {cfg.registry})"
    if model is None:
        if spec is None:
            raise ValueError(f"no drafter {drafter_id!r} in {cfg.source}: pass --drafter-id or --drafter")
        model, drafter_from = load_model(spec.model), f"configured {drafter_id} ({spec.model})"
    from onlinespec.drafters.feature import is_feature

    if is_feature(model):  # exports carry records; the target features beside them expire in Redis
        raise ValueError(f"{drafter_from} is a feature drafter: it learns from the target's features captured "
                         "beside each record, which exported feedback does not carry; compare learner settings "
                         "on it with `onlinespec bench adapt --config CONFIG --lr ...` (it replays the target "
                         "with its features) or pass --drafter-id of another drafter")
    if args.base:
        base, base_from = LearnerConfig.from_yaml(args.base), f"file {args.base}"
    elif redis is not None and drafter_id and redis.exists(keys.learner_config(drafter_id)):
        base, base_from = learner_config(redis, drafter_id), f"live learner settings of {drafter_id}"
    elif cfg.learner:
        base, base_from = LearnerConfig.from_yaml(cfg.learner), f"the workers' {cfg.learner}"
    elif space.base:
        base, base_from = space.base_config(), f"the space's base {space.base}"
    else:
        base, base_from = LearnerConfig(), "defaults"
    round_records = cfg.workers.round_records
    return model, drafter_from, base, base_from, round_records


def _run(args, cfg) -> int:
    from onlinespec.config import CONFIGS
    from onlinespec.learn.tune.space import SearchSpace
    from onlinespec.learn.tune.study import TuningStudy

    name = args.study or f"{args.drafter_id or (cfg.drafters[0].id if cfg.drafters else 'drafter')}-" \
                         f"{time.strftime('%Y%m%d-%H%M%S')}"
    directory = study_dir(name)
    if TuningStudy.exists(directory):
        if args.file:
            print(f"resuming {directory}: it keeps its own copy of the feedback (--file ignored)", file=sys.stderr)
        study = TuningStudy(directory)
        if args.trials is not None:
            study.set_trials(args.trials)
    else:
        if not args.file:
            return _fail("run needs --file (an exported feedback file) to start a new study, or --study NAME to resume")
        if not Path(args.file).is_file():
            return _fail(f"{args.file}: no such file")
        space = SearchSpace.from_yaml(args.space or CONFIGS / "tune.yaml")
        overrides = {k: v for k, v in (("trials", args.trials), ("seed", args.seed), ("sampler", args.sampler),
                                       ("holdout", args.holdout)) if v is not None}
        if overrides:
            space = SearchSpace.from_dict({**space.raw, **overrides, "base": space.base} if space.base
                                          else {**space.raw, **overrides}, space.source)
        model, drafter_from, base, base_from, round_records = _live(args, cfg, space)
        study = TuningStudy.create(directory, args.file, space, model, drafter_from, base, round_records, base_from, args.k)
    m = study.meta
    print(f"study {study.name} at {study.dir}\n  {m['feedback']['records']} records from {m['feedback']['from']} "
          f"({len(study.records()[0])} to tune on, {len(study.records()[1])} held out)\n"
          f"  drafter: {m['drafter']['from']}\n  baseline: {m['baseline']['from']}, rounds of "
          f"{m['baseline']['round_records']}\n  {study.space.sampler}, {study.total - 1} trials + the baseline",
          file=sys.stderr)
    if args.workers:
        code = _run_on_workers(args, cfg, study)
        if code or args.no_wait:
            return code
    else:
        progress = Progress(study.total - study.counts()["complete"])
        try:
            study.optimize(progress.round)
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished trials are kept; resume with: onlinespec tune run --study {study.dir}",
                  file=sys.stderr)
            return 130
    return _report(args, study, heldout=True)


def _run_on_workers(args, cfg, study) -> int:
    """Enqueue one trial-running job per worker and follow the study until it is done."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    redis = _redis(args, cfg)
    queue = Queue(keys.TUNE_QUEUE, connection=redis, serializer=JSONSerializer)
    jobs = [queue.enqueue("workers.jobs.tune_trials", str(study.dir), job_timeout=TUNE_JOB_TIMEOUT,
                          result_ttl=24 * 3600, failure_ttl=24 * 3600) for _ in range(args.workers)]
    print(f"enqueued {len(jobs)} trial jobs on {keys.TUNE_QUEUE}: workers (`onlinespec worker`) that see "
          f"{study.dir} run them", file=sys.stderr)
    if args.no_wait:
        print(f"follow it with: onlinespec tune show {study.dir}", file=sys.stderr)
        return 0
    start, last = time.time(), ""
    try:
        while True:
            st = study.optuna()
            study.reap_stale(st)
            c = study.counts(st)
            running = [t for t in st.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
            parts = [f"trial {t.number} round {t.user_attrs.get('progress', [0, '?'])[0]}/"
                     f"{t.user_attrs.get('progress', [0, '?'])[1]}" for t in running]
            line = (f"{c['complete']}/{study.total} complete, {c['running']} running"
                    f"{' (' + ', '.join(parts) + ')' if parts else ''}, elapsed {Progress._t(time.time() - start)}")
            if line != last:
                print(line, file=sys.stderr, flush=True)
                last = line
            states = [j.get_status(refresh=True) for j in jobs]
            if c["complete"] >= study.total or all(
                    s in ("finished", "failed", "stopped", "canceled") for s in states):
                failed = [j.id for j, s in zip(jobs, states) if s == "failed"]
                if failed:
                    print(f"{len(failed)} trial jobs failed (see the workers' logs): {failed}", file=sys.stderr)
                return 0
            time.sleep(2.0)
    except KeyboardInterrupt:
        print(f"\nstopped following; the workers go on. Results: onlinespec tune show {study.dir}", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------- show


def _report(args, study, heldout: bool) -> int:
    rows = study.rows()
    if not rows:
        print(f"study {study.name}: no completed trial yet ({study.counts()})")
        return 1
    base = next((r for r in rows if r.baseline), None)
    print(f"study {study.name}: {len(rows)} complete of {study.total}; prequential loss on "
          f"{len(study.records()[0])} records, +- its bootstrap standard error; delta vs the baseline with its "
          f"95% interval (paired, same records); * beats the baseline beyond the noise")
    print(f"{'rank':>4} {'trial':>5} {'loss':>15} {'delta vs baseline':>26} {'pred.len':>8} {'rr':>3}  settings")
    for rank, r in enumerate(rows, 1):
        delta = ("baseline" if r.baseline else f"{r.diff:+.4f} [{r.diff_low:+.4f},{r.diff_high:+.4f}]"
                 if r.diff is not None else "(no baseline yet)")
        print(f"{rank:>4} {r.number:>5} {r.loss:>8.4f}+-{r.stderr:.4f} {delta:>26}{'*' if r.beats_baseline else ' '}"
              f"{r.predicted_accepted_length:>8.3f} {r.round_records:>3}  {settings_text(r.settings)}"
              + (f"  (the settings of trial {r.repeat_of}: not replayed again)" if r.repeat_of is not None else ""))
    config, round_records, best = study.best_config()
    out = study.dir / "best.yaml"
    out.write_text(f"# study {study.name}: trial {best.number} of {len(rows)}, prequential loss {best.loss:.4f}"
                   f"{'' if base is None or best.baseline else f' vs the baseline {base.loss:.4f}'}; "
                   f"rounds of {round_records} records (a worker setting: --round-records)\n"
                   + yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"best: trial {best.number}{' (the baseline: nothing beat it)' if best.baseline else ''} -> {out}")
    importance = _importance(study)
    if importance:
        print("importance: " + ", ".join(f"{k}={v:.2f}" for k, v in importance.items()))
    held = study.heldout(progress=None) if heldout else _cached_heldout(study)
    if held:
        verdict = "holds" if held["gain_holds"] else "is within the noise" if best.number != 0 else "n/a"
        print(f"held out ({held['records']} last records): winner {held['winner_loss']:.4f} vs baseline "
              f"{held['baseline_loss']:.4f} (delta {held['diff']:+.4f} [{held['diff_low']:+.4f},"
              f"{held['diff_high']:+.4f}]): the gain {verdict}; predicted accepted length at k={study.k} "
              f"{held['baseline_predicted_accepted_length']:.3f} -> {held['winner_predicted_accepted_length']:.3f} "
              f"(the drafter's own drafts; suffix copies come on top)")
    plots = _plots(study, rows) if getattr(args, "plot", True) else []
    for p in plots:
        print(f"plot: {p}")
    if args.json:
        print(json.dumps({"study": study.name, "dir": str(study.dir), "total": study.total,
                          "ranking": [r.to_dict() for r in rows], "best": best.number, "importance": importance,
                          "heldout": held, "best_yaml": str(out), "plots": [str(p) for p in plots]}))
    return 0


def _cached_heldout(study):
    path = study.dir / study.HELDOUT
    return json.loads(path.read_text()) if path.is_file() else None


def _importance(study) -> dict:
    import optuna

    st = study.optuna()
    searched = [t for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.params]
    if len(searched) < 3 or not study.space.params:
        return {}
    try:
        sub = optuna.create_study(direction="minimize")  # the searched trials only: the baseline has no parameters
        sub.add_trials(searched)
        return {k: round(float(v), 3) for k, v in optuna.importance.get_param_importances(sub).items()}
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def _plots(study, rows) -> list[Path]:
    """history.png (loss by trial, best so far, the baseline) and params.png (loss by each parameter)."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'onlinespec[plot]')", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_number = sorted(rows, key=lambda r: r.number)
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.number for r in by_number]
    ax.errorbar(xs, [r.loss for r in by_number], yerr=[r.stderr for r in by_number], fmt="o", color="tab:blue",
                label="trial (+- bootstrap s.e.)")
    best, so_far = float("inf"), []
    for r in by_number:
        best = min(best, r.loss)
        so_far.append(best)
    ax.step(xs, so_far, where="post", color="tab:green", label="best so far")
    base = next((r for r in rows if r.baseline), None)
    if base is not None:
        ax.axhline(base.loss, color="tab:red", linestyle="--", label="baseline (live)")
    ax.set_xlabel("trial")
    ax.set_ylabel("prequential loss (1 - acceptance)")
    ax.set_title(f"study {study.name}")
    ax.legend()
    fig.tight_layout()
    out.append(study.dir / "history.png")
    fig.savefig(out[-1], dpi=100)
    plt.close(fig)
    names = list(study.space.params)
    if names:
        cols = min(4, len(names))
        fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.6 * ((len(names) + cols - 1) // cols)),
                                 squeeze=False)
        for ax, name in zip(axes.flat, names):
            pts = [(r.settings[name], r.loss) for r in rows if name in r.settings]
            labels = sorted({str(v) for v, _ in pts})
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in pts)
            if numeric:
                ax.scatter([v for v, _ in pts], [loss for _, loss in pts], s=14)
                if pts and min(v for v, _ in pts) > 0 and max(v for v, _ in pts) / min(v for v, _ in pts) > 20:
                    ax.set_xscale("log")
            else:
                ax.scatter([labels.index(str(v)) for v, _ in pts], [loss for _, loss in pts], s=14)
                ax.set_xticks(range(len(labels)), labels)
            if base is not None:
                ax.axhline(base.loss, color="tab:red", linestyle="--", linewidth=1)
            ax.set_title(name, fontsize=9)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        out.append(study.dir / "params.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out


def _show(args) -> int:
    from onlinespec.learn.tune.study import TuningStudy

    if not args.study:
        return _fail("show needs a study: onlinespec tune show NAME|DIR")
    return _report(args, TuningStudy(study_dir(args.study)), heldout=args.heldout)


# ---------------------------------------------------------------------- apply


def _apply(args) -> int:
    import httpx

    token = args.token or os.environ.get("ONLINESPEC_ADMIN_TOKEN")
    if not token:  # before any other work
        return _fail("apply needs the admin token (--token or ONLINESPEC_ADMIN_TOKEN)")
    if not args.url or not args.drafter_id or not args.study:
        return _fail("apply needs STUDY|best.yaml, --url and --drafter-id")
    url = args.url.rstrip("/")
    route = f"{url}/admin/drafters/{args.drafter_id}/learner"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        r = httpx.get(route, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach {url}: {exc}", 1)
    if r.status_code in (401, 403):
        return _fail(f"the server refused the admin token ({r.status_code}: {r.text.strip()})")
    if r.status_code != 200:
        return _fail(f"{route}: {r.status_code} {r.text.strip()}", 1)
    round_records = None
    source = Path(args.study)
    if source.suffix in (".yaml", ".yml") and source.is_file():
        config = LearnerConfig.from_yaml(source)
    else:
        from onlinespec.learn.tune.study import TuningStudy

        study = TuningStudy(study_dir(args.study))
        config, round_records, best = study.best_config()
        baseline_rr = study.base_round_records
        print(f"study {study.name}: trial {best.number}, prequential loss {best.loss:.4f}")
    live = r.json()
    changed = {k: (v, w) for k, v in _flat(live).items() for w in [_flat(config.to_dict()).get(k)] if v != w}
    r = httpx.put(route, json=config.to_dict(), headers=headers, timeout=30)
    if r.status_code != 200:
        return _fail(f"apply failed: {r.status_code} {r.text.strip()}", 1)
    print(f"applied to {args.drafter_id} at {url} (from its next round): "
          + (", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())) or "no key changed"))
    if round_records is not None:
        if round_records != baseline_rr:
            print(f"round_records={round_records} is a worker setting and needs a worker restart: "
                  f"onlinespec worker --round-records {round_records} (workers.round_records in the service config)")
        else:
            print(f"round_records={round_records}: unchanged")
    return 0


def _flat(d: dict) -> dict:
    from onlinespec.learn.tune.space import flatten

    return flatten(d)


def run(args) -> int:
    args.study = getattr(args, "study_opt", None) or args.study
    if args.action == "apply":
        return _apply(args)
    if args.action == "show":
        try:
            return _show(args)
        except ValueError as exc:
            return _fail(str(exc))
    from onlinespec.config import load_config

    cfg = load_config(args.config)
    try:
        if args.action == "export":
            return _export(args, cfg)
        if args.action == "import":
            return _import(args, cfg)
        return _run(args, cfg)
    except ValueError as exc:
        return _fail(str(exc))
