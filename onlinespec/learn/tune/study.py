"""A tuning study: one directory that holds everything its trials need, and the Optuna journal.

    STUDY/study.json        name, draft length, the baseline (live) configuration, where inputs came from
    STUDY/feedback.msgpack  a copy of the exported feedback (the input file itself is only read)
    STUDY/drafter/          the drafter every trial starts from (the live version by default)
    STUDY/space.yaml        the search space
    STUDY/journal.log       Optuna's journal: every trial's parameters, figures and state
    STUDY/heldout.json      the winner and the baseline on the held-out part of the stream

Trial 0 is always the baseline (the live configuration, or the space's base). A trial replays the
first part of the stream (``1 - holdout``) in rounds through a fresh learner exactly as a worker
would, scoring the served drafter on each record before learning from it (the prequential
loss: 1 - the acceptance it got). The score is kept per record, so each trial's figure comes with
a bootstrap spread and a paired comparison with the baseline on the same records; the held-out
check then replays the winner and the baseline over the whole stream and compares them on its
last part, which no trial was scored on.

The journal is a file (Optuna's ``JournalFileBackend``, with file locks), so a study resumes
after Ctrl-C and any process that sees the directory (RQ workers on the same host or a shared
volume) can run its trials. Optuna's Redis journal is not used: it stores pickled snapshots.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from onlinespec.decode.adaptive import expected_tokens
from onlinespec.learn.learner import DrafterLearner, LearnerConfig
from onlinespec.learn.tune.exports import read_file
from onlinespec.learn.tune.space import SearchSpace, settings_config

__all__ = ["Score", "replay", "paired", "TuningStudy", "Row", "studies", "STALE_SECONDS"]

STALE_SECONDS = 120.0  # a running trial with no progress for this long is a dead worker's: failed


@dataclass(frozen=True)
class Score:
    """A replay's prequential loss, per record: the sum of 1 - acceptance over its positions, and how many."""

    loss_sums: np.ndarray
    counts: np.ndarray
    rounds: int

    @property
    def loss(self) -> float:
        return float(self.loss_sums.sum() / max(1, self.counts.sum()))

    def predicted_accepted_length(self, k: int) -> float:
        return expected_tokens(1.0 - self.loss, k)

    def part(self, start: int) -> Score:
        return Score(self.loss_sums[start:], self.counts[start:], self.rounds)


def replay(drafter, records: list, config: LearnerConfig, round_records: int, progress=None) -> Score:
    """Replay ``records`` in rounds through a fresh learner, as a worker would."""
    learner = DrafterLearner(copy.deepcopy(drafter), config)
    sums, counts = [], []
    rounds = math.ceil(len(records) / round_records)
    for i, start in enumerate(range(0, len(records), round_records)):
        learner.round(records[start:start + round_records])
        s, c = learner.record_losses
        sums.append(s)
        counts.append(c)
        if progress is not None:
            progress(i + 1, rounds)
    return Score(np.concatenate(sums), np.concatenate(counts), rounds)


def paired(score: Score, baseline: Score | None = None, samples: int = 1000, seed: int = 0) -> dict:
    """Bootstrap over records: the loss's standard error and, against a baseline scored on the
    same records, the 95% interval of the difference (negative: better than the baseline)."""
    rng = np.random.default_rng(seed)
    n = score.loss_sums.size
    mine, diffs = [], []
    for _ in range(0, samples, 100):
        idx = rng.integers(0, n, (100, n))
        t = score.loss_sums[idx].sum(1) / np.maximum(1, score.counts[idx].sum(1))
        mine.append(t)
        if baseline is not None:
            b = baseline.loss_sums[idx].sum(1) / np.maximum(1, baseline.counts[idx].sum(1))
            diffs.append(t - b)
    out = {"loss": score.loss, "stderr": float(np.std(np.concatenate(mine)))}
    if baseline is not None:
        d = np.concatenate(diffs)
        out.update(diff=score.loss - baseline.loss, diff_low=float(np.percentile(d, 2.5)),
                   diff_high=float(np.percentile(d, 97.5)))
        out["beats_baseline"] = out["diff_high"] < 0.0
    return out


