"""The control plane: one module owns a drafter's transitions, used alike by the admin API, the
trigger and the CLI (the same keys, the same rules)."""

import json

import pytest

from onlinespec.feedback import keys
from onlinespec.cli import main
from onlinespec.learn.control import Control
from onlinespec.learn.registry import CheckpointError, Registry
from tests.tiny import tiny_llama


@pytest.fixture()
def registry(tmp_path, redis_client):
    reg = Registry(tmp_path / "registry", redis_client)
    model = tiny_llama(layers=1, hidden=32, heads=2, seed=1)
    reg.set_spec("d", model)
    for version in (1, 2, 3):
        reg.publish("d", model, parent=version - 1 if version > 1 else None, metrics={})
    return reg


def test_transitions_and_the_state_they_leave(registry, redis_client):
    control = Control(redis_client, registry, target="t")
    assert control.state("d").to_dict() == {"drafter": "d", "latest": 3, "paused": False, "pinned": None,
                                            "backoff": False, "inflight": None, "learning": True}
    assert control.pause("d").learning is False and not control.may_learn("d")
    assert control.resume("d").learning is True
    state = control.pin("d", 2)
    assert (state.latest, state.paused, state.pinned) == (2, True, 2) and 2 in registry.protected("d")
    state = control.resume("d")
    assert (state.paused, state.pinned) == (False, None)
    assert control.rollback("d", 1).latest == 1
    with pytest.raises(CheckpointError):
        control.rollback("d", 9)  # not kept: refused, the pointer stays
    assert control.state("d").latest == 1
    redis_client.set(keys.backoff_key("d"), 1, ex=30)
    assert control.state("d").backoff and not control.may_learn("d")
    redis_client.delete(keys.backoff_key("d"))
    job = control.enqueue_round("d")
    assert job and control.state("d").inflight == job
    assert control.enqueue_round("d") is None  # one queued or running per drafter
    assert redis_client.llen(f"rq:queue:{keys.UPDATE_QUEUE}") == 1


def test_the_cli_drives_the_same_control(registry, redis_client, redis_url, tmp_path, capsys):
    config = tmp_path / "service.yaml"
    config.write_text(f"target: {{id: t, model: demo:target}}\ndrafters: [{{id: d, model: demo:drafter-1l}}]\n"
                      f"registry: {registry.root}\n")

    def cli(*argv):
        with pytest.raises(SystemExit) as done:
            main(["drafter", *argv, "--config", str(config), "--redis-url", redis_url])
        return done.value.code, capsys.readouterr()

    code, out = cli("pause", "d")
    assert code == 0 and json.loads(out.out)["paused"] is True and redis_client.exists(keys.paused_key("d"))
    code, out = cli("pin", "d", "--version", "2")
    assert code == 0 and json.loads(out.out)["pinned"] == 2
    code, out = cli("list")
    assert code == 0 and "latest v2" in out.out and "pinned v2" in out.out
    code, out = cli("rollback", "d")
    assert code == 2 and "--version" in out.err
    code, out = cli("pause", "nope")
    assert code == 2 and "unknown drafter 'nope'" in out.err
    code, out = cli("rollback", "d", "--version", "7")
    assert code == 1 and "v7" in out.err
    code, out = cli("resume", "d")
    assert code == 0 and json.loads(out.out)["learning"] is True
