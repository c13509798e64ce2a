"""Tuning the learners: exports, the search space, Optuna studies that resume and run on RQ
workers, the baseline and the held-out check, and applying the winner to a live server."""

import copy
import json
import os
import subprocess
import sys

import httpx
import msgpack
import pytest
import torch
import yaml

from onlinespec.feedback import keys
from onlinespec.cli import main
from onlinespec.feedback.codec import encode
from onlinespec.drafters.hf import HFDrafter
from onlinespec.decode.engine import EngineConfig, SpeculativeEngine
from onlinespec.decode.sampling import SamplingParams
from onlinespec.learn.tune import SearchSpace, TuningStudy, export_stream, import_stream, read_file
from onlinespec.learn.tune.space import known_names
from tests.services import TOKEN
from tests.tiny import tiny_llama, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A drafter saved as a model directory, 48 feedback records of a tiny target, and a base
    learner YAML that learns (lm_head, lr 0.05)."""
    root = tmp_path_factory.mktemp("tune")
    target = tiny_llama(layers=2, hidden=48, heads=4, seed=7)
    drafter = copy.deepcopy(target)
    torch.manual_seed(3)
    with torch.no_grad():
        drafter.lm_head.weight.add_(torch.randn_like(drafter.lm_head.weight) * 1.5 * drafter.lm_head.weight.std())
    drafter.save_pretrained(root / "drafter")
    tiny_tokenizer().save_pretrained(root / "drafter")
    engine = SpeculativeEngine(target, HFDrafter(drafter, "d"), config=EngineConfig(k=4, feedback_topk=16))
    g = torch.Generator().manual_seed(0)
    records = [engine.generate(torch.randint(1, 16, (6,), generator=g).tolist(),
                               SamplingParams(max_new_tokens=24, temperature=1.0, seed=i, ignore_eos=True)).record
               for i in range(48)]
    feedback = root / "feedback.msgpack"
    with open(feedback, "wb") as f:
        f.write(msgpack.packb({"format": "onlinespec-feedback", "version": 1, "target": "t"}))
        for r in records:
            f.write(msgpack.packb(encode(r), use_bin_type=True))
    (root / "base.yaml").write_text("optim: {lr: 0.05, adaptive: true}\ntrainable: lm_head\n")
    return root, records


def _space(tmp_path, values, sampler="grid", trials=None, **extra):
    """A space over the step size alone (round size: the baseline's)."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"sampler": sampler, "trials": trials or len(values), "holdout": 0.25,
                                    "space": {"optim.lr": values}, **extra}))
    return path


def _create(root, tmp_path, values, **kw) -> TuningStudy:
    from onlinespec.learn.learner import LearnerConfig
    from onlinespec.models import load_model

    space = SearchSpace.from_yaml(_space(tmp_path, values, **kw))
    return TuningStudy.create(tmp_path / "study", root / "feedback.msgpack", space, load_model(str(root / "drafter")),
                              "test drafter", LearnerConfig.from_yaml(root / "base.yaml"), 8, "base.yaml", k=4)


def _cli(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_export_import_round_trip_skips_bad_payloads(logged, redis_client, tmp_path):
    _, records = logged
    for r in records[:10]:
        redis_client.xadd(keys.feedback_stream("a"), {"r": encode(r)})
    redis_client.xadd(keys.feedback_stream("a"), {"r": b"\x81garbage"})
    path = tmp_path / "feedback.msgpack"
    assert export_stream(redis_client, "a", path) == 11
    again, skipped = read_file(path)
    assert len(again) == 10 and skipped == 1
    assert [r.request_id for r in again] == [r.request_id for r in records[:10]]
    assert import_stream(redis_client, "b", path) == 11
    assert redis_client.xlen(keys.feedback_stream("b")) == 11
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"not a feedback file")
    with pytest.raises(ValueError):
        read_file(bad)


def test_space_errors_name_the_key_and_list_the_known_ones(tmp_path):
    shipped = SearchSpace.from_yaml(os.path.join(ROOT, "configs", "tune.yaml"))
    assert shipped.sampler == "tpe" and shipped.base and os.path.isfile(shipped.base)
    with pytest.raises(ValueError, match="unknown name optim.lrr; known: .*optim.lr"):
        SearchSpace.from_dict({"space": {"optim.lrr": [0.1]}})
    with pytest.raises(ValueError, match="optim.hint='psychic'"):
        SearchSpace.from_dict({"space": {"optim.hint": ["psychic"]}})
    with pytest.raises(ValueError, match="unknown key trails"):
        SearchSpace.from_dict({"trails": 3, "space": {"optim.lr": [0.1]}})
    with pytest.raises(ValueError, match="a grid takes lists"):
        SearchSpace.from_dict({"sampler": "grid", "space": {"optim.lr": {"low": 0.001, "high": 0.1}}})
    with pytest.raises(ValueError, match="no such file"):
        SearchSpace.from_yaml(tmp_path / "missing.yaml")
    assert "round_records" in known_names() and "optim.lr" in known_names()