@dataclass(frozen=True)
class Row:
    number: int
    baseline: bool
    settings: dict
    loss: float
    stderr: float
    diff: float | None
    diff_low: float | None
    diff_high: float | None
    beats_baseline: bool
    predicted_accepted_length: float
    round_records: int
    seconds: float
    repeat_of: int | None = None  # a trial whose settings an earlier one had: its figures, not replayed again

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _score_of(trial) -> Score:
    a = trial.user_attrs
    return Score(np.asarray(a["loss_sums"], dtype=np.float64), np.asarray(a["counts"], dtype=np.int64), a["rounds"])


class TuningStudy:
    STUDY, JOURNAL, FEEDBACK, DRAFTER, SPACE, HELDOUT = (
        "study.json", "journal.log", "feedback.msgpack", "drafter", "space.yaml", "heldout.json")

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).resolve()
        meta = self.dir / self.STUDY
        if not meta.is_file():
            raise ValueError(f"no tuning study at {self.dir} (no {self.STUDY}): create one with `onlinespec tune run`")
        self.meta = json.loads(meta.read_text())
        self.name = self.meta["name"]
        self.k = int(self.meta["k"])
        self.space = SearchSpace.from_dict(self.meta["space"], str(self.dir / self.SPACE))
        self.base = LearnerConfig.from_dict(self.meta["baseline"]["config"])
        self.base_round_records = int(self.meta["baseline"]["round_records"])
        self._records = None
        self._drafter = None

    # ------------------------------------------------------------------ creation

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / cls.STUDY).is_file()

    @classmethod
    def create(cls, directory: str | Path, feedback: str | Path, space: SearchSpace, drafter, drafter_from: str,
               baseline: LearnerConfig, baseline_round_records: int, baseline_from: str, k: int) -> TuningStudy:
        """A new study; ``feedback`` is copied in (and checked first), ``drafter`` saved in."""
        directory = Path(directory)
        if cls.exists(directory):
            raise ValueError(f"a tuning study already exists at {directory}")
        records, skipped = read_file(feedback)  # unreadable or empty: refused before anything is written
        if len(records) < 2:
            raise ValueError(f"{feedback}: {len(records)} valid records ({skipped} skipped): too few to tune on")
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(feedback, directory / cls.FEEDBACK)
        drafter.save_pretrained(directory / cls.DRAFTER)
        (directory / cls.SPACE).write_text(yaml.safe_dump(space.raw, sort_keys=False))
        meta = {"name": directory.resolve().name, "k": k, "created": time.time(),
                "feedback": {"from": str(Path(feedback).resolve()), "records": len(records), "skipped": skipped},
                "drafter": {"from": drafter_from},
                "baseline": {"config": baseline.to_dict(), "round_records": baseline_round_records, "from": baseline_from},
                "space": {**space.raw, **({"base": space.base} if space.base else {})}}
        tmp = directory / (cls.STUDY + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(directory / cls.STUDY)  # last: a study.json means a complete study directory
        study = cls(directory)
        st = study.optuna()
        st.enqueue_trial({}, user_attrs={"baseline": True})  # trial 0: what is live now
        for point in space.grid_points():  # a grid: every point queued (each runs once, in any process)
            st.enqueue_trial(point)
        return study

    # ------------------------------------------------------------------ inputs

    def records(self) -> tuple[list, list]:
        """(tuning part, held-out part) of the stream, in logged order."""
        if self._records is None:
            records, _ = read_file(self.dir / self.FEEDBACK)
            cut = max(1, int(round(len(records) * (1.0 - self.space.holdout))))
            self._records = (records[:cut], records[cut:])
        return self._records

    def drafter(self):
        if self._drafter is None:
            from onlinespec.models import load_model

            self._drafter = load_model(str(self.dir / self.DRAFTER))
        return self._drafter

    # ------------------------------------------------------------------ Optuna

    def optuna(self):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(self.dir / self.JOURNAL)))
        return optuna.create_study(study_name=self.name, storage=storage, sampler=self.space.make_sampler(),
                                   direction="minimize", load_if_exists=True)

    @property
    def total(self) -> int:
        """Trials the study runs, the baseline included (a grid: at most its size)."""
        if self.space.sampler == "grid":
            return self.space.grid_size() + 1
        return int(self.meta.get("trials", self.space.trials)) + 1

    def set_trials(self, trials: int) -> None:
        """Run to ``trials`` (the baseline not counted) from now on: a resumed study can grow."""
        self.meta["trials"] = int(trials)
        tmp = self.dir / (self.STUDY + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1))
        tmp.replace(self.dir / self.STUDY)

    def objective(self, trial, progress=None) -> float:
        baseline = bool(trial.user_attrs.get("baseline"))
        settings = {} if baseline else self.space.suggest(trial)
        config, round_records = settings_config(settings, self.base, self.base_round_records)
        earlier = None if baseline else self._finished_with(trial.study, settings)
        if earlier is not None:  # TPE may draw a finished point again: a replay is deterministic, so reuse it
            for key in ("loss_sums", "counts", "rounds", "round_records", "settings", "predicted_accepted_length"):
                trial.set_user_attr(key, earlier.user_attrs[key])
            trial.set_user_attr("seconds", 0.0)
            trial.set_user_attr("repeat_of", earlier.number)
            return float(earlier.value)
        tuning, _ = self.records()
        start, last = time.time(), [0.0]

        def beat(done: int, rounds: int) -> None:  # progress, and the heartbeat that tells a live trial
            now = time.time()
            if now - last[0] >= 2.0 or done == rounds:
                last[0] = now
                trial.set_user_attr("progress", [done, rounds, now])
            if progress is not None:
                progress(trial.number, done, rounds, now - start)

        score = replay(self.drafter(), tuning, config, round_records, beat)
        trial.set_user_attr("loss_sums", [round(float(x), 5) for x in score.loss_sums])
        trial.set_user_attr("counts", [int(x) for x in score.counts])
        trial.set_user_attr("rounds", score.rounds)
        trial.set_user_attr("round_records", round_records)
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("seconds", round(time.time() - start, 2))
        trial.set_user_attr("predicted_accepted_length", score.predicted_accepted_length(self.k))
        return score.loss

    @staticmethod
    def _finished_with(study, settings: dict):
        """The first complete trial that ran exactly these settings (not a repeat itself), or None."""
        from optuna.trial import TrialState

        key = json.dumps(settings, sort_keys=True)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = t.user_attrs
            if not a.get("baseline") and "repeat_of" not in a and "loss_sums" in a \
                    and json.dumps(a.get("settings", {}), sort_keys=True) == key:
                return t
        return None

    def reap_stale(self, study=None) -> list[int]:
        """Fail running trials whose process died (no progress for ``STALE_SECONDS``): a killed
        worker's trial would otherwise count as running for ever."""
        from optuna.trial import TrialState

        study = study or self.optuna()
        reaped = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            seen = (t.user_attrs.get("progress") or [0, 0, t.datetime_start.timestamp() if t.datetime_start else 0])[2]
            if time.time() - seen > STALE_SECONDS:
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                reaped.append(t.number)
        return reaped

    def counts(self, study=None) -> dict:
        from optuna.trial import TrialState

        study = study or self.optuna()
        trials = study.get_trials(deepcopy=False)
        return {s.name.lower(): sum(t.state == s for t in trials)
                for s in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING)}

    def optimize(self, progress=None) -> int:
        """Run trials in this process until the study has ``total`` complete or running ones
        (other processes may be running them too); returns how many this call finished.
        Ctrl-C fails the trial in progress (the finished ones are kept) and is raised again."""
        import optuna
        from optuna.trial import TrialState

        study = self.optuna()
        self.reap_stale(study)
        done = [0]

        def full(running_is_mine: bool) -> bool:
            c = self.counts(study)
            return c["complete"] + c["running"] - (1 if running_is_mine else 0) >= self.total

        def objective(trial):
            if full(running_is_mine=True):  # another process took the last one first
                trial.set_user_attr("surplus", True)
                raise optuna.TrialPruned("the study has all its trials")
            value = self.objective(trial, progress)
            done[0] += 1
            return value

        def stop_when_full(study_, trial) -> None:
            if trial.state == TrialState.PRUNED or full(running_is_mine=False):
                study_.stop()

        while not full(running_is_mine=False):
            self._retry_failed_grid_points(study)
            before = len(study.get_trials(deepcopy=False))
            study.optimize(objective, callbacks=[stop_when_full], gc_after_trial=False)
            if len(study.get_trials(deepcopy=False)) == before:
                break
        return done[0]

    def _retry_failed_grid_points(self, study) -> None:
        """A grid point whose trial failed (Ctrl-C, a killed worker) is queued again."""
        from optuna.trial import TrialState

        if self.space.sampler != "grid":
            return
        trials = study.get_trials(deepcopy=False)
        alive = {json.dumps(t.params or t.system_attrs.get("fixed_params") or {}, sort_keys=True) for t in trials
                 if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)}
        for t in trials:
            key = json.dumps(t.params, sort_keys=True)
            if t.state == TrialState.FAIL and t.params and key not in alive:
                study.enqueue_trial(t.params)
                alive.add(key)

    # ------------------------------------------------------------------ results

    def rows(self, study=None) -> list[Row]:
        """Completed trials, best first, each against the baseline."""
        from optuna.trial import TrialState

        study = study or self.optuna()
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "loss_sums" in t.user_attrs]
        base = next((t for t in done if t.user_attrs.get("baseline")), None)
        base_score = _score_of(base) if base is not None else None
        rows = []
        for t in done:
            is_base = t is base
            p = paired(_score_of(t), None if is_base else base_score)
            rows.append(Row(number=t.number, baseline=is_base, settings=t.user_attrs.get("settings", {}),
                            loss=p["loss"], stderr=p["stderr"], diff=p.get("diff"), diff_low=p.get("diff_low"),
                            diff_high=p.get("diff_high"), beats_baseline=bool(p.get("beats_baseline")),
                            predicted_accepted_length=float(t.user_attrs["predicted_accepted_length"]),
                            round_records=int(t.user_attrs["round_records"]), seconds=float(t.user_attrs["seconds"]),
                            repeat_of=t.user_attrs.get("repeat_of")))
        return sorted(rows, key=lambda r: r.loss)

    def best(self, study=None) -> Row | None:
        rows = self.rows(study)
        return rows[0] if rows else None

    def best_config(self, study=None) -> tuple[LearnerConfig, int, Row]:
        best = self.best(study)
        if best is None:
            raise ValueError(f"study {self.name}: no completed trial yet")
        config, round_records = settings_config(best.settings, self.base, self.base_round_records)
        return config, round_records, best

    def heldout(self, study=None, progress=None) -> dict | None:
        """The winner and the baseline replayed over the whole stream, compared on its held-out
        last part (cached per winner in ``heldout.json``)."""
        tuning, held = self.records()
        if not held:
            return None
        config, round_records, best = self.best_config(study)
        path = self.dir / self.HELDOUT
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("winner") == best.number:
                return cached
        everything = tuning + held
        base = replay(self.drafter(), everything, self.base, self.base_round_records, progress).part(len(tuning))
        if best.baseline:
            won = base
        else:
            won = replay(self.drafter(), everything, config, round_records, progress).part(len(tuning))
        p = paired(won, None if best.baseline else base)
        out = {"winner": best.number, "records": len(held), "winner_loss": won.loss, "baseline_loss": base.loss,
               "winner_predicted_accepted_length": won.predicted_accepted_length(self.k),
               "baseline_predicted_accepted_length": base.predicted_accepted_length(self.k),
               "diff": p.get("diff", 0.0), "diff_low": p.get("diff_low", 0.0), "diff_high": p.get("diff_high", 0.0),
               "gain_holds": bool(p.get("beats_baseline", False))}
        path.write_text(json.dumps(out, indent=1))
        return out

    def summary(self) -> dict:
        """What the dashboard lists: progress, the best trial against the baseline, the held-out verdict."""
        study = self.optuna()
        rows = self.rows(study)
        best = rows[0] if rows else None
        base = next((r for r in rows if r.baseline), None)
        path = self.dir / self.HELDOUT
        held = json.loads(path.read_text()) if path.is_file() else None
        return {"name": self.name, "created": self.meta.get("created"), "counts": self.counts(study), "total": self.total,
                "drafter": self.meta["drafter"]["from"], "baseline_loss": base.loss if base else None,
                "best": best.to_dict() if best else None,
                "heldout": held if held and best and held.get("winner") == best.number else None,
                "plots": [p.stem for p in (self.dir / "history.png", self.dir / "params.png") if p.is_file()]}


def studies(root: str | Path) -> list[TuningStudy]:
    """The studies under a root directory, newest first (unreadable ones skipped)."""
    out = []
    for d in sorted(Path(root).glob(f"*/{TuningStudy.STUDY}")):
        try:
            out.append(TuningStudy(d.parent))
        except (ValueError, OSError, KeyError):
            continue
    return sorted(out, key=lambda s: -float(s.meta.get("created") or 0))
