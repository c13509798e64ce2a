"""One typed configuration: every default in one place, wrong keys and types refused by name,
environment overrides with their source, and the workers reading the file the server reads."""

import json

import pytest

from onlinespec.cli import main
from onlinespec.config import DEFAULT_REGISTRY, ServingConfig, WorkersConfig, load_config
from onlinespec.decode.suffix import SuffixConfig

MINIMAL = "target: {id: t, model: demo:target}\ndrafters: [{id: d, model: demo:drafter-1l}]\n"


def _write(tmp_path, text: str):
    path = tmp_path / "service.yaml"
    path.write_text(text)
    return path


def test_a_minimal_file_gets_every_default_from_one_place(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), environ={})
    assert cfg.serving == ServingConfig() and cfg.workers == WorkersConfig()
    assert cfg.serving.suffix == SuffixConfig() and cfg.registry == DEFAULT_REGISTRY
    assert cfg.redis_url is None and cfg.stream_maxlen == 100_000 and cfg.learner is None
    rows = {k: src for k, _, src in cfg.effective()}
    assert rows["serving.k_max"] == rows["workers.round_records"] == rows["registry"] == "default"
    assert rows["target.id"] == str(tmp_path / "service.yaml")


def test_wrong_types_and_keys_are_refused_by_name(tmp_path):
    for body, message in (("serving: {k_max: eight}", "serving.k_max: expected int, got 'eight'"),
                          ("serving: {rollback: 1}", "serving.rollback: expected bool"),
                          ("workers: {period: fast}", "workers.period: expected float"),
                          ("serving: {suffix: {max_nn: 3}}", "unknown key serving.suffix.max_nn"),
                          ("serving: {suffix: {scope: everyone}}", "scope must be"),
                          ("serving: [1, 2]", "serving must be a mapping"),
                          ("redis: {urll: x}", "unknown key redis.urll")):
        with pytest.raises(ValueError, match=message):
            load_config(_write(tmp_path, MINIMAL + body + "\n"), environ={})
    assert load_config(_write(tmp_path, MINIMAL + "serving: {explore: 0}\n"), environ={}).serving.explore == 0.0
    from onlinespec.learn.learner import drafter_learner_configs

    for learner, message in (("{learn_from: sometimes}", "drafters\\[d\\].learner: learn_from must be"),
                             ("{optim: {lrr: 1}}", "drafters\\[d\\].learner: .*lrr"),
                             ("{stepz: 2}", "unknown learner settings: \\['stepz'\\]"), ("[1]", "a mapping")):
        with pytest.raises(ValueError, match=message):  # the learners' settings are checked by the learners' module
            drafter_learner_configs(load_config(_write(tmp_path, f"target: {{id: t, model: demo:target}}\n"
                                    f"drafters: [{{id: d, model: demo:drafter-1l, learner: {learner}}}]\n"), environ={}))


def test_a_drafter_s_own_learner_settings_go_over_the_learner_file(tmp_path):
    learner = tmp_path / "learner.yaml"
    learner.write_text("optim: {lr: 0.01, hint: last}\nsteps_per_round: 4\n")
    cfg = load_config(_write(tmp_path, f"""target: {{id: t, model: demo:target}}
drafters:
  - {{id: a, model: demo:drafter-1l}}
  - {{id: b, model: demo:drafter-1l, learner: {{learn_from: served, optim: {{lr: 0.002}}}}}}
learner: {learner}
"""), environ={})
    from onlinespec.learn.learner import drafter_learner_configs

    configs = drafter_learner_configs(cfg)
    a, b = configs["a"], configs["b"]
    assert (a.learn_from, a.optim.lr, a.optim.hint, a.steps_per_round) == ("all", 0.01, "last", 4)
    assert (b.learn_from, b.optim.lr, b.optim.hint, b.steps_per_round) == ("served", 0.002, "last", 4)
    rows = {k: v for k, v, _ in cfg.effective()}
    assert "learn_from" in rows["drafters[1]"] and "learner" not in rows["drafters[0]"]


def test_a_bad_drafter_learner_setting_stops_config_show_and_the_worker_by_name(tmp_path, capsys):
    from workers.__main__ import parse_args

    path = _write(tmp_path, "target: {id: t, model: demo:target}\n"
                            "drafters: [{id: d, model: demo:drafter-1l, learner: {learn_from: sometimes}}]\n")
    for run in (lambda: main(["config", "show", "--config", str(path)]), lambda: parse_args(["--config", str(path)])):
        with pytest.raises(SystemExit) as done:
            run()
        assert done.value.code == 2 and "drafters[d].learner: learn_from must be" in capsys.readouterr().err


