"""``onlinespec tune``: tune the learners' hyperparameters on logged feedback, with Optuna.

    onlinespec tune export [--out FILE] [--count N]        # the Redis stream to a file (never overwrites)
    onlinespec tune import --file FILE                     # and back (another deployment)
    onlinespec tune run --file FILE [--study NAME] [--space configs/tune.yaml] [--trials N] [--seed S]
                        [--sampler tpe|random|grid] [--workers N [--no-wait]]
    onlinespec tune show NAME|DIR [--json]                 # table, best, importance, held-out check, plots
    onlinespec tune apply NAME|DIR|best.yaml --url URL --drafter-id ID   # admin token checked first

A study (``study.py``) is a directory with a copy of the feedback, the drafter trials start from
(the live version by default), the search space (``space.py``) and Optuna's journal: it resumes
after Ctrl-C, and RQ workers that see the directory run its trials in parallel
(``workers.jobs.tune_trials``). Trial 0 is the live configuration; every trial's loss comes with
a bootstrap spread and a paired comparison with it; the winner is checked on a held-out last part
of the stream. Exports: ``exports.py``.
"""

from onlinespec.learn.tune.exports import FORMAT, export_stream, import_stream, read_file
from onlinespec.learn.tune.space import SearchSpace, settings_config
from onlinespec.learn.tune.study import TuningStudy, paired, replay


def run(args) -> int:
    from onlinespec.learn.tune.cli import run as _run

    return _run(args)


__all__ = ["FORMAT", "export_stream", "import_stream", "read_file", "SearchSpace", "settings_config", "TuningStudy",
           "paired", "replay", "run"]
