"""A service of tiny models saved as Hugging Face directories, for tests that run the real
server process or its pieces (the `service` fixture in conftest.py builds one)."""

import copy

import torch

from tests.tiny import tiny_llama, tiny_tokenizer

TOKEN = "s3cret"


def write_service(tmp_path, extra: str = "") -> str:
    """Tiny target and two drafters saved as Hugging Face directories, and a service YAML."""
    target = tiny_llama(layers=2, hidden=48, heads=4, seed=7)
    drafter = copy.deepcopy(target)
    torch.manual_seed(3)
    with torch.no_grad():
        drafter.lm_head.weight.add_(torch.randn_like(drafter.lm_head.weight) * 1.5 * drafter.lm_head.weight.std())
    tok = tiny_tokenizer()
    for name, model in (("target", target), ("d1", drafter), ("d2", tiny_llama(layers=1, hidden=32, heads=2, seed=9))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    learner = tmp_path / "learner.yaml"
    learner.write_text("optim: {lr: 0.05, adaptive: true, hint: last}\ntrainable: lm_head\n")
    config = tmp_path / "service.yaml"
    config.write_text(f"""
target: {{id: tiny, model: {tmp_path / 'target'}}}
drafters:
  - {{id: d1, model: {tmp_path / 'd1'}}}
  - {{id: d2, model: {tmp_path / 'd2'}, learner: {{regret_window: 7, optim: {{eps: 1.0e-6}}}}}}
serving: {{k: 4, max_tokens: 64, admin_token: {TOKEN}, threads: 1}}
registry: {tmp_path / 'registry'}
learner: {learner}
{extra}""")
    return str(config)


def pause_admission(loop, monkeypatch):
    """The engine loop admits no waiting request until the returned ``resume()`` (or the test's
    end, when ``monkeypatch`` undoes it). Returns once the loop has called the paused admission, so
    that a request sent next cannot be taken by an admission already under way (it waits up to
    0.05 s for one)."""
    import threading
    import time

    admit = loop._admit
    paused = threading.Event()

    def admit_nothing():
        paused.set()
        time.sleep(0.01)

    monkeypatch.setattr(loop, "_admit", admit_nothing)
    assert paused.wait(10), "the engine loop never came back to admit"
    return lambda: monkeypatch.setattr(loop, "_admit", admit)


def slow_steps(loop, monkeypatch, seconds: float) -> None:
    """Each step of the engine loop's batch takes ``seconds`` longer (until the test's end), so
    that a request is still being served when a test acts on it, however fast the machine."""
    import time

    step = loop.batch.step

    def slowed():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(loop.batch, "step", slowed)
