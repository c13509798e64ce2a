"""Redis key and stream names: the only shared state between processes."""

from __future__ import annotations

__all__ = [
    "feedback_stream", "dead_letter_stream", "learner_group", "events_stream", "latest_key",
    "version_counter", "learner_metrics_stream", "learner_latest", "learner_config", "paused_key",
    "inflight_key", "UPDATE_QUEUE", "pool_key", "drafters_set",
]

UPDATE_QUEUE = "onlinespec-updates"
"""RQ queue of drafter update jobs."""

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
