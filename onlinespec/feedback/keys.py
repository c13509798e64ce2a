"""Redis key and stream names: the only shared state between processes."""

from __future__ import annotations

__all__ = [
    "feedback_stream", "dead_letter_stream", "learner_group", "events_stream", "latest_key",
    "version_counter", "learner_metrics_stream", "learner_latest", "learner_config", "paused_key",
    "inflight_key", "UPDATE_QUEUE", "TUNE_QUEUE", "pool_key", "drafters_set", "backoff_key", "health_key", "learned_key", "relearned_key",
    "spec_key", "serving_key", "pinned_key", "acceptance_key", "dead_letter_seen", "dead_letter_count", "written_key",
    "features_key",
]

UPDATE_QUEUE = "onlinespec-updates"
"""RQ queue of drafter update jobs."""

TUNE_QUEUE = "onlinespec-tuning"
"""RQ queue of tuning jobs (each runs trials of one study until it is done); workers take
update jobs first."""

events_stream = "onlinespec:events"
"""Published, refused, rolled-back versions: the serving processes XREAD it."""


def feedback_stream(target: str) -> str:
    """Feedback records of one target (all drafters), msgpack payloads under field ``r``."""
    return f"onlinespec:feedback:{target}"


def dead_letter_stream(target: str) -> str:
    """Feedback entries that failed validation, with the reason, kept aside for inspection."""
    return f"onlinespec:feedback:{target}:dead"


def learner_group(drafter: str) -> str:
    """One consumer group per drafter: every drafter learns from every record (full information)."""
    return f"learners:{drafter}"


def latest_key(drafter: str) -> str:
    """The version the drafter's learners continue from and the servers serve (compare-and-set)."""
    return f"onlinespec:drafter:{drafter}:latest"


def version_counter(drafter: str) -> str:
    return f"onlinespec:drafter:{drafter}:next"


def learner_metrics_stream(drafter: str) -> str:
    """One entry per learning round (JSON), for dashboards and ``watch``."""
    return f"onlinespec:learner:{drafter}"


def learner_latest(drafter: str) -> str:
    """Hash: the latest round's metrics (JSON under ``metrics``)."""
    return f"onlinespec:learner:{drafter}:latest"


def learner_config(drafter: str) -> str:
    """Live learner hyperparameters (JSON), applied from the next round."""
    return f"onlinespec:learner:{drafter}:config"


def paused_key(drafter: str) -> str:
    return f"onlinespec:learner:{drafter}:paused"


def inflight_key(drafter: str) -> str:
    """Set (NX, with expiry) while an update job for the drafter is queued or running."""
    return f"onlinespec:learner:{drafter}:inflight"


def pool_key(target: str) -> str:
    """Hash: Hedge weights over the drafter pool of a target and the drafter chosen to serve."""
    return f"onlinespec:pool:{target}"


def drafters_set(target: str) -> str:
    """Set of the drafter ids that learn from a target's feedback (registered at bootstrap)."""
    return f"onlinespec:drafters:{target}"


def backoff_key(drafter: str) -> str:
    """Set (with expiry) after a failed round: the trigger waits until it expires (retry backoff)."""
    return f"onlinespec:learner:{drafter}:backoff"


def health_key(drafter: str) -> str:
    """Hash: rounds, failed_rounds, consecutive_failures, last_error, redelivered_skipped."""
    return f"onlinespec:learner:{drafter}:health"


def learned_key(drafter: str) -> str:
    """Sorted set: feedback entry ids a published version learned (score: that version). Written
    atomically with the latest pointer, so a redelivered entry is acknowledged, not learned twice."""
    return f"onlinespec:drafter:{drafter}:learned"


def relearned_key(drafter: str) -> str:
    """Counter: entries a published version learned that an earlier version had learned already
    (a detector for double learning: it stays 0 unless redelivery protection failed)."""
    return f"onlinespec:drafter:{drafter}:relearned"


def spec_key(drafter: str) -> str:
    """JSON: the architecture and parameter shapes every version of the drafter must have."""
    return f"onlinespec:drafter:{drafter}:spec"


def serving_key(drafter: str) -> str:
    """Hash: serving replica -> JSON {version, until}; versions served are never collected."""
    return f"onlinespec:drafter:{drafter}:serving"


def pinned_key(drafter: str) -> str:
    """The version an operator pinned (never collected while pinned)."""
    return f"onlinespec:drafter:{drafter}:pinned"


def dead_letter_seen(target: str, entry_id: str) -> str:
    """Set once (with expiry) by the first reader that puts an entry aside: one dead letter per entry."""
    return f"onlinespec:feedback:{target}:dead:{entry_id}"


def dead_letter_count(target: str) -> str:
    """Counter of feedback entries put aside (invalid, or failing every round)."""
    return f"onlinespec:feedback:{target}:dead-count"


def written_key(target: str, request_id: str) -> str:
    """Set (with expiry) with each record's XADD, in one script: a retried batch adds nothing twice."""
    return f"onlinespec:feedback:{target}:written:{request_id}"


def features_key(target: str, request_id: str) -> str:
    """The target's features of a captured request (:func:`onlinespec.feedback.codec.encode_features`),
    beside its record, with an expiry: what a feature drafter's learners read."""
    return f"onlinespec:feedback:{target}:features:{request_id}"


def acceptance_key(drafter: str, version: int) -> str:
    """Hash {drafted, accepted}: the drafter model's own drafts of one version, summed over every
    serving replica: what the rollback guard judges a version by (one decision per drafter)."""
    return f"onlinespec:drafter:{drafter}:acceptance:v{version}"
