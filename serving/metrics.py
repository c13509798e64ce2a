"""Prometheus text-format metrics, written out by hand (no client library needed).

Speculative-decoding counters mirror vLLM's (``num_drafts``, ``num_draft_tokens``,
``num_accepted_tokens``, ``num_accepted_tokens_per_pos``), labelled by drafter and version so
a regression after a swap is visible per version. They count every draft; the ``copied`` ones
(suffix speculation and requests' predicted outputs, same labels; the ``predicted`` ones again
apart, unlabelled) and the drafter models' ``own`` ones are also counted apart, so what a
drafter version itself achieves is never mixed with what copies achieve.
"""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Counter", "Gauge", "Histogram", "Metrics"]

PREFIX = "onlinespec_"


def _value(v: float) -> str:
    """Exact in the exposition: ``:g`` would print 1234567 as 1.23457e+06."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


class Counter:
    def __init__(self, name: str, help_: str, label: str | None = None):
        self.name, self.help, self.label = PREFIX + name, help_, label
        self.values: dict[tuple, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, label: str | None = None, **labels) -> None:
        if label is not None:
            labels = {self.label: label}
        with self._lock:
            self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(dict(key))} {_value(value)}")
        return lines


class Gauge(Counter):
    def set(self, value: float, **labels) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] = value

    def render(self) -> list[str]:
        lines = super().render()
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = PREFIX + name, help_, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.sum += value
            self.count += 1
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for b, c in zip(self.buckets, self.counts):
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {c}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {_value(self.sum)}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        lat = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("requests_total", "Finished requests by finish reason.", label="finish_reason")
        self.cancelled = Counter("requests_cancelled_total", "Requests dropped because the client went away.")
        self.rejected = Counter("requests_rejected_total", "Requests refused (queue full, limits).", label="reason")
        self.request_errors = Counter("request_errors_total",
                                      "Requests that failed in the engine (invalid: found late; internal: a bug).",
                                      label="kind")
        self.loop_restarts = Counter("engine_loop_restarts_total",
                                     "Times the engine loop crashed outside any request and was restarted.")
        self.generated_tokens = Counter("generated_tokens_total", "Tokens generated.")
        self.latency = Histogram("request_latency_seconds", "Request latency, queueing included.", lat)
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token, queueing included.", lat)
        self.queue_depth = Gauge("queue_depth", "Requests waiting or running.")
        self.num_drafts = Counter("spec_decode_num_drafts_total", "Speculative steps (drafts verified).")
        self.num_draft_tokens = Counter("spec_decode_num_draft_tokens_total", "Draft tokens proposed.")
        self.num_accepted_tokens = Counter("spec_decode_num_accepted_tokens_total", "Draft tokens accepted.")
        self.accepted_per_pos = Counter("spec_decode_num_accepted_tokens_per_pos_total",
                                        "Draft tokens accepted at each block position.")
        self.copied_tokens = Counter("spec_decode_num_copied_tokens_total",
                                     "Draft tokens copied by suffix speculation (counted in draft tokens too).")
        self.copied_accepted_tokens = Counter("spec_decode_num_copied_accepted_tokens_total",
                                              "Copied draft tokens accepted (counted in accepted tokens too).")
        # the drafter models' own drafts, apart from copies (labels: drafter, version)
        self.own_blocks = Counter("spec_decode_num_own_drafts_total",
                                  "Speculative steps with at least one draft of the drafter model's own.")
        self.own_draft_tokens = Counter("spec_decode_num_own_draft_tokens_total",
                                        "Draft tokens the drafter model proposed itself (draft tokens - copied).")
        self.own_accepted_tokens = Counter("spec_decode_num_own_accepted_tokens_total",
                                           "Own draft tokens accepted (accepted tokens - copied accepted).")
        self.copy_blocks = Counter("spec_decode_num_copy_drafts_total",
                                   "Speculative steps with at least one copied draft.")
        self.predicted_tokens = Counter("spec_decode_num_predicted_tokens_total",
                                        "Copied draft tokens from requests' predicted outputs (counted in copied too).")
        self.predicted_accepted_tokens = Counter("spec_decode_num_predicted_accepted_tokens_total",
                                                 "Predicted draft tokens accepted (counted in copied accepted too).")
        self.routed = Counter("drafter_requests_total", "Requests by the drafter that drafted for them.")
        self.swaps = Counter("drafter_swaps_total", "Drafter versions swapped in.")
        self.engine_steps = Counter("engine_steps_total", "Engine steps (one target forward for every active row).")
        self.batch_rows = Histogram("engine_batch_rows", "Requests stepped together per engine step.",
                                    (1, 2, 4, 8, 16, 32, 64))
        self.batch_k = Counter("engine_step_draft_length_total",
                               "Engine steps by the batch's draft length (0: plain batched decoding).", label="k")
        self.step_seconds = Counter("engine_seconds_total",
                                    "Seconds the engine spent per phase of its steps (prefill: prompts and drafters "
                                    "encoding rows new to them; draft; verify: the target forward; settle: accepting "
                                    "and rewinding).", label="phase")
        self.step_seconds_k = Counter("engine_step_seconds_total",
                                      "Seconds of engine steps (prefill apart) by the batch's draft length.", label="k")
        self.step_tokens_k = Counter("engine_step_tokens_total",
                                     "Tokens settled in engine steps by the batch's draft length.", label="k")
        self.prefill_tokens = Counter("prefill_tokens_total", "Prompt tokens prefilled (in chunks between steps).")
        self.kv_cache_bytes = Gauge("kv_cache_bytes", "Memory held by the batch's key/value caches.")
        self.kv_cache_reserved = Gauge("kv_cache_reserved_tokens",
                                       "Key/value positions the batch's requests reserve (rows x the longest).")
        self.sampled: list[tuple[Counter, object]] = []  # (metric, callable -> {label tuple: value})
        self.expositions: list = []  # callables -> Prometheus text, appended as they are

    def expose(self, text) -> None:
        """Another exposition appended at each scrape (``text()`` -> Prometheus text): vLLM's own metrics."""
        self.expositions.append(text)

    def sample(self, metric: Counter, read) -> None:
        """A metric whose values are read from elsewhere (the writer, the watcher) at each scrape."""
        self.sampled.append((metric, read))

    def observe_step(self, drafter: str, version: int, drafted: int, accepted: int, copied: int = 0,
                     copied_accepted: int = 0, predicted: int = 0, predicted_accepted: int = 0) -> None:
        labels = {"drafter": drafter, "version": version}
        if predicted:  # a request's predicted output: copies of the client's, not the drafter's doing
            self.predicted_tokens.inc(predicted)
            self.predicted_accepted_tokens.inc(predicted_accepted)
        self.num_drafts.inc(**labels)
        self.num_draft_tokens.inc(drafted, **labels)
        self.num_accepted_tokens.inc(accepted, **labels)
        if copied:
            self.copied_tokens.inc(copied, **labels)
            self.copied_accepted_tokens.inc(copied_accepted, **labels)
            self.copy_blocks.inc(**labels)
        if drafted > copied:
            self.own_blocks.inc(**labels)
            self.own_draft_tokens.inc(drafted - copied, **labels)
            self.own_accepted_tokens.inc(accepted - copied_accepted, **labels)
        for pos in range(accepted):
            self.accepted_per_pos.inc(**labels, position=pos)

    def observe_batch(self, step, kv_bytes: int, reserved: int = 0) -> None:
        """An engine step (:class:`onlinespec.decode.batch.StepTiming`) and the cache memory after it."""
        if step.prefill_tokens:
            self.prefill_tokens.inc(step.prefill_tokens)
        if step.rows:
            self.engine_steps.inc()
            self.batch_rows.observe(step.rows)
            self.batch_k.inc(label=str(step.k))
            self.step_seconds_k.inc(step.decode_seconds, label=str(step.k))
            self.step_tokens_k.inc(step.tokens, label=str(step.k))
        for phase, seconds in step.phases.items():
            if seconds:
                self.step_seconds.inc(seconds, label=phase)
        self.kv_cache_bytes.set(kv_bytes)
        self.kv_cache_reserved.set(reserved)

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.cancelled, self.rejected, self.request_errors, self.loop_restarts,
                  self.generated_tokens, self.latency, self.ttft,
                  self.queue_depth, self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                  self.accepted_per_pos, self.copied_tokens, self.copied_accepted_tokens, self.copy_blocks,
                  self.predicted_tokens, self.predicted_accepted_tokens,
                  self.own_blocks, self.own_draft_tokens, self.own_accepted_tokens, self.routed, self.swaps,
                  self.engine_steps, self.batch_rows, self.batch_k, self.step_seconds, self.step_seconds_k,
                  self.step_tokens_k, self.prefill_tokens, self.kv_cache_bytes, self.kv_cache_reserved):
            lines += m.render()
        for metric, read in self.sampled:
            metric.values = dict(read())
            lines += metric.render()
        for text in self.expositions:
            try:
                lines += text().rstrip("\n").splitlines()
            except Exception:  # noqa: BLE001 - a scrape must not fail because a source did
                pass
        return "\n".join(lines) + "\n"
