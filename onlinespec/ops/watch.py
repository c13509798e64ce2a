"""``onlinespec watch``: a live terminal view of the learning loop, from ``/dashboard/data``.

Drafter versions with their parameter-change norms, round losses and estimated acceptance, the
accepted length of each version's own drafts and, apart, of suffix copies, the drafters' share of
requests, traffic per domain, and queue / worker lag; redrawn every ``--interval``.
"""

from __future__ import annotations

import sys
import time

import httpx

__all__ = ["render", "run"]


def _f(v, digits=3) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _accepted_lengths(rows: list[dict]) -> dict:
    """(drafter, version) -> mean accepted length over the samples, weighted by their steps."""
    sums: dict = {}
    for row in rows:
        key = (row["drafter"], str(row["version"]))
        s = sums.setdefault(key, [0.0, 0.0])
        s[0] += (row["mean_accepted_length"] - 1) * row.get("drafts", 1)
        s[1] += row.get("drafts", 1)
    return {k: 1 + a / n for k, (a, n) in sums.items() if n}


def render(d: dict) -> str:
    routing = "  ".join(f"{k} {v:.0%}" for k, v in (d.get("routing") or {}).items()) or "suffix only"
    lines = [f"OnlineSpec  target {d['target']}  drafters {routing}  swaps {d.get('swaps', 0)}  "
             f"refusals {d.get('refusals', 0)}  rollbacks {d.get('rollbacks', 0)}", ""]
    rows = d.get("accepted_length", [])
    own = _accepted_lengths([r for r in rows if r.get("source", "own") == "own"])
    copies = _accepted_lengths([r for r in rows if r.get("source") == "copied"])
    for dr in d.get("drafters", []):
        rounds = d.get("rounds", {}).get(dr["id"], [])
        last = rounds[-1] if rounds else {}
        why = f" ({dr['status']})" if dr.get("status") else ""
        lines.append(f"{dr['id']}: serving v{dr['serving_version']}  latest v{dr['latest']}{why}"
                     f"{'  PAUSED' if dr['paused'] else ''}  rounds {len(rounds)}  "
                     f"round loss {_f(last.get('served_loss'))}  weights {[round(w, 3) for w in last.get('weights', [])]}")
        lines.append(f"  {'version':>8} {'parent':>7} {'round loss':>11} {'est. accept':>12} {'param change':>13} "
                     f"{'own acc. len':>13}")
        for v in dr["versions"][-6:]:
            acc = own.get((dr["id"], str(v["version"])))
            lines.append(f"  {v['version']:>8} {_f(v['parent']):>7} {_f(v['served_loss']):>11} "
                         f"{_f(v.get('estimated_acceptance')):>12} {_f(v['param_change_norm'], 4):>13} {_f(acc):>13}")
        lines.append("")
    copied = copies.get(("suffix copies", "None"))
    if copied is not None:
        lines.append(f"suffix copies: accepted length {copied:.3f} (apart from the drafters' own drafts)")
    for t in d.get("traffic", [])[:8]:
        share = "  ".join(f"{k} {v:.0%}" for k, v in (t.get("routing") or {}).items())
        lines.append(f"traffic {t['group']}: {t['requests']} requests{'  ' + share if share else ''}")
    if d.get("pool_weights"):
        lines.append("pool weights: " + "  ".join(f"{k} {w:.3f}" for k, w in d["pool_weights"][-1]["weights"].items()))
    pc = d.get("prefix_cache")
    if pc and pc.get("hit_share") is not None:
        lines.append(f"prefix cache: {pc['hit_share']:.0%} of prompt tokens served from it, "
                     f"{pc['tokens']} positions held ({pc['bytes'] / 2**20:.0f} MB)")
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
