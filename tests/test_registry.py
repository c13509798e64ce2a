"""Versioned checkpoints against a real Redis server."""

import json
import threading

import pytest
import torch

from onlinespec.feedback import keys
from onlinespec.learn.registry import CheckpointError, PublishConflict, Registry, expected_shapes
from tests.tiny import tiny_llama


@pytest.fixture()
def registry(tmp_path, redis_client):
    return Registry(tmp_path / "registry", redis_client, keep=3)


def test_publish_load_round_trip(registry):
    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    m1 = registry.publish("d", model, parent=None, watermark="1-0", metrics={"served_loss": 0.5},
                          learner_state=({"x": torch.ones(3)}, {"rounds": 1}))
    assert registry.latest("d") == m1.version == 1
    loaded, manifest = registry.load_model("d", 1, expected_shapes(model))
    assert manifest.watermark == "1-0" and manifest.parent is None
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    tensors, meta = registry.load_learner_state("d", 1)
    assert torch.equal(tensors["x"], torch.ones(3)) and meta == {"rounds": 1}
    events = registry.redis.xrange(keys.events_stream)
    assert events[-1][1][b"type"] == b"published" and events[-1][1][b"version"] == b"1"


def test_compare_and_set_lets_one_of_two_workers_advance(registry):
    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    registry.publish("d", model, parent=None)
    results = []

    def worker():
        try:
            results.append(registry.publish("d", model, parent=1).version)
        except PublishConflict:
            results.append("conflict")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results.count("conflict") == 3
    winner = next(r for r in results if r != "conflict")
    assert registry.latest("d") == winner
    assert registry.versions("d") == [1, winner]  # the losers left nothing behind
    with pytest.raises(PublishConflict):
        registry.publish("d", model, parent=1)


def test_corrupt_versions_are_refused(registry):
    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    registry.publish("d", model, parent=None)
    shapes = expected_shapes(model)
    path = registry.path("d", 1) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        registry.load_model("d", 1, shapes)
    # NaNs with a correct checksum (a learner that diverged) are refused too
    bad = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    with torch.no_grad():
        bad.model.norm.weight[0] = float("nan")
    registry.publish("d", bad, parent=1)
    with pytest.raises(CheckpointError, match="non-finite"):
        registry.load_model("d", 2, shapes)
    # a model of another shape is refused by name and shape
    other = tiny_llama(layers=1, hidden=64, heads=2, seed=1)
    registry.publish("d", other, parent=2)
    with pytest.raises(CheckpointError, match="shape"):
        registry.load_model("d", 3, shapes)


def test_gc_keeps_the_newest_and_the_latest(registry):
    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    parent = None
    for _ in range(5):
        parent = registry.publish("d", model, parent=parent).version
    assert registry.versions("d") == [3, 4, 5]
    registry.rollback("d", 3, reason="test")
    assert registry.latest("d") == 3
    assert json.loads(registry.manifest("d", 3).to_json())["version"] == 3
    registry.publish("d", model, parent=3)  # continues from the rolled-back version
    assert registry.latest("d") == 6 and registry.manifest("d", 6).parent == 3
    assert registry.versions("d") == [3, 5, 6]  # the parent is kept: v6 can still be rolled back
    registry.rollback("d", 3, reason="v6 hurt")
    assert registry.latest("d") == 3
    registry.rollback("d", 6, reason="back again")
    with pytest.raises(CheckpointError):
        registry.rollback("d", 1)  # collected: refused, the pointer stays
    assert registry.latest("d") == 6


def test_gc_keeps_the_ancestry_over_a_losing_workers_leftovers(registry):
    """A worker that lost the compare-and-set removes its directory after the winner may have
    collected: those directories must not push the winner's parent out."""
    import shutil

    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    registry.publish("d", model, parent=None)
    for loser in (2, 3):  # written, renamed, not yet removed after losing the race
        shutil.copytree(registry.path("d", 1), registry.path("d", loser))
    m = registry.publish("d", model, parent=1)
    assert m.version == 4 and registry.lineage("d", 4) == [4, 1]
    assert 1 in registry.versions("d") and len(registry.versions("d")) == 3


def test_versions_left_by_a_reset_redis_are_never_overwritten(registry, redis_client):
    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    registry.publish("d", model, parent=None)
    registry.publish("d", model, parent=1)
    redis_client.delete(keys.latest_key("d"), keys.version_counter("d"))  # Redis lost its state
    m = registry.publish("d", model, parent=None)
    assert m.version == 3 and registry.versions("d") == [1, 2, 3] and registry.latest("d") == 3