def test_a_zero_step_size_ranks_below_the_baseline_and_the_input_survives(logged, tmp_path, capsys, monkeypatch):
    """Trial 0 is the baseline (lr 0.05 from --base); a zero step size learns nothing and ranks
    below it beyond the noise; the same lr as the baseline ties it exactly."""
    root, _ = logged
    feedback = tmp_path / "feedback.msgpack"
    feedback.write_bytes((root / "feedback.msgpack").read_bytes())
    before = feedback.read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ONLINESPEC_STUDIES", raising=False)
    code, out, err = _cli(["tune", "run", "--file", "feedback.msgpack", "--space", str(_space(tmp_path, [0.0, 0.05])),
                           "--drafter", str(root / "drafter"), "--base", str(root / "base.yaml"), "--offline",
                           "--study", "zero", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    ranking = {(-1 if r["baseline"] else r["settings"]["optim.lr"]): r for r in result["ranking"]}
    assert set(ranking) == {-1, 0.0, 0.05}
    base, zero, same = ranking[-1], ranking[0.0], ranking[0.05]
    assert base["number"] == 0 and result["ranking"][-1]["settings"] == {"optim.lr": 0.0}
    assert zero["loss"] > base["loss"] and zero["diff_low"] > 0 and not zero["beats_baseline"]
    assert same["diff"] == pytest.approx(0.0, abs=1e-9)
    assert zero["predicted_accepted_length"] < base["predicted_accepted_length"]
    held = result["heldout"]
    assert held["records"] == 12 and held["winner_loss"] > 0
    study_dir = tmp_path / ".onlinespec" / "studies" / "zero"
    for name in ("study.json", "journal.log", "feedback.msgpack", "best.yaml", "history.png", "params.png"):
        assert (study_dir / name).is_file(), name
    assert yaml.safe_load((study_dir / "best.yaml").read_text())["optim"]["lr"] == 0.05
    assert feedback.read_bytes() == before  # every output went to the study directory
    code, out, _ = _cli(["tune", "show", "zero"], capsys)
    assert code == 0 and "baseline" in out and "lr=0" in out and "held out" in out


def test_a_study_resumes_after_an_interruption_with_its_finished_trials(logged, tmp_path, capsys):
    root, _ = logged
    study = _create(root, tmp_path, [0.0, 0.01, 0.05])

    def interrupt(number, done, rounds, seconds):
        if number == 2 and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(interrupt)
    first = {t.number: (t.state.name, t.value) for t in study.optuna().get_trials()}
    assert first[0][0] == first[1][0] == "COMPLETE" and first[2][0] == "FAIL"
    code, out, err = _cli(["tune", "run", "--study", str(study.dir), "--json"], capsys)
    assert code == 0, err
    after = {t.number: (t.state.name, t.value) for t in study.optuna().get_trials()}
    assert after[0] == first[0] and after[1] == first[1]  # kept, not rerun
    complete = [t for t in study.optuna().get_trials() if t.state.name == "COMPLETE"]
    assert len(complete) == study.total == 4
    lrs = sorted(t.params["optim.lr"] for t in complete if t.params)
    assert lrs == [0.0, 0.01, 0.05]


def test_a_repeated_point_reuses_the_trial_that_ran_it(logged, tmp_path):
    """TPE and random search may draw a finished point again: it is not replayed a second time
    (the replay is deterministic), and the table says whose figures it shows."""
    root, _ = logged
    study = _create(root, tmp_path, [0.02], sampler="random", trials=3)
    replays = []
    study.optimize(lambda number, done, rounds, seconds: replays.append(number))
    rows = {r.number: r for r in study.rows()}
    assert sorted(rows) == [0, 1, 2, 3]
    assert set(replays) == {0, 1}  # the baseline and the first trial at lr 0.02 ran; 2 and 3 did not
    assert rows[1].repeat_of is None and rows[2].repeat_of == rows[3].repeat_of == 1
    assert rows[2].loss == rows[3].loss == rows[1].loss and rows[2].seconds == 0.0
    assert rows[1].loss != rows[0].loss  # a real replay, not the baseline's figures


def test_two_rq_workers_run_one_study_without_duplicates(logged, tmp_path, redis_url, redis_client, capsys):
    root, _ = logged
    study = _create(root, tmp_path, [0.0, 0.005, 0.01, 0.02, 0.05, 0.1])
    code, _, err = _cli(["tune", "run", "--study", str(study.dir), "--workers", "2", "--no-wait",
                         "--redis-url", redis_url], capsys)
    assert code == 0, err
    assert redis_client.llen(f"rq:queue:{keys.TUNE_QUEUE}") == 2
    env = {**os.environ, "PYTHONPATH": ROOT}
    workers = [subprocess.Popen([sys.executable, "-m", "workers", "--redis-url", redis_url, "--burst", "--no-trigger",
                                 "--nice", "0", "--registry", str(tmp_path / "registry"), "--log-level", "WARNING"],
                                cwd=ROOT, env=env) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=600) == 0
    trials = study.optuna().get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == study.total == 7
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    numbers = [t.number for t in complete]
    assert len(set(numbers)) == len(numbers)
    lrs = [t.params["optim.lr"] for t in complete if t.params]
    assert sorted(lrs) == [0.0, 0.005, 0.01, 0.02, 0.05, 0.1]  # every grid point once
    assert sum(1 for t in complete if t.user_attrs.get("baseline")) == 1


def test_tune_on_a_live_service_then_apply_with_the_token_checked_first(service, redis_client, tmp_path, capsys,
                                                                         monkeypatch):
    """Export from a live service's stream, tune from the live drafter and its live settings,
    then apply: a missing or wrong token is refused before the study is even read."""
    srv, cfg, tmp = service
    for i in range(24):
        r = httpx.post(srv.url + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer u{i}"},
                       json={"model": "tiny", "prompt": f"tune {i} abc", "max_tokens": 24, "temperature": 1.0,
                             "seed": i})
        assert r.status_code == 200, r.text
    srv.state.loop.writer.flush()
    feedback = tmp_path / "live.msgpack"
    code, out, err = _cli(["tune", "export", "--config", cfg.source, "--out", str(feedback)], capsys)
    assert code == 0 and "exported" in out, err
    assert _cli(["tune", "export", "--config", cfg.source, "--out", str(feedback)], capsys)[0] == 2  # never overwrites
    study = tmp_path / "live-study"
    code, out, err = _cli(["tune", "run", "--config", cfg.source, "--file", str(feedback), "--study", str(study),
                           "--space", str(_space(tmp_path, [0.0, 0.2])), "--drafter-id", "d1", "--json"], capsys)
    assert code == 0, err
    meta = json.loads((study / "study.json").read_text())
    assert meta["drafter"]["from"].startswith("live d1 v1 (registry ")  # the live version, through the registry
    assert meta["baseline"] == {"config": json.loads(redis_client.get(keys.learner_config("d1"))),
                                "round_records": 16, "from": "live learner settings of d1"}
    assert json.loads(out.strip().splitlines()[-1])["ranking"]
    monkeypatch.setenv("ONLINESPEC_STUDIES", str(tmp_path))  # the dashboard lists the study and serves its plots
    listed = httpx.get(srv.url + "/dashboard/studies", timeout=30).json()["studies"]
    assert [s["name"] for s in listed] == ["live-study"] and listed[0]["counts"]["complete"] == listed[0]["total"] == 3
    assert listed[0]["best"] and listed[0]["plots"] == ["history", "params"]
    png = httpx.get(srv.url + "/dashboard/studies/live-study/history.png", timeout=30)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert httpx.get(srv.url + "/dashboard/studies/live-study/secret.png", timeout=30).status_code == 404
    assert httpx.get(srv.url + "/dashboard/studies/..%2F..%2Fetc/history.png", timeout=30).status_code == 404

    monkeypatch.delenv("ONLINESPEC_ADMIN_TOKEN", raising=False)
    code, _, err = _cli(["tune", "apply", "no-such-study", "--url", srv.url, "--drafter-id", "d1"], capsys)
    assert code == 2 and "admin token" in err
    code, _, err = _cli(["tune", "apply", "no-such-study", "--url", srv.url, "--drafter-id", "d1", "--token", "wrong"],
                        capsys)
    assert code == 2 and "refused the admin token" in err  # not "no tuning study": the token came first
    best = tmp_path / "mine.yaml"
    best.write_text("optim: {lr: 0.123, adaptive: true}\ntrainable: lm_head\nsteps_per_round: 2\n")
    code, out, err = _cli(["tune", "apply", str(best), "--url", srv.url, "--drafter-id", "d1", "--token", TOKEN], capsys)
    assert code == 0, err
    stored = json.loads(redis_client.get(keys.learner_config("d1")))
    assert stored["optim"]["lr"] == 0.123 and stored["steps_per_round"] == 2
    code, out, err = _cli(["tune", "apply", str(study), "--url", srv.url, "--drafter-id", "d1", "--token", TOKEN], capsys)
    assert code == 0, err
    winner = yaml.safe_load((study / "best.yaml").read_text())
    assert json.loads(redis_client.get(keys.learner_config("d1")))["optim"]["lr"] == winner["optim"]["lr"]
    assert "round_records=16: unchanged" in out  # a worker setting: said, not silently dropped


def test_a_feature_drafter_is_refused_with_what_to_use_instead(logged, tmp_path, capsys, monkeypatch):
    """Exported feedback carries no target features, which a feature drafter learns from: tuning
    one on it would learn nothing and rank noise; the refusal says what compares its settings."""
    from onlinespec.drafters.feature import feature_from

    root, _ = logged
    target = tiny_llama(layers=2, hidden=48, heads=4, seed=7)
    target.save_pretrained(tmp_path / "target")
    feature_from(target, str(tmp_path / "target"), list(range(64))).save_pretrained(tmp_path / "f")
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["tune", "run", "--file", str(root / "feedback.msgpack"), "--drafter", str(tmp_path / "f"),
                           "--offline", "--study", "feat"], capsys)
    assert code == 2 and "feature drafter" in err and "bench adapt --config" in err, err
    assert not (tmp_path / ".onlinespec" / "studies" / "feat").exists()
