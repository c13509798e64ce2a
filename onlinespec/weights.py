"""Reading a drafter version's weights safely: one place for the checks every reader applies.

The registry's loader (:meth:`onlinespec.learn.registry.Registry.load_weights`) and the weight
transfer backend inside vLLM (:mod:`onlinespec.vllm_backend.transfer`) both read
``model.safetensors`` through :func:`read_weights`: the bytes read once, checked against the
manifest's sha256, parsed by safetensors (no pickle), names and shapes exactly the drafter's,
every value finite. A file that fails any check raises :class:`~onlinespec.errors.CheckpointError`
and nothing is loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from onlinespec.errors import CheckpointError

__all__ = ["build_model", "check_fit", "expected_shapes", "load_version", "read_weights"]


def expected_shapes(model) -> dict[str, torch.Size]:
    """Parameter names and shapes as a published version stores them (tied lm_head left out)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.shape for k, v in state.items()}


def check_fit(what: str, shapes: dict, expected: dict) -> None:
    """Parameter names and shapes exactly as expected, or :class:`CheckpointError` saying how not."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what}: parameter names differ from the drafter's (missing {missing[:3]}, "
                              f"extra {extra[:3]})")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise CheckpointError(f"{what}: {name} has shape {tuple(shapes[name])}, expected {tuple(shape)}")


def read_weights(path: Path, digest: str | None, what: str, expected: dict | None = None) -> dict[str, torch.Tensor]:
    """A version's ``model.safetensors``, checked: its sha256 is ``digest``, names and shapes are
    exactly ``expected`` (when given), every value is finite; else :class:`CheckpointError`.

    The file is read once into memory, checked against the checksum and parsed from those bytes:
    a file memory-mapped instead would be trusted on an earlier read, and one truncated while
    mapped (a disk fault, a copy over it) kills the process with SIGBUS."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{what}: unreadable weights: {exc}") from None
    if not digest or hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{what}: checksum mismatch in model.safetensors")
    try:
        weights = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{what}: unreadable weights: {exc}") from None
    if expected is not None:
        check_fit(what, {k: v.shape for k, v in weights.items()}, expected)
    for name, value in weights.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{what}: non-finite values in {name}")
    return weights


def build_model(directory: Path, weights: dict[str, torch.Tensor], what: str):
    """A Hugging Face causal LM from a version's ``config.json`` (in ``directory``) and its checked
    weights, in eval mode; :class:`CheckpointError` when they do not fit each other."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import onlinespec.drafters.cut  # noqa: F401 - registers the cut drafter's model type with the Auto classes
    import onlinespec.drafters.feature  # noqa: F401 - and the feature drafter's

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:
        raise CheckpointError(f"{what}: unreadable config: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except Exception as exc:
        raise CheckpointError(f"{what}: cannot rebuild the model: {exc}") from None
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:
        raise CheckpointError(f"{what}: weights do not fit the config ({missing[:3]}, {unexpected[:3]})")
    if tied:
        model.tie_weights()
    return model.eval()


def load_version(directory: Path, what: str):
    """A registry version's model from its folder alone (``manifest.json`` gives the weights'
    checksum): for a process that has the registry's files but not its Redis (a vLLM worker)."""
    import json

    directory = Path(directory)
    try:
        digest = json.loads((directory / "manifest.json").read_text())["files"]["model.safetensors"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{what}: unreadable manifest: {exc}") from None
    return build_model(directory, read_weights(directory / "model.safetensors", digest, what), what)
