"""``onlinespec tune``: tune learner hyperparameters by replaying logged feedback.

    onlinespec tune export --out feedback.msgpack [--count N]     # from the Redis stream to a file
    onlinespec tune import --file feedback.msgpack                # and back (another deployment)
    onlinespec tune run --file feedback.msgpack --space configs/tune.yaml --out best.yaml
                        [--apply http://host:8000 --drafter-id drafter-1l]   # admin token from env

``run`` replays the records, in their logged order and in rounds, through every learner
configuration the search space yields (grid or random), exactly as a worker would (the same
``DrafterLearner``), scoring each by its mean prequential loss (1 - the acceptance the served
drafter got at each request's temperature on each round, before learning from it) and the mean
accepted length that loss predicts for draft length ``k``. The ranked table is printed; the best configuration is
written as YAML and, with ``--apply``, sent to a live deployment through the admin API.

The file is a msgpack stream: a header map, then one record payload (the codec's bytes) per
entry. Nothing is unpickled; every payload is decoded by the strict codec, and bad ones are
skipped and counted.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import yaml

from onlinespec import keys
from onlinespec.adaptive import expected_tokens
from onlinespec.codec import CodecError, decode
from onlinespec.learn.learner import DrafterLearner, LearnerConfig

__all__ = ["export_stream", "import_stream", "read_file", "candidates", "Trial", "evaluate", "run"]

FORMAT = "onlinespec-feedback"


def export_stream(redis, target: str, path: str | Path, count: int | None = None) -> int:
    n = 0
    with open(path, "wb") as f:
        f.write(msgpack.packb({"format": FORMAT, "version": 1, "target": target}))
        last = "-"
        while count is None or n < count:
            batch = redis.xrange(keys.feedback_stream(target), min=last, count=500)
            batch = [(i, fl) for i, fl in batch if last == "-" or i.decode() != last]
            if not batch:
                break
            for entry_id, fields in batch:
                if b"r" in fields and (count is None or n < count):
                    f.write(msgpack.packb(fields[b"r"], use_bin_type=True))
                    n += 1
            last = batch[-1][0].decode()
    return n


def _payloads(path: str | Path):
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_bin_len=64 << 20)
        header = next(unpacker, None)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path} is not an exported feedback file")
        for item in unpacker:
            yield item


def import_stream(redis, target: str, path: str | Path) -> int:
    pipe, n = redis.pipeline(transaction=False), 0
    for payload in _payloads(path):
        if isinstance(payload, bytes):
            pipe.xadd(keys.feedback_stream(target), {"r": payload})
            n += 1
    pipe.execute()
    return n


def read_file(path: str | Path):
    """(records, skipped): decoded records in their logged order."""
    records, skipped = [], 0
    for payload in _payloads(path):
        try:
            records.append(decode(payload))
        except (CodecError, TypeError):
            skipped += 1
    return records, skipped


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def candidates(space: dict, base: LearnerConfig) -> list[tuple[dict, LearnerConfig, int]]:
    """(settings, config, round_records) for every point the search space asks for."""
    grid = space["space"]
    names = list(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    if space.get("mode", "grid") == "random":
        rng = random.Random(space.get("seed", 0))
        points = rng.sample(points, min(int(space.get("trials", 10)), len(points)))
    out = []
    for point in points:
        d = base.to_dict()
        round_records = int(point.get("round_records", space.get("round_records", 16)))
        for name, value in point.items():
            if name != "round_records":
                _set(d, name, value)
        out.append((point, LearnerConfig.from_dict(d), round_records))
    return out


@dataclass(frozen=True)
class Trial:
    settings: dict
    config: LearnerConfig
    round_records: int
    prequential_loss: float
    predicted_accepted_length: float
    rounds: int


def evaluate(drafter, records, config: LearnerConfig, round_records: int, k: int) -> tuple[float, float, int]:
    """Replay ``records`` in rounds through a fresh learner: (mean prequential loss, predicted
    mean accepted length, rounds)."""
    import copy

    learner = DrafterLearner(copy.deepcopy(drafter), config)
    losses, alphas = [], []
    for start in range(0, len(records), round_records):
        m = learner.round(records[start:start + round_records])
        losses.append(m.served_loss)
        alphas.append(m.mean_alpha)
    return float(np.mean(losses)), expected_tokens(float(np.mean(alphas)), k), len(losses)


def run(args) -> int:
    if args.action == "export" or args.action == "import":
        from onlinespec.config import load_config
        from onlinespec.redis_server import connect

        target = args.target or load_config(args.config).target_id
        redis = connect(args.redis_url)
        if args.action == "export":
            out = args.out or "feedback.msgpack"
            n = export_stream(redis, target, out, args.count)
            print(f"exported {n} records of {target} to {out}")
        else:
            n = import_stream(redis, target, args.file)
            print(f"imported {n} records into {keys.feedback_stream(target)}")
        return 0

    from onlinespec.config import CONFIGS, resolve_beside
    from onlinespec.models import load_model

    out = Path(args.out or "tune-best.yaml")
    if out.resolve() == Path(args.file).resolve():  # a run with defaults once overwrote its own input
        print(f"refusing to write the best configuration over the input file {args.file}: pass another --out",
              file=sys.stderr)
        return 2
    if args.apply and not (args.token or os.environ.get("ONLINESPEC_ADMIN_TOKEN")):  # before the work, not after
        print("--apply needs the admin token (--token or ONLINESPEC_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    space_path = args.space or str(CONFIGS / "tune.yaml")
    records, skipped = read_file(args.file)
    if not records:
        print(f"no valid records in {args.file} ({skipped} skipped)", file=sys.stderr)
        return 1
    space = yaml.safe_load(Path(space_path).read_text())
    base_path = space.get("base") and resolve_beside(space_path, space["base"])
    base = LearnerConfig.from_yaml(base_path) if base_path else LearnerConfig()
    drafter = load_model(args.drafter)
    trials = []
    todo = candidates(space, base)
    for i, (settings, config, round_records) in enumerate(todo):
        loss, mal, rounds = evaluate(drafter, records, config, round_records, args.k)
        trials.append(Trial(settings, config, round_records, loss, mal, rounds))
        done = (i + 1) / len(todo)
        print(f"\r[{'#' * int(done * 30):<30}] {i + 1}/{len(todo)} best loss "
              f"{min(t.prequential_loss for t in trials):.4f}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    trials.sort(key=lambda t: t.prequential_loss)
    print(f"{len(records)} records ({skipped} skipped), k={args.k}")
    print(f"{'rank':>4} {'preq. loss':>10} {'pred. acc. len':>14}  settings")
    for rank, t in enumerate(trials, 1):
        print(f"{rank:>4} {t.prequential_loss:>10.4f} {t.predicted_accepted_length:>14.3f}  {json.dumps(t.settings)}")
    best = trials[0]
    out.write_text(
        f"# best of {len(trials)} by mean prequential loss {best.prequential_loss:.4f} "
        f"(predicted accepted length {best.predicted_accepted_length:.3f} at k={args.k}); "
        f"rounds of {best.round_records} records (workers: --round-records)\n"
        + yaml.safe_dump(best.config.to_dict(), sort_keys=False))
    print(f"best configuration: {out}")
    if args.apply:
        import httpx

        token = args.token or os.environ.get("ONLINESPEC_ADMIN_TOKEN")  # an explicit flag wins
        r = httpx.put(f"{args.apply.rstrip('/')}/admin/drafters/{args.drafter_id}/learner",
                      json=best.config.to_dict(), headers={"Authorization": f"Bearer {token}"}, timeout=30)
        if r.status_code != 200:
            print(f"apply failed: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        print(f"applied to {args.drafter_id} at {args.apply} (from its next round)")
    if args.json:
        print(json.dumps({"records": len(records), "skipped": skipped, "ranking": [
            {"settings": t.settings, "prequential_loss": t.prequential_loss,
             "predicted_accepted_length": t.predicted_accepted_length, "round_records": t.round_records}
            for t in trials]}))
    return 0
