"""``onlinespec watch``: a live terminal view of the learning loop, from ``/dashboard/data``.

Drafter versions with their parameter-change norms and round losses, accepted length per
version, ensemble and pool weights, and queue / worker lag; redrawn every ``--interval``.
"""

from __future__ import annotations

import sys
import time

import httpx

__all__ = ["render", "run"]


def _f(v, digits=3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def render(d: dict) -> str:
    lines = [f"OnlineSpec  target {d['target']}  serving {d.get('serving')}  swaps {d.get('swaps', 0)}  "
             f"refusals {d.get('refusals', 0)}  rollbacks {d.get('rollbacks', 0)}", ""]
    latest_accept = {}
    for row in d.get("accepted_length", []):
        latest_accept[(row["drafter"], str(row["version"]))] = row["mean_accepted_length"]
    for dr in d.get("drafters", []):
        rounds = d.get("rounds", {}).get(dr["id"], [])
        last = rounds[-1] if rounds else {}
        lines.append(f"{dr['id']}: serving v{dr['serving_version']}  latest v{dr['latest']}"
                     f"{'  PAUSED' if dr['paused'] else ''}  rounds {len(rounds)}  "
                     f"round loss {_f(last.get('served_loss'))}  weights {[round(w, 3) for w in last.get('weights', [])]}")
        lines.append(f"  {'version':>8} {'parent':>7} {'round loss':>11} {'param change':>13} {'acc. len':>9}")
        for v in dr["versions"][-6:]:
            acc = latest_accept.get((dr["id"], str(v["version"])))
            lines.append(f"  {v['version']:>8} {_f(v['parent']):>7} {_f(v['served_loss']):>11} "
                         f"{_f(v['param_change_norm'], 4):>13} {_f(acc):>9}")
        lines.append("")
    if d.get("pool_weights"):
        lines.append("pool weights: " + "  ".join(f"{k} {w:.3f}" for k, w in d["pool_weights"][-1]["weights"].items()))
    if d.get("lag"):
        lag = d["lag"][-1]
        lines.append(f"queue depth {lag.get('queue_depth')}  update jobs {lag.get('update_jobs', '-')}  "
                     f"unlearned {lag.get('feedback_pending', {})}")
    return "\n".join(lines)


def run(args) -> int:
    n = 0
    while True:
        try:
            data = httpx.get(args.url.rstrip("/") + "/dashboard/data", timeout=10).json()
            screen = render(data)
        except httpx.HTTPError as exc:
            screen = f"cannot reach {args.url}: {exc}"
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[2J\x1b[H")
        print(screen, flush=True)
        n += 1
        if args.once or (args.count and n >= args.count):
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
