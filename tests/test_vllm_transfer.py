"""The ``onlinespec`` weight transfer backend, without vLLM: what vLLM's ``update_weights`` does
with an update (:meth:`DrafterModules.load_version`), and what the server does when vLLM refuses
one. ``tests/test_vllm_backend.py`` drives the same path through a running vLLM."""

import hashlib
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from onlinespec.cpu_linear import plain_linears
from onlinespec.drafters.hf import HFDrafter
from onlinespec.errors import CheckpointError
from onlinespec.learn.registry import Registry
from onlinespec.vllm_backend.engine import engine_args
from onlinespec.vllm_backend.transfer import BACKEND, DrafterModules, UpdateInfo
from serving.hotswap import SwapWatcher
from tests.tiny import perturbed, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
V = 64


@pytest.fixture()
def setup(tmp_path, redis_client):
    target = tiny_llama(layers=2, hidden=48, heads=4, vocab=V, seed=7)
    registry = Registry(tmp_path / "registry", redis_client)
    base = perturbed(target, 0.5, seed=3)
    registry.bootstrap("a", base)
    served = HFDrafter(registry.load_model("a", 1)[0], "a", version=1)
    better = perturbed(target, 0.1, seed=4)
    v2 = registry.publish("a", better, parent=1).version
    return registry, served, better, v2


def update(registry, drafter, version) -> UpdateInfo:
    manifest = registry.manifest(drafter, version)
    return UpdateInfo(drafter, version, str(registry.path(drafter, version) / "model.safetensors"),
                      manifest.files["model.safetensors"])


def logits(model, tokens=(1, 5, 9, 3)):
    # a served drafter's linears are swapped (onlinespec.cpu_linear): compare the same products
    with torch.no_grad(), plain_linears():
        return model(torch.tensor([list(tokens)])).logits


def test_an_update_copies_the_checked_version_into_the_served_module_in_place(setup):
    registry, served, better, v2 = setup
    module = served.model
    drafters = DrafterModules({"a": served})
    assert dict(drafters.named_parameters()).keys() == {f"models.a.{n}" for n, _ in module.named_parameters()}
    info = update(registry, "a", v2)
    drafters.load_version(**info.to_dict(), root=str(registry.root))
    assert served.model is module and served.version == v2 and drafters.updates == 1
    torch.testing.assert_close(logits(served.model), logits(better), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fault", ["checksum", "corrupt", "shapes", "nan", "outside", "unknown", "version"])
def test_an_update_that_fails_a_check_leaves_the_serving_weights_and_version(setup, tmp_path, fault):
    registry, served, _, v2 = setup
    before = logits(served.model)
    drafters = DrafterModules({"a": served})
    info = update(registry, "a", v2)
    path = Path(info.path)
    if fault == "checksum":
        info.sha256 = "0" * 64
    elif fault == "corrupt":  # the file changed after its checksum was taken
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif fault in ("shapes", "nan"):  # a file whose checksum is right but whose tensors are not the drafter's
        state = {k: v.clone() for k, v in served.model.state_dict().items() if k != "lm_head.weight"}
        name = next(iter(state))
        state[name] = torch.zeros(3, 3) if fault == "shapes" else torch.full_like(state[name], float("nan"))
        save_file(state, str(path))
        info.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    elif fault == "outside":  # a valid file, but not the registry's
        other = tmp_path / "elsewhere.safetensors"
        other.write_bytes(path.read_bytes())
        info.path = str(other)
    elif fault == "unknown":
        info.drafter = "b"
    elif fault == "version":
        info.version = -1
    with pytest.raises(CheckpointError):
        drafters.load_version(**info.to_dict(), root=str(registry.root))
    assert served.version == 1 and drafters.updates == 0
    torch.testing.assert_close(logits(served.model), before, rtol=0, atol=0)


def test_a_version_the_engine_refuses_is_refused_and_the_serving_one_stays(setup, redis_client):
    registry, served, _, v2 = setup
    watcher = SwapWatcher(redis_client, registry, {"a": served}, rollback=False)
    assert watcher.check("a")
    calls = []

    def refuse(drafter, version, path, sha256):
        calls.append((drafter, version, Path(path).name, sha256))
        raise RuntimeError("vLLM: no room")

    assert watcher.apply(install=refuse) == []
    assert calls == [("a", v2, "model.safetensors", registry.manifest("a", v2).files["model.safetensors"])]
    assert served.version == 1 and watcher.stats.refusals == 1
    assert watcher.status("a", v2) == "refused: the engine did not take it"
    assert not watcher.check("a")  # not offered again
    # a later version goes through
    v3 = registry.publish("a", served.model, parent=v2).version
    assert watcher.check("a")
    drafters = DrafterModules({"a": served})
    assert watcher.apply(install=lambda *a: drafters.load_version(*a, root=str(registry.root))) == [("a", v3)]
    assert served.version == v3 and watcher.parents["a"] == v2


def test_vllm_finds_the_backend_through_its_plugin_entry_point_and_the_engine_asks_for_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    plugins = project["project"]["entry-points"]["vllm.general_plugins"]
    module, name = plugins["onlinespec"].split(":")
    assert callable(getattr(import_module(module), name))
    from onlinespec.config import load_config

    cfg = load_config(ROOT / "configs" / "vllm.yaml")
    assert engine_args(cfg, "/models/target")["weight_transfer_config"] == {"backend": BACKEND}
    assert "weight_transfer_config" not in engine_args(cfg, "/models/target", speculate=False)
    # serving.prefix_cache_tokens: 0 turns vLLM's own prefix caching off too (otherwise its default: on)
    import dataclasses
    assert "enable_prefix_caching" not in engine_args(cfg, "/models/target")
    off = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, prefix_cache_tokens=0))
    assert engine_args(off, "/models/target")["enable_prefix_caching"] is False


def test_prefix_cache_scope_reaches_vllm_as_a_salt_per_tenant():
    """``serving.prefix_cache_scope: tenant`` with ``engine: vllm``: vLLM's ``cache_salt`` keeps each
    tenant's text apart (a request with neither a tenant nor a salt gets a salt of its own); under
    ``shared`` only the request's own ``cache_salt`` is passed."""
    from serving.vllm_loop import prefix_salt

    assert prefix_salt("shared", "t1", None) is None and prefix_salt("shared", "t1", "s") == "s"
    salts = {prefix_salt("tenant", t, s) for t in ("t1", "t2", None) for s in ("s", None) if t or s}
    assert len(salts) == 5 and None not in salts
    assert prefix_salt("tenant", "t1", None) == prefix_salt("tenant", "t1", None)  # a tenant's own tree
    assert prefix_salt("tenant", None, None) != prefix_salt("tenant", None, None)  # nobody's: never shared
    # no tenant and salt pair reads as another's
    assert prefix_salt("tenant", "a", "b") != prefix_salt("tenant", "a\", \"b", None)
