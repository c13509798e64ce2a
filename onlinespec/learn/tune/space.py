"""A search space over learner hyperparameters, read from YAML and checked before any work.

    sampler: tpe            # tpe (default) | random | grid (every combination of the lists)
    trials: 12              # trials a study runs, the baseline (trial 0) not counted
    seed: 0
    base: learner.yaml      # every key not searched comes from here (relative to this file or the
                            # repository); `tune run` starts from the live configuration instead
    holdout: 0.25           # last share of the exported stream kept out of the search
    space:
      optim.lr: [0.0001, 0.001]                       # a list: these values
      optim.lr: {low: 0.00005, high: 0.003, log: true}  # a range (tpe, random)
      round_records: [8, 16]                          # records per learning round (a worker setting)

Names are the dotted keys of :class:`~onlinespec.learn.learner.LearnerConfig` plus
``round_records``; a misspelt one is an error that lists the known names, and every value is
checked by building the configuration it makes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from onlinespec.learn.learner import LearnerConfig

__all__ = ["SearchSpace", "known_names", "settings_config", "flatten"]

TOP_KEYS = {"sampler", "mode", "trials", "seed", "base", "holdout", "space", "round_records"}
SAMPLERS = ("tpe", "random", "grid")


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def known_names() -> list[str]:
    return sorted([*flatten(LearnerConfig().to_dict()), "round_records"])


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def settings_config(settings: dict, base: LearnerConfig, round_records: int) -> tuple[LearnerConfig, int]:
    """The learner configuration and round size a point of the space makes from ``base``."""
    d = base.to_dict()
    for name, value in settings.items():
        if name == "round_records":
            round_records = int(value)
        else:
            _set(d, name, value)
    return LearnerConfig.from_dict(d), round_records


@dataclass(frozen=True)
class SearchSpace:
    params: dict  # name -> list of values, or {"low", "high", "log", "step"}
    sampler: str = "tpe"
    trials: int = 12
    seed: int = 0
    base: str | None = None  # resolved path of the base learner YAML
    holdout: float = 0.25
    round_records: int = 16
    source: str = ""
    raw: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"search space {path}: no such file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"search space {path}: not YAML: {exc}") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw, source: str = "<space>") -> SearchSpace:
        from onlinespec.config import resolve_beside

        if not isinstance(raw, dict) or not isinstance(raw.get("space"), dict) or not raw["space"]:
            raise ValueError(f"search space {source}: needs a non-empty `space:` mapping of names to values")
        unknown = sorted(set(raw) - TOP_KEYS)
        if unknown:
            raise ValueError(f"search space {source}: unknown key {unknown[0]}; known: {', '.join(sorted(TOP_KEYS))}")
        sampler = str(raw.get("sampler") or raw.get("mode") or "tpe")
        if sampler not in SAMPLERS:
            raise ValueError(f"search space {source}: sampler {sampler!r}; one of {', '.join(SAMPLERS)}")
        names = known_names()
        params = {}
        for name, values in raw["space"].items():
            if name not in names:
                raise ValueError(f"search space {source}: unknown name {name}; known: {', '.join(names)}")
            if isinstance(values, dict):
                bad = sorted(set(values) - {"low", "high", "log", "step"})
                if bad or "low" not in values or "high" not in values:
                    raise ValueError(f"search space {source}: {name}: a range is {{low, high[, log, step]}}")
                if sampler == "grid":
                    raise ValueError(f"search space {source}: {name}: a grid takes lists of values, not a range")
            elif not isinstance(values, list) or not values:
                raise ValueError(f"search space {source}: {name}: a non-empty list of values or a range")
            params[name] = values
        holdout = float(raw.get("holdout", 0.25))
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"search space {source}: holdout is a share in [0, 1)")
        base = raw.get("base")
        space = cls(params=params, sampler=sampler, trials=int(raw.get("trials", 12)), seed=int(raw.get("seed", 0)),
                    base=resolve_beside(source, base) if base else None, holdout=holdout,
                    round_records=int(raw.get("round_records", 16)), source=source, raw=raw)
        space.check()
        return space

    def check(self) -> None:
        """Every value builds a valid configuration (one name at a time, from the defaults)."""
        for name, values in self.params.items():
            for value in (values if isinstance(values, list) else [values["low"], values["high"]]):
                try:
                    settings_config({name: value}, LearnerConfig(), self.round_records)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"search space {self.source}: {name}={value!r}: {exc}") from None

    def base_config(self) -> LearnerConfig:
        return LearnerConfig.from_yaml(self.base) if self.base else LearnerConfig()

    def suggest(self, trial) -> dict:
        """The point an Optuna trial asks for."""
        out = {}
        for name, values in self.params.items():
            if isinstance(values, list):
                out[name] = trial.suggest_categorical(name, values)
            elif all(isinstance(values[k], int) for k in ("low", "high")) and not isinstance(values.get("step", 1), float):
                out[name] = trial.suggest_int(name, values["low"], values["high"], step=values.get("step", 1),
                                              log=bool(values.get("log")))
            else:
                out[name] = trial.suggest_float(name, float(values["low"]), float(values["high"]),
                                                step=values.get("step"), log=bool(values.get("log")))
        return out

    def grid_points(self) -> list[dict]:
        """Every combination of the lists (a grid space), in order; empty for tpe and random."""
        if self.sampler != "grid":
            return []
        names = list(self.params)
        return [dict(zip(names, values)) for values in itertools.product(*(self.params[n] for n in names))]

    def grid_size(self) -> int:
        n = 1
        for values in self.params.values():
            n *= len(values) if isinstance(values, list) else 1
        return n

    def make_sampler(self):
        import optuna

        if self.sampler in ("random", "grid"):  # a grid's points are queued trials (TuningStudy.create)
            return optuna.samplers.RandomSampler(seed=self.seed)
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=min(10, max(2, self.trials // 3)))