def test_environment_overrides_win_and_say_so(tmp_path):
    path = _write(tmp_path, MINIMAL + "serving: {k_max: 6, port: 9000}\nworkers: {round_records: 8}\n")
    env = {"ONLINESPEC_SERVING__K_MAX": "4", "ONLINESPEC_SERVING__SUFFIX__SCOPE": "shared", "ONLINESPEC_PORT": "9100",
           "ONLINESPEC_ADMIN_TOKEN": "12345", "ONLINESPEC_API_KEYS": "a, b", "REDIS_URL": "redis://:pw@h:1/0",
           "ONLINESPEC_ROUND_RECORDS": "32", "ONLINESPEC_SERVING__K": "null"}
    cfg = load_config(path, environ=env)
    assert cfg.serving.k_max == 4 and cfg.serving.suffix.scope == "shared" and cfg.serving.port == 9100
    assert cfg.admin_token == "12345" and cfg.api_keys == ("a", "b") and cfg.redis_url == "redis://:pw@h:1/0"
    assert cfg.workers.round_records == 32 and cfg.serving.k is None
    src = {k: s for k, _, s in cfg.effective()}
    assert src["serving.k_max"] == "env ONLINESPEC_SERVING__K_MAX" and src["serving.port"] == "env ONLINESPEC_PORT"
    assert src["workers.round_records"] == "env ONLINESPEC_ROUND_RECORDS" and src["serving.max_queue"] == "default"
    with pytest.raises(ValueError, match="ONLINESPEC_SERVNG__K: no section 'servng'"):
        load_config(path, environ={"ONLINESPEC_SERVNG__K": "2"})
    with pytest.raises(ValueError, match="unknown key serving.kmax"):
        load_config(path, environ={"ONLINESPEC_SERVING__KMAX": "2"})
    with pytest.raises(ValueError, match="serving.k_max: expected int"):
        load_config(path, environ={"ONLINESPEC_SERVING__K_MAX": "many"})


def test_config_show_prints_sources_and_hides_secrets(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path, MINIMAL + "serving: {admin_token: hunter2}\nredis: {url: 'redis://:pw@h:1/0'}\n")
    monkeypatch.setenv("ONLINESPEC_WORKERS__NICE", "0")
    with pytest.raises(SystemExit) as done:
        main(["config", "show", "--config", str(path), "--json"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and ":pw@" not in out
    settings = json.loads(out)["settings"]
    assert settings["serving.admin_token"] == {"value": "***", "source": str(path)}
    assert settings["workers.nice"] == {"value": 0, "source": "env ONLINESPEC_WORKERS__NICE"}
    assert settings["serving.k_max"] == {"value": 8, "source": "default"}


def test_the_worker_reads_the_service_config_the_server_reads(tmp_path, monkeypatch):
    from workers.__main__ import parse_args

    learner = tmp_path / "learner.yaml"
    learner.write_text("optim: {lr: 0.01}\n")
    path = _write(tmp_path, MINIMAL + f"registry: {tmp_path / 'reg'}\nlearner: {learner}\n"
                                      "workers: {round_records: 8, period: 3, nice: 0, threads: 2}\n")
    for name in ("ONLINESPEC_CONFIG", "REDIS_URL", "ONLINESPEC_REGISTRY", "ONLINESPEC_ROUND_RECORDS"):
        monkeypatch.delenv(name, raising=False)
    args = parse_args(["--config", str(path)])
    cfg = load_config(path)
    assert (args.target, args.registry, args.learner_config) == ("t", cfg.registry, str(learner))
    assert (args.round_records, args.period, args.nice, args.threads) == (8, 3.0, 0, 2)
    assert args.drafter_configs == {}
    args = parse_args(["--config", str(path), "--round-records", "4", "--nice", "5"])  # flags win
    assert (args.round_records, args.nice) == (4, 5)
    own = tmp_path / "own.yaml"
    own.write_text(MINIMAL.replace("model: demo:drafter-1l}", "model: demo:drafter-1l, learner: {learn_from: served}}")
                   + f"learner: {learner}\n")
    other = tmp_path / "other.yaml"
    other.write_text("optim: {lr: 0.03}\n")
    config = parse_args(["--config", str(own), "--learner-config", str(other)]).drafter_configs["d"]
    assert (config.learn_from, config.optim.lr) == ("served", 0.03)  # the drafter's own over the flag's file
    monkeypatch.setenv("ONLINESPEC_CONFIG", str(path))  # as docker-compose gives it
    monkeypatch.setenv("ONLINESPEC_REGISTRY", "/data/registry")
    args = parse_args([])
    assert args.registry == "/data/registry" and args.target == "t"
